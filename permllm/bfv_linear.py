"""Additive shares of V @ W over Z_2^64 with BFV in coefficient encoding (no helper party).

Setting. The user holds V (T x n, its uniform random masks in Z_2^64, torch.int64); the owner holds
W (n x m, signed integers in [-2^19, 2^19), torch.int64). Afterwards the owner holds R and the user
holds ``V @ W - R (mod 2^64)``; R is uniform in Z_2^64 (drawn by the owner, derived from its seed,
or given by it). One round trip; the public context travels once per session::

    user  (LinearCorrelationClient)                    owner (LinearCorrelationServer)
    BFV keys (secret key stays here)
    public_context()  ---- bytes ------------------->  LinearCorrelationServer(public_context)
    encrypt_rows(V)   ---- list[bytes] ------------->  multiply(query, W, seed=.. | mask=R)
    decrypt_shares(reply, T, m)  <-- list[bytes] ---     -> (reply, R)
      == V @ W - R (mod 2^64)

Limbs. BFV with plain modulus t = 2^59 (SEAL's largest power of two). V = V_lo + 2^5 V_hi with
V_lo < 2^5 and V_hi < 2^59; the 2T limb rows [V_hi; V_lo] are packed as one matrix (see
permllm.bfv_packing). The high limb is needed only mod 2^59, which is what t gives: the user
decrypts D_hi = V_hi @ W - R_hi (mod t). The low-limb products P = V_lo @ W are small
(|P| <= 31 * 2^19 * n) and the user decrypts D_lo = P + R' (mod t) with R' uniform in [0, t); then
``2^5 D_hi + D_lo = V @ W - R (mod 2^64)`` with R = 2^5 R_hi - R', provided P + R' does not wrap
mod t. Known error rate: a wrap happens with probability |P| / 2^59 per output (at most
31 * 2^19 * n / 2^59, about 2^-24.6 for n = 1536; for uniform V_lo and W a typical |P| is about
2^27, i.e. ~2^-32 per output) and then that output share is off by +-2^59. A share-extension step
(one OT per output) would remove it; this module does not.

Packing, per reply ciphertext: Tw limb-rows x mw outputs (permllm.bfv_packing.choose_packing picks
Tw, nw, mw from T, n and the expected m). Messages: query = [header, ciphertexts...] (2T/Tw x n/nw
ciphertexts), reply = [header, ciphertexts...] (2T/Tw x m/mw ciphertexts).

Security (semi-honest). Owner: sees only ciphertexts under the user's key (RLWE). User: every reply
is (1) summed with a fresh public-key encryption of zero (re-randomizes c1, which the user would
otherwise know as a function of its own query and W), (2) masked on all N coefficients (the
non-result coefficients hold partial dot products with W; they get fresh uniform masks mod t), and
(3) flooded with (Delta * M + E, 0), E uniform in +-2^90, far above the weight-dependent noise
(bfv_packing.FLOOD_BITS), before being modulus-switched to 80 bits. What the user decrypts is
uniform on every coefficient except the result positions, which carry its share.

Queries travel seeded (SEAL expands c1 from its seed on load): about half a full ciphertext's bytes.

Parameters are pinned on both sides (N = 8192, primes of 50, 30, 45, 45 + 48 bits, t = 2^59);
peer bytes that do not match, or whose sizes or counts are off, raise ProtocolError.
"""

from __future__ import annotations

import struct

import numpy as np
import tenseal.sealapi as seal
import torch

from permllm.bfv_packing import (
    FLOOD_BITS,
    Packing,
    choose_packing,
    compact_ciphertext,
    expand_compact,
    flood_polynomial,
)
from permllm.errors import ConfigError, ProtocolError
from permllm.prg import Prg, fresh_seed
from permllm.seal_io import (
    PLAIN_BITS,
    POLY_DEGREE,
    REPLY_PRIMES,
    SealScratch,
    ciphertext_bytes,
    make_context,
    make_parameters,
    max_ciphertext_bytes,
    parameters_match,
    plaintext_bytes,
)

