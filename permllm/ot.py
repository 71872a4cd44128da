"""Oblivious transfer: 128 base OTs over a MODP group, IKNP extension, a fixed-key AES hash.

Roles follow the extension: the *chooser* (here the owner, choice bits r) gets one of two random
pads per OT; the *sender* (the user) gets both. Semi-honest security, 128-bit computational.

Base OTs (Bellare-Micali style, one message each way; the chooser of the extension is the sender of
the base OTs)::

    group: RFC 3526 3072-bit MODP prime p, g = 2 (order q = (p - 1) / 2), 256-bit exponents
    C = (SHAKE-256(label) mod p)^2, a public element nobody knows the logarithm of
    user  -> owner  request: PK0_i for i < 128, PK_{s_i} = g^{k_i}, PK_{1-s_i} = C / PK_{s_i}
    owner -> user   reply:   R = g^x;  owner keys K_i^b = H(i, PK_b^x),  user keys K_i^{s_i} = H(i, R^{k_i})

The request leaves first (C needs no message), so the reply travels with the owner's first query.

IKNP extension of m OTs for batch index j (Ishai, Kilian, Nissim, Petrank 2003)::

    owner: t_i = G(K_i^0), u_i = t_i ^ G(K_i^1) ^ r  (i < 128, m bits each; G = AES-CTR Prg of batch j)
    owner -> user: U = (u_0 .. u_127), 16 bytes per OT
    user:  q_i = G(K_i^{s_i}) ^ (s_i u_i) = t_i ^ s_i r;  transposed, row q_l = t_l ^ r_l s
    pads:  owner H(t_l);  user H(q_l) (choice 0) and H(q_l ^ s) (choice 1); H(t_l) = H(q_l ^ r_l s)

H(x, w) = pi(pi(x) ^ w) ^ pi(x) (the tweakable correlation-robust hash of Guo, Kolesnikov, Katz and
Schaefer 2020), pi = AES-128 under a fixed public key, tweak w = (batch, block index) unique per block
of a session; a pad of ``blocks`` blocks uses ``blocks`` consecutive tweaks.
"""

from __future__ import annotations

import hashlib
import struct
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from permllm.errors import ConfigError, ProtocolError
from permllm.prg import Prg

__all__ = [
    "BASE_OTS",
    "ELEMENT_BYTES",
    "BaseReceiver",
    "BaseSender",
    "ExtensionChooser",
    "ExtensionSender",
    "MAX_OTS",
    "P",
    "matrix_bytes",
    "tccr",
]

BASE_OTS = 128
"""Base OTs per session (the computational security parameter of the extension)."""

MAX_OTS = 1 << 22
"""Most OTs one extension (one batch) may carry: U is then 64 MiB."""

P = int(
    "ffffffffffffffffc90fdaa22168c234c4c6628b80dc1cd129024e088a67cc74020bbea63b139b22514a08798e3404dd"
    "ef9519b3cd3a431b302b0a6df25f14374fe1356d6d51c245e485b576625e7ec6f44c42e9a637ed6b0bff5cb6f406b7ed"
    "ee386bfb5a899fa5ae9f24117c4b1fe649286651ece45b3dc2007cb8a163bf0598da48361c55d39a69163fa8fd24cf5f"
    "83655d23dca3ad961c62f356208552bb9ed529077096966d670c354e4abc9804f1746c08ca18217c32905e462e36ce3b"
    "e39e772c180e86039b2783a2ec07a28fb5c55df06f4c52c9de2bcbf6955817183995497cea956ae515d2261898fa0510"
    "15728e5a8aaac42dad33170d04507a33a85521abdf1cba64ecfb850458dbef0a8aea71575d060c7db3970f85a6e1e4c7"
    "abf5ae8cdb0933d71e8c94e04a25619dcee3d2261ad2ee6bf12ffa06d98a0864d87602733ec86a64521f2b18177b200c"
    "bbe117577a615d6c770988c0bad946e208e24fa074e5ab3143db5bfce0fd108e4b82d120a93ad2caffffffffffffffff",
    16,
)
"""RFC 3526 group 15: p = 2^3072 - 2^3008 - 1 + 2^64 (floor(2^2942 pi) + 1690314), a safe prime."""

G = 2
ELEMENT_BYTES = 384
EXPONENT_BYTES = 32
_C = pow(int.from_bytes(hashlib.shake_256(b"permllm/ot/base/C/v1").digest(ELEMENT_BYTES + 16), "big") % P, 2, P)
_BASE_HEAD = struct.Struct("<4sBH")  # magic, version, count
_VERSION = 1
_TCCR_KEY = hashlib.sha256(b"permllm/ot/tccr/v1").digest()[:16]
_LOCAL = threading.local()  # one fixed-key AES context per thread: a context cannot serve two threads at once


