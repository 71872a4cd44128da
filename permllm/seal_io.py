"""SEAL plumbing for permllm.bfv_linear: pinned BFV parameters, byte I/O and hand-written serializations.

``tenseal.sealapi`` offers no bytes or numpy interface: ``save``/``load`` take file paths (``save``
compresses with zstd) and coefficients are read one at a time. :class:`SealScratch` moves objects
through a private scratch file (in ``/dev/shm`` when it exists). Plaintexts and the flooding
ciphertext are built by writing SEAL's own uncompressed serialization layout (``SEALHeader`` +
members) and calling ``load``, which re-validates them against the context.

Every failure on peer bytes surfaces as :class:`permllm.errors.ProtocolError`.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Sequence

import numpy as np
import tenseal.sealapi as seal

from permllm.errors import ProtocolError

__all__ = [
    "POLY_DEGREE",
    "COEFF_BITS",
    "PLAIN_BITS",
    "REPLY_PRIMES",
    "SealScratch",
    "make_parameters",
    "make_context",
    "plaintext_bytes",
    "ciphertext_bytes",
    "check_seal_header",
    "max_ciphertext_bytes",
]

POLY_DEGREE = 8192
#: Data primes 50, 30, 45, 45 bits and the special (key-switching) prime of 48 bits: 218 bits, the
#: HE standard's 128-bit bound for N = 8192 with a ternary secret (SEAL's TC128 check).
COEFF_BITS = (50, 30, 45, 45, 48)
PLAIN_BITS = 59
#: Replies are modulus-switched down to the first two data primes (80 bits).
REPLY_PRIMES = 2

_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compr mode, reserved, size
_COMPR_NONE = 0
_PARMS_ID_BYTES = 32


def _seal_version() -> tuple[int, int]:
    scratch = SealScratch()
    data = scratch.dump(seal.Plaintext())
    _, _, major, minor, _, _, _ = _HEADER.unpack_from(data)
    return major, minor


def _header(payload_len: int) -> bytes:
    major, minor = _VERSION
    return _HEADER.pack(_MAGIC, _HEADER.size, major, minor, _COMPR_NONE, 0, _HEADER.size + payload_len)


def _dyn_array(values: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(values, dtype="<u8").reshape(-1)
    payload = struct.pack("<Q", flat.size) + flat.tobytes()
    return _header(len(payload)) + payload


def _parms_id_bytes(parms_id: Sequence[int]) -> bytes:
    return struct.pack("<4Q", *parms_id)


def make_parameters() -> seal.EncryptionParameters:
    """BFV, N = 8192, primes of COEFF_BITS bits, plain modulus 2^PLAIN_BITS (coefficient encoding)."""
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(POLY_DEGREE)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(POLY_DEGREE, list(COEFF_BITS)))
    parms.set_plain_modulus(seal.Modulus(1 << PLAIN_BITS))
    return parms


def make_context(parms: seal.EncryptionParameters) -> seal.SEALContext:
    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise ProtocolError(f"BFV parameters rejected by SEAL: {ctx.parameters_error_message()}")
    return ctx


def parameters_match(parms: seal.EncryptionParameters, pinned: seal.EncryptionParameters) -> bool:
    """True when parms has exactly the pinned scheme, degree, primes and plain modulus."""
    return (
        parms.scheme() == pinned.scheme()
        and int(parms.poly_modulus_degree()) == int(pinned.poly_modulus_degree())
        and [m.value() for m in parms.coeff_modulus()] == [m.value() for m in pinned.coeff_modulus()]
        and int(parms.plain_modulus().value()) == int(pinned.plain_modulus().value())
    )


def max_ciphertext_bytes(n_primes: int) -> int:
    """Upper bound on a serialized 2-component ciphertext over n_primes primes (uncompressed + headers)."""
    return 2 * n_primes * POLY_DEGREE * 8 + 256


def check_seal_header(data: bytes, what: str) -> None:
    """Refuse bytes whose SEAL header is malformed or whose declared size is not their length."""
    if len(data) < _HEADER.size:
        raise ProtocolError(f"{what}: {len(data)} bytes, shorter than a SEAL header")
    magic, header_size, _, _, compr, _, size = _HEADER.unpack_from(data)
    if magic != _MAGIC or header_size != _HEADER.size or compr > 2 or size != len(data):
        raise ProtocolError(f"{what}: not a SEAL serialization (bad magic, compression mode or size)")


def plaintext_bytes(coeffs: np.ndarray) -> bytes:
    """Uncompressed serialization of a coefficient-form Plaintext with the given uint64 coefficients."""
    coeffs = np.ascontiguousarray(coeffs, dtype="<u8").reshape(-1)
    body = bytes(_PARMS_ID_BYTES) + struct.pack("<Qd", coeffs.size, 1.0) + _dyn_array(coeffs)
    return _header(len(body)) + body


def ciphertext_bytes(parms_id: Sequence[int], polys: np.ndarray, *, ntt_form: bool = False) -> bytes:
    """Uncompressed serialization of a Ciphertext; polys is uint64 (size, n_primes, N), residues < q_i."""
    size, n_primes, degree = polys.shape
    members = (
        _parms_id_bytes(parms_id)
        + struct.pack("<B", int(ntt_form))
        + struct.pack("<QQQdQ", size, degree, n_primes, 1.0, 1)
        + _dyn_array(polys)
    )
    return _header(len(members)) + members


class SealScratch:
    """A private scratch file that turns SEAL objects into bytes and back (``save``/``load`` take paths)."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="permllm-seal-", dir=base)
        self._path = os.path.join(self._dir.name, "obj")

    def dump(self, obj) -> bytes:
        obj.save(self._path)
        with open(self._path, "rb") as handle:
            return handle.read()

    def _write(self, data: bytes) -> None:
        with open(self._path, "wb") as handle:
            handle.write(data)

    def load(self, obj, data: bytes, what: str, context=None):
        """Fill obj (a fresh SEAL object) from data; any SEAL error becomes ProtocolError naming what."""
        check_seal_header(data, what)
        self._write(data)
        try:
            obj.load(self._path) if context is None else obj.load(context, self._path)
        except Exception as exc:  # SEAL raises ValueError/RuntimeError/TypeError on bad data
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[0][:160] if text else ''}"
            raise ProtocolError(f"{what}: SEAL refused it ({detail})") from None
        return obj


_VERSION = (4, 0)
_VERSION = _seal_version()