__all__ = ["LinearCorrelationClient", "LinearCorrelationServer", "MAX_ROWS", "MAX_FEATURES", "WEIGHT_BITS"]

MAX_ROWS = 4096
MAX_FEATURES = 1 << 16
WEIGHT_BITS = 20
LOW_BITS = 5
_T = 1 << PLAIN_BITS
_VERSION = 1
_CONTEXT = struct.Struct("<4sBII")  # magic, version, parameter bytes, public key bytes
_QUERY = struct.Struct("<4sBIIHH")  # magic, version, T, n, Tw, nw
_REPLY = struct.Struct("<4sBIIHHH")  # magic, version, T, m, Tw, nw, mw
_MAX_PARMS_BYTES = 1 << 12


def _level(ctx: seal.SEALContext, n_primes: int):
    data = ctx.first_context_data()
    while len(data.parms().coeff_modulus()) > n_primes:
        data = data.next_context_data()
    return data


def _check_list(msg, what: str, count: int | None = None) -> list[bytes]:
    if not isinstance(msg, (list, tuple)) or not msg:
        raise ProtocolError(f"{what} must be a non-empty list of bytes, got {type(msg).__name__}")
    if count is not None and len(msg) != count:
        raise ProtocolError(f"{what} has {len(msg)} parts, expected {count}")
    for i, part in enumerate(msg):
        if not isinstance(part, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"{what} part {i} must be bytes, got {type(part).__name__}")
    return [bytes(part) for part in msg]


def _unpack(layout: struct.Struct, data: bytes, magic: bytes, what: str) -> tuple:
    if len(data) != layout.size:
        raise ProtocolError(f"{what} header has {len(data)} bytes, expected {layout.size}")
    fields = layout.unpack(data)
    if fields[0] != magic or fields[1] != _VERSION:
        raise ProtocolError(f"{what} header has magic {fields[0]!r} version {fields[1]}, expected {magic!r} v1")
    return fields[2:]


def _check_shape(what: str, value: int, limit: int) -> int:
    if not 1 <= value <= limit:
        raise ProtocolError(f"{what} = {value} outside [1, {limit}]")
    return value


def _load_ciphertext(scratch: SealScratch, ctx, data: bytes, parms_id, what: str) -> seal.Ciphertext:
    ct = scratch.load(seal.Ciphertext(ctx), data, what, ctx)
    if ct.size() != 2 or ct.is_ntt_form() or list(ct.parms_id()) != list(parms_id):
        raise ProtocolError(f"{what} must be a 2-component coefficient-form ciphertext at the expected level")
    return ct