def _pi():
    """The fixed-key permutation pi (AES-128 ECB of whole blocks, stateless) of this thread."""
    if not hasattr(_LOCAL, "pi"):
        _LOCAL.pi = Cipher(algorithms.AES(_TCCR_KEY), modes.ECB()).encryptor()
    return _LOCAL.pi


_TRANSPOSE_CHUNK = 1 << 16  # OTs per bit-matrix transpose step


def _element(value: int) -> bytes:
    return value.to_bytes(ELEMENT_BYTES, "big")


def _read_element(raw: bytes, what: str) -> int:
    value = int.from_bytes(raw, "big")
    if not 1 < value < P - 1:
        raise ProtocolError(f"{what} is not a group element in (1, p - 1)")
    return value


def _key(index: int, element: int) -> bytes:
    return hashlib.sha256(b"permllm/ot/base/key/v1" + struct.pack("<I", index) + _element(element)).digest()[:16]


def _exponent(prg: Prg) -> int:
    return int.from_bytes(prg.bytes(EXPONENT_BYTES), "little") | 1  # nonzero, 256 bits


class BaseReceiver:
    """User side of the base OTs: random choices s (128 bits), one key K_i^{s_i} each."""

    def __init__(self, prg: Prg) -> None:
        self.choices = np.unpackbits(np.frombuffer(prg.bytes(BASE_OTS // 8), dtype=np.uint8), bitorder="little")
        self._exponents = [_exponent(prg) for _ in range(BASE_OTS)]

    def request(self) -> bytes:
        """user -> owner: header + 128 elements PK0_i (384 bytes each)."""
        parts = [_BASE_HEAD.pack(b"PLOB", _VERSION, BASE_OTS)]
        for s, k in zip(self.choices, self._exponents):
            mine = pow(G, k, P)
            parts.append(_element(mine if s == 0 else _C * pow(mine, -1, P) % P))
        return b"".join(parts)

    def keys(self, reply) -> list[bytes]:
        """K_i^{s_i} from the owner's reply R."""
        r = _read_element(_check_base(reply, b"PLOR", 1), "base OT reply R")
        return [_key(i, pow(r, k, P)) for i, k in enumerate(self._exponents)]


class BaseSender:
    """Owner side of the base OTs: both keys (K_i^0, K_i^1) of each of the 128 OTs."""

    def __init__(self, prg: Prg) -> None:
        self._x = _exponent(prg)

    def reply(self, request) -> tuple[bytes, list[bytes], list[bytes]]:
        """(reply R, keys0, keys1) for the user's request."""
        body = _check_base(request, b"PLOB", BASE_OTS)
        cx = pow(_C, self._x, P)
        keys0, keys1 = [], []
        for i in range(BASE_OTS):
            pk0 = _read_element(body[i * ELEMENT_BYTES : (i + 1) * ELEMENT_BYTES], f"base OT request element {i}")
            k0 = pow(pk0, self._x, P)
            keys0.append(_key(i, k0))
            keys1.append(_key(i, cx * pow(k0, -1, P) % P))
        return _BASE_HEAD.pack(b"PLOR", _VERSION, 1) + _element(pow(G, self._x, P)), keys0, keys1


def _check_base(msg, magic: bytes, count: int) -> bytes:
    if not isinstance(msg, (bytes, bytearray, memoryview)):
        raise ProtocolError("a base OT message must be bytes")
    msg = bytes(msg)
    if len(msg) != _BASE_HEAD.size + count * ELEMENT_BYTES:
        raise ProtocolError(f"base OT message has {len(msg)} bytes, expected {_BASE_HEAD.size + count * ELEMENT_BYTES}")
    tag, version, got = _BASE_HEAD.unpack(msg[: _BASE_HEAD.size])
    if (tag, version, got) != (magic, _VERSION, count):
        raise ProtocolError(
            f"base OT message header {tag!r} v{version} x{got}, expected {magic!r} v{_VERSION} x{count}"
        )
    return msg[_BASE_HEAD.size :]


def _stream(key: bytes, batch: int, index: int, nbytes: int) -> np.ndarray:
    return np.frombuffer(Prg(key, f"ot/iknp/{batch}/{index}").bytes(nbytes), dtype=np.uint8)


def _transpose(columns: np.ndarray, m: int) -> np.ndarray:
    """(128, ceil(m / 8)) bit columns -> (m, 16) uint8 rows; bit i of row l is bit l of column i."""
    rows = np.empty((m, BASE_OTS // 8), dtype=np.uint8)
    for start in range(0, m, _TRANSPOSE_CHUNK):
        stop = min(m, start + _TRANSPOSE_CHUNK)
        bits = np.unpackbits(columns[:, start // 8 : (stop + 7) // 8], axis=1, bitorder="little")[:, : stop - start]
        rows[start:stop] = np.packbits(bits.T, axis=1, bitorder="little")
    return rows


def matrix_bytes(m: int) -> int:
    """Size of U for m OTs: 128 columns of ceil(m / 8) bytes."""
    return BASE_OTS * ((m + 7) // 8)


def _check_count(m: int) -> None:
    if not 0 <= m <= MAX_OTS:
        raise ConfigError(f"{m} OTs in one extension, at most {MAX_OTS} are supported")


class ExtensionChooser:
    """Owner side of IKNP: extends with choice bits r, keeps the rows t_l."""

    def __init__(self, keys0: list[bytes], keys1: list[bytes]) -> None:
        self._keys0, self._keys1 = keys0, keys1

    def extend(self, choices: np.ndarray, batch: int) -> tuple[bytes, np.ndarray]:
        """(U bytes for the user, rows t (m, 16) uint8) for choice bits ``choices`` (m,) of 0/1."""
        m = int(choices.shape[0])
        _check_count(m)
        nbytes = (m + 7) // 8
        packed = np.packbits(choices.astype(np.uint8), bitorder="little")
        t = np.empty((BASE_OTS, nbytes), dtype=np.uint8)
        u = np.empty((BASE_OTS, nbytes), dtype=np.uint8)
        for i in range(BASE_OTS):
            t[i] = _stream(self._keys0[i], batch, i, nbytes)
            u[i] = t[i] ^ self._second(i, batch, nbytes) ^ packed
        return u.tobytes(), _transpose(t, m)

    def _second(self, i: int, batch: int, nbytes: int) -> np.ndarray:
        """G(K_i^1), the stream that hides the choices in u_i."""
        return _stream(self._keys1[i], batch, i, nbytes)


class ExtensionSender:
    """User side of IKNP: from U, the rows q_l (pad 0 from q_l, pad 1 from q_l ^ s)."""

    def __init__(self, choices: np.ndarray, keys: list[bytes]) -> None:
        self._choices = choices
        self._keys = keys
        self.secret = np.packbits(choices, bitorder="little")  # s as a 16-byte row

    def extend(self, matrix, m: int, batch: int) -> np.ndarray:
        """Rows q (m, 16) uint8 from the owner's U (checked to be exactly matrix_bytes(m) bytes)."""
        _check_count(m)
        if len(matrix) != matrix_bytes(m):
            raise ProtocolError(f"OT extension matrix has {len(matrix)} bytes, expected {matrix_bytes(m)}")
        nbytes = (m + 7) // 8
        u = np.frombuffer(bytes(matrix), dtype=np.uint8).reshape(BASE_OTS, nbytes)
        q = np.empty((BASE_OTS, nbytes), dtype=np.uint8)
        for i in range(BASE_OTS):
            q[i] = _stream(self._keys[i], batch, i, nbytes)
            if self._choices[i]:
                q[i] ^= u[i]
        return _transpose(q, m)


def tccr(rows: np.ndarray, blocks: int, batch: int, first_block: int) -> np.ndarray:
    """H(row, w) for tweaks w = (batch, first_block + l * blocks + j), j < blocks: (m, 16 * blocks) uint8."""
    m = rows.shape[0]
    if m == 0:
        return np.zeros((0, 16 * blocks), dtype=np.uint8)
    once = np.frombuffer(_pi().update(np.ascontiguousarray(rows).tobytes()), dtype=np.uint8).reshape(m, 1, 16)
    tweaks = np.empty((m, blocks, 2), dtype="<u8")
    tweaks[..., 0] = (np.uint64(first_block) + np.arange(m * blocks, dtype=np.uint64)).reshape(m, blocks)
    tweaks[..., 1] = np.uint64(batch)
    inner = (once ^ tweaks.view(np.uint8).reshape(m, blocks, 16)).tobytes()
    twice = np.frombuffer(_pi().update(inner), dtype=np.uint8).reshape(m, blocks, 16)
    return (twice ^ once).reshape(m, 16 * blocks)
