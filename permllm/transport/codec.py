"""Array codec of the transport: payloads to wire arrays on the way out, bounded views on the way in.

Nothing here allocates in proportion to a size a peer declares: `payload_array` is only called on a
payload whose length already matched its checked header (see `frames.check_payload`).
"""

from __future__ import annotations

import numpy as np
import torch

from permllm.errors import ProtocolError
from permllm.transport.frames import Header, wire_dtype

TORCH_TO_NUMPY = {
    torch.int64: np.dtype("<i8"),
    torch.float64: np.dtype("<f8"),
    torch.float32: np.dtype("<f4"),
    torch.int32: np.dtype("<i4"),
    torch.uint8: np.dtype("u1"),
}
if hasattr(torch, "uint64"):
    TORCH_TO_NUMPY[torch.uint64] = np.dtype("<u8")


def to_wire_array(payload) -> np.ndarray:
    """Convert a payload to a C-contiguous little-endian numpy array of a supported dtype.

    payload: numpy array or scalar, CPU torch tensor (moved to the CPU and made contiguous when
    needed; no copy otherwise), or bytes / bytearray / memoryview (sent as a 1-D uint8 array).
    Returns a numpy array that may share memory with `payload`.
    Raises ProtocolError for an unsupported dtype, TypeError for any other kind of object.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return np.frombuffer(payload, dtype=np.uint8)
    if isinstance(payload, torch.Tensor):
        dtype = TORCH_TO_NUMPY.get(payload.dtype)
        if dtype is None:
            raise ProtocolError(
                f"unsupported torch dtype {payload.dtype}; supported: {sorted(map(str, TORCH_TO_NUMPY))}"
            )
        tensor = payload.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.is_conj() or tensor.is_neg():
            tensor = tensor.resolve_conj().resolve_neg()
        payload = tensor.contiguous().numpy()
    elif isinstance(payload, np.generic):
        payload = np.asarray(payload)
    if not isinstance(payload, np.ndarray):
        raise TypeError(f"payload must be a numpy array, torch tensor or bytes, got {type(payload).__name__}")
    dtype = wire_dtype(payload.dtype)
    if payload.dtype != dtype:
        payload = payload.astype(dtype)
    if not payload.flags.c_contiguous:
        payload = payload.copy(order="C")
    return payload


def as_byte_view(array: np.ndarray) -> memoryview:
    """A flat byte memoryview over a C-contiguous array (works for 0-d and empty arrays)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def expected_dtype(dtype) -> np.dtype:
    """Resolve a dtype given as a numpy dtype/type/name or a torch dtype to its wire dtype."""
    if isinstance(dtype, torch.dtype):
        resolved = TORCH_TO_NUMPY.get(dtype)
        if resolved is None:
            raise ProtocolError(f"unsupported torch dtype {dtype}")
        return resolved
    return wire_dtype(dtype)


def payload_array(header: Header, payload, peer: str) -> np.ndarray:
    """The received payload as an array of the header's dtype and shape (a view; copied only when
    misaligned or read-only). `header` and `payload` must have passed `check_payload`; a numpy
    refusal is still reported as a ProtocolError naming `peer`, never as a ValueError."""
    try:
        array = np.frombuffer(payload, dtype=header.dtype).reshape(header.shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(
            f"peer {peer!r}, tag {header.tag!r}: payload does not form shape {header.shape} of {header.dtype}: {exc}"
        ) from None
    if not array.flags.aligned or not array.flags.writeable:
        array = array.copy()
    return array