class LinearCorrelationClient:
    """User side: holds the BFV secret key, encrypts the limbs of V and decrypts its share of V @ W."""

    def __init__(self) -> None:
        self._parms = make_parameters()
        self._ctx = make_context(self._parms)
        keygen = seal.KeyGenerator(self._ctx)
        self._public_key = seal.PublicKey()
        keygen.create_public_key(self._public_key)
        self._secret_key = keygen.secret_key()
        self._encryptor = seal.Encryptor(self._ctx, self._secret_key)
        self._decryptor = seal.Decryptor(self._ctx, self._secret_key)
        self._scratch = SealScratch()
        self._first_parms_id = self._ctx.first_parms_id()
        self._reply_parms_id = _level(self._ctx, REPLY_PRIMES).parms_id()
        self._reply_primes = [mod.value() for mod in _level(self._ctx, REPLY_PRIMES).parms().coeff_modulus()]
        self._public: bytes | None = None

    def public_context(self) -> bytes:
        """Encryption parameters and public key (no secret key), framed as one bytes message."""
        if self._public is None:
            parms = self._scratch.dump(self._parms)
            key = self._scratch.dump(self._public_key)
            self._public = _CONTEXT.pack(b"PLBC", _VERSION, len(parms), len(key)) + parms + key
        return self._public

    def encrypt_rows(self, V: torch.Tensor, *, out_features: int | None = None, compact_reply=False) -> list[bytes]:
        """Query for V (T x n, int64): [header, Enc(limb blocks)...]; out_features (m) tunes the packing
        (and compact_reply: for a server that answers with ``multiply(..., compact=True)``)."""
        if not isinstance(V, torch.Tensor) or V.dtype != torch.int64 or V.dim() != 2:
            raise ConfigError("V must be a 2-D torch.int64 tensor")
        T, n = V.shape
        if not (1 <= T <= MAX_ROWS and 1 <= n <= MAX_FEATURES):
            raise ConfigError(
                f"V has shape {tuple(V.shape)}; rows must be in [1, {MAX_ROWS}], n in [1, {MAX_FEATURES}]"
            )
        m = n if out_features is None else int(out_features)
        if not 1 <= m <= MAX_FEATURES:
            raise ConfigError(f"out_features must be in [1, {MAX_FEATURES}], got {m}")
        packing = choose_packing(2 * T, n, m, compact=compact_reply)
        unsigned = V.contiguous().numpy().view(np.uint64)
        limbs = np.concatenate([unsigned >> np.uint64(LOW_BITS), unsigned & np.uint64((1 << LOW_BITS) - 1)])
        tw, nw = packing.rows_per_block, packing.inputs_per_block
        row_blocks, input_blocks = packing.query_blocks(2 * T, n)
        out = [_QUERY.pack(b"PLBQ", _VERSION, T, n, tw, nw)]
        for br in range(row_blocks):
            for bi in range(input_blocks):
                coeffs = packing.query_coefficients(limbs[br * tw : (br + 1) * tw, bi * nw : (bi + 1) * nw])
                plain = self._scratch.load(seal.Plaintext(), plaintext_bytes(coeffs), "query plaintext", self._ctx)
                # seeded: c1 travels as the seed SEAL expands it from (half the bytes of a full one)
                out.append(self._scratch.dump(self._encryptor.encrypt_symmetric(plain)))
        return out

    def noise_budget(self, ciphertext: seal.Ciphertext | bytes) -> int:
        """SEAL's invariant noise budget (bits) of a ciphertext under this key: log2(q/t) - 1 - log2|noise|."""
        if not isinstance(ciphertext, seal.Ciphertext):
            ciphertext = self._scratch.load(seal.Ciphertext(self._ctx), bytes(ciphertext), "ciphertext", self._ctx)
        return int(self._decryptor.invariant_noise_budget(ciphertext))

    def decrypt_coefficients(self, ciphertext: bytes) -> np.ndarray:
        """All N plaintext coefficients (uint64 mod t) of one reply ciphertext (for inspection and tests)."""
        ct = _load_ciphertext(self._scratch, self._ctx, ciphertext, self._reply_parms_id, "reply ciphertext")
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        count = plain.coeff_count()
        return np.array([plain.data(k) if k < count else 0 for k in range(POLY_DEGREE)], dtype=np.uint64)

    def decrypt_shares(self, reply, T: int, m: int) -> torch.Tensor:
        """The user's share V @ W - R (mod 2^64) as torch.int64 (T, m) from the owner's reply."""
        parts = _check_list(reply, "reply")
        compact = parts[0][:4] == b"PLBK"
        T_r, m_r, tw, nw, mw = _unpack(_REPLY, parts[0], b"PLBK" if compact else b"PLBR", "reply")
        packing = Packing(tw, nw)
        if (T_r, m_r) != (T, m) or not packing.valid_for(2 * T, MAX_FEATURES) or packing.outputs_per_block(m) != mw:
            raise ProtocolError(f"reply header (T={T_r}, m={m_r}, Tw={tw}, nw={nw}, mw={mw}) does not fit T={T}, m={m}")
        row_blocks = packing.query_blocks(2 * T, 1)[0]
        output_blocks = packing.output_blocks(m)
        parts = _check_list(reply, "reply", 1 + row_blocks * output_blocks)
        limit = max_ciphertext_bytes(REPLY_PRIMES)
        values = np.zeros((row_blocks * tw, output_blocks * mw), dtype=np.uint64)
        for k, data in enumerate(parts[1:]):
            if len(data) > limit:
                raise ProtocolError(f"reply ciphertext {k} has {len(data)} bytes, accepted at most {limit}")
            br, bj = divmod(k, output_blocks)
            rows_here, outs_here = min(tw, 2 * T - br * tw), min(mw, m - bj * mw)
            positions = packing.result_positions(rows_here, outs_here, m)
            if compact:
                try:
                    data = expand_compact(data, positions.reshape(-1), self._reply_primes, self._reply_parms_id)
                except ValueError as exc:
                    raise ProtocolError(f"compact reply ciphertext {k}: {exc}") from None
            ct = _load_ciphertext(self._scratch, self._ctx, data, self._reply_parms_id, f"reply ciphertext {k}")
            plain = seal.Plaintext()
            self._decryptor.decrypt(ct, plain)
            count = plain.coeff_count()
            got = [plain.data(int(p)) if p < count else 0 for p in positions.reshape(-1)]
            block = np.array(got, dtype=np.uint64).reshape(rows_here, outs_here)
            values[br * tw : br * tw + rows_here, bj * mw : bj * mw + outs_here] = block
        high, low = values[:T, :m], values[T : 2 * T, :m]
        with np.errstate(over="ignore"):
            share = (high << np.uint64(LOW_BITS)) + low
        return torch.from_numpy(share.view(np.int64).copy())


