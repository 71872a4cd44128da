"""Keeping a long-lived process's resident memory to what it still uses (Linux with glibc; elsewhere
both calls do nothing and return False).

`page_out(tensor)`: asks the kernel to reclaim the pages wholly inside a tensor's storage
(madvise MADV_PAGEOUT, Linux 5.4+). The owner's float32 checkpoint is memory-mapped: the pages it
reads while it encodes stay resident (and count in its RSS) as long as the mapping lives, which is
until the last tensor of the file is dropped, so without this the whole float model sits beside the
encoded one at the end of the encoding. Reclaiming never changes what the memory holds: a clean
file-backed page is re-read from the file on its next access, and an anonymous page with no swap
is simply left where it is.

`return_large_frees(threshold)`: fixes glibc's mmap threshold (mallopt M_MMAP_THRESHOLD), so every
allocation of `threshold` bytes or more gets its own mapping and goes back to the system when freed.
glibc otherwise raises the threshold to the largest block freed so far (up to 32 MiB): the 8 MB
blocks a session builds while it sends W - U then come from the heap, where what is freed stays
resident as fragments between live allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

_MADV_PAGEOUT = 21
_M_MMAP_THRESHOLD = -3
_libc = None


def _c_library():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def page_out(tensor) -> bool:
    """Reclaim the whole pages of `tensor`'s storage (a torch tensor, or None); True when the kernel took
    the request. Only for memory the caller no longer needs resident; its contents stay as they are."""
    libc = _c_library()
    if libc is None or tensor is None:
        return False
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    return last > first and libc.madvise(first, last - first, _MADV_PAGEOUT) == 0


def return_large_frees(threshold: int = 1 << 20) -> bool:
    """Make allocations of `threshold` bytes or more separate mappings, returned to the system when
    freed (process-wide, from now on); True when the C library took the setting."""
    libc = _c_library()
    return libc is not None and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