class LinearCorrelationServer:
    """Owner side: multiplies the user's encrypted limbs by W and returns a masked, flooded reply."""

    #: E is uniform in [-2^flood_bits, 2^flood_bits) (tests lower it to show what the flood hides).
    flood_bits = FLOOD_BITS

    def __init__(self, public_context: bytes) -> None:
        if not isinstance(public_context, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"public context must be bytes, got {type(public_context).__name__}")
        data = bytes(public_context)
        if len(data) < _CONTEXT.size:
            raise ProtocolError(f"public context has {len(data)} bytes, shorter than its header")
        parms_len, key_len = _unpack(_CONTEXT, data[: _CONTEXT.size], b"PLBC", "public context")
        key_limit = max_ciphertext_bytes(len(make_parameters().coeff_modulus()))
        if parms_len > _MAX_PARMS_BYTES or key_len > key_limit or len(data) != _CONTEXT.size + parms_len + key_len:
            raise ProtocolError(f"public context sizes ({parms_len}, {key_len}, total {len(data)}) do not add up")
        self._scratch = SealScratch()
        parms = self._scratch.load(
            seal.EncryptionParameters(seal.SCHEME_TYPE.BFV), data[_CONTEXT.size :][:parms_len], "parameters"
        )
        pinned = make_parameters()
        if not parameters_match(parms, pinned):
            raise ProtocolError(
                "public context parameters differ from the pinned N = 8192, 50/30/45/45/48 bits, t = 2^59"
            )
        self._ctx = make_context(pinned)
        key = self._scratch.load(seal.PublicKey(), data[_CONTEXT.size + parms_len :], "public key", self._ctx)
        if list(key.parms_id()) != list(self._ctx.key_parms_id()):
            raise ProtocolError("public key is not at the key level of the pinned parameters")
        self._encryptor = seal.Encryptor(self._ctx, key)
        self._evaluator = seal.Evaluator(self._ctx)
        first = self._ctx.first_context_data()
        self._first_parms_id = first.parms_id()
        self._primes = [mod.value() for mod in first.parms().coeff_modulus()]
        self._reply_parms_id = _level(self._ctx, REPLY_PRIMES).parms_id()

    def _owner_masks(self, T: int, m: int, seed: bytes | None, mask) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """R (T x m int64) and its limb masks: R_hi < 2^59 and R' < 2^59 with R = 2^5 R_hi - R' (mod 2^64)."""
        if seed is not None and mask is not None:
            raise ConfigError("give seed or mask, not both")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.int64 or tuple(mask.shape) != (T, m):
                raise ConfigError(f"mask must be a torch.int64 tensor of shape {(T, m)}")
            r = mask.contiguous().numpy().view(np.uint64)
            prg = Prg(fresh_seed(), "bfv_linear/low-mask")
        else:
            prg = Prg(fresh_seed() if seed is None else seed, "bfv_linear/mask")
            r = prg.uint64(T * m).reshape(T, m)
        u = prg.uint64(T * m).reshape(T, m) >> np.uint64(64 - (PLAIN_BITS - LOW_BITS))
        with np.errstate(over="ignore"):
            low = ((np.uint64(0) - r) & np.uint64((1 << LOW_BITS) - 1)) + (u << np.uint64(LOW_BITS))
            high = ((r + low) >> np.uint64(LOW_BITS)) & np.uint64(_T - 1)
        return torch.from_numpy(r.view(np.int64).copy()), high, low

    def _load_query(self, query, n: int) -> tuple[int, Packing, list[list[seal.Ciphertext]]]:
        parts = _check_list(query, "query")
        T, n_q, tw, nw = _unpack(_QUERY, parts[0], b"PLBQ", "query")
        _check_shape("query rows T", T, MAX_ROWS)
        if n_q != n:
            raise ProtocolError(f"query has n = {n_q} inputs, W has {n}")
        packing = Packing(tw, nw)
        if not packing.valid_for(2 * T, n):
            raise ProtocolError(f"query packing Tw={tw}, nw={nw} is invalid for T={T}, n={n}")
        row_blocks, input_blocks = packing.query_blocks(2 * T, n)
        parts = _check_list(query, "query", 1 + row_blocks * input_blocks)
        limit = max_ciphertext_bytes(len(self._primes))
        cts: list[list[seal.Ciphertext]] = []
        for k, data in enumerate(parts[1:]):
            if len(data) > limit:
                raise ProtocolError(f"query ciphertext {k} has {len(data)} bytes, accepted at most {limit}")
            ct = _load_ciphertext(self._scratch, self._ctx, data, self._first_parms_id, f"query ciphertext {k}")
            self._evaluator.transform_to_ntt_inplace(ct)
            if k % input_blocks == 0:
                cts.append([])
            cts[-1].append(ct)
        return T, packing, cts

    def _weight_plaintext(self, packing: Packing, block: np.ndarray, m: int) -> seal.Plaintext | None:
        if not block.any():
            return None
        coeffs = packing.weight_coefficients(block, m)
        plain = self._scratch.load(seal.Plaintext(), plaintext_bytes(coeffs), "weight plaintext", self._ctx)
        self._evaluator.transform_to_ntt_inplace(plain, self._first_parms_id)
        return plain

    def _evaluate(self, query, W: torch.Tensor, seed=None, mask=None):
        """Flooded, masked, re-randomized reply ciphertexts at the first data level, and R."""
        if not isinstance(W, torch.Tensor) or W.dtype != torch.int64 or W.dim() != 2:
            raise ConfigError("W must be a 2-D torch.int64 tensor")
        n, m = W.shape
        if not (1 <= n <= MAX_FEATURES and 1 <= m <= MAX_FEATURES):
            raise ConfigError(f"W has shape {tuple(W.shape)}, each side must be in [1, {MAX_FEATURES}]")
        bound = 1 << (WEIGHT_BITS - 1)
        if int(W.min()) < -bound or int(W.max()) >= bound:
            raise ConfigError(f"W entries must be signed {WEIGHT_BITS}-bit integers in [-2^19, 2^19)")
        T, packing, cts = self._load_query(query, n)
        R, high, low = self._owner_masks(T, m, seed, mask)
        limb_masks = np.concatenate([(np.uint64(0) - high) & np.uint64(_T - 1), low])  # hi rows get -R_hi
        weights = W.contiguous().numpy().view(np.uint64) & np.uint64(_T - 1)
        tw, nw, mw = packing.rows_per_block, packing.inputs_per_block, packing.outputs_per_block(m)
        output_blocks = packing.output_blocks(m)
        flood_prg = Prg(fresh_seed(), "bfv_linear/flood")
        replies: dict[tuple[int, int], seal.Ciphertext] = {}
        for bj in range(output_blocks):
            cols = slice(bj * mw, (bj + 1) * mw)
            plains = [
                self._weight_plaintext(packing, weights[bi * nw : (bi + 1) * nw, cols], m) for bi in range(len(cts[0]))
            ]
            for br, row_cts in enumerate(cts):
                acc = seal.Ciphertext(self._ctx)
                self._encryptor.encrypt_zero(acc)  # fresh public-key randomness in every reply
                products = self._dot(row_cts, plains)
                if products is not None:
                    self._evaluator.add_inplace(acc, products)
                rows_here, outs_here = min(tw, 2 * T - br * tw), min(mw, m - bj * mw)
                poly_mask = flood_prg.uint64(POLY_DEGREE) & np.uint64(_T - 1)
                positions = packing.result_positions(rows_here, outs_here, m)
                poly_mask[positions] = limb_masks[br * tw : br * tw + rows_here, cols][:, :outs_here]
                mask_plain = self._scratch.load(seal.Plaintext(), plaintext_bytes(poly_mask), "mask", self._ctx)
                self._evaluator.add_plain_inplace(acc, mask_plain)
                self._evaluator.add_inplace(acc, self._flood(flood_prg))
                replies[(br, bj)] = acc
        header = _REPLY.pack(b"PLBR", _VERSION, T, m, tw, nw, mw)
        return header, [replies[key] for key in sorted(replies)], R

    def _dot(self, row_cts: list, plains: list) -> seal.Ciphertext | None:
        """sum_i ct_i * plain_i in coefficient form; None when every plaintext is zero (SEAL refuses those)."""
        acc = None
        for ct, plain in zip(row_cts, plains):
            if plain is None:
                continue
            prod = seal.Ciphertext(self._ctx)
            self._evaluator.multiply_plain(ct, plain, prod)
            if acc is None:
                acc = prod
            else:
                self._evaluator.add_inplace(acc, prod)
        if acc is not None:
            self._evaluator.transform_from_ntt_inplace(acc)
        return acc

    def _flood(self, prg: Prg) -> seal.Ciphertext:
        c0 = flood_polynomial(self._primes, prg, self.flood_bits)
        polys = np.stack([c0, np.zeros_like(c0)])
        data = ciphertext_bytes(self._first_parms_id, polys)
        return self._scratch.load(seal.Ciphertext(self._ctx), data, "flood ciphertext", self._ctx)

    def multiply(self, query, W: torch.Tensor, *, seed=None, mask: torch.Tensor | None = None, compact=False):
        """(reply, R): reply for the user (list[bytes]), R the owner's share (torch.int64, T x m).

        R is ``mask`` when given, else derived from ``seed`` (16 bytes, permllm.prg) or fresh.
        compact: each reply ciphertext travels as its c1 and only the result coefficients of its c0
        (c0 enters decryption coefficient by coefficient), 7 + 4 bytes per residue pair, header PLBK.
        """
        header, cts, R = self._evaluate(query, W, seed=seed, mask=mask)
        T, m, tw, nw, mw = _REPLY.unpack(header)[2:]
        packing, output_blocks = Packing(tw, nw), -(-m // mw)
        primes = [mod.value() for mod in _level(self._ctx, REPLY_PRIMES).parms().coeff_modulus()]
        out = [b"PLBK" + header[4:] if compact else header]
        for k, ct in enumerate(cts):
            self._evaluator.mod_switch_to_inplace(ct, self._reply_parms_id)
            if not compact:
                out.append(self._scratch.dump(ct))
                continue
            br, bj = divmod(k, output_blocks)
            positions = packing.result_positions(min(tw, 2 * T - br * tw), min(mw, m - bj * mw), m).reshape(-1)
            out.append(compact_ciphertext(ct, positions, primes))
        return out, R
