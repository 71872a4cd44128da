"""Private token-id recovery with BFV (TenSEAL): the user learns table[j], the owner learns nothing.

Setting. At every generated token the owner reveals the logits to the user under a fresh secret
permutation: the user sees z = logits[perm] and picks a permuted index j. The true token id is
perm[j]. This module lets the user obtain perm[j] without revealing j to the owner and without the
owner revealing the rest of perm.

Protocol (one round trip per token; the public context travels once per session)::

    user  (IndexLookupClient)                          owner (IndexLookupServer)
    ctx = BFV keys (secret key stays here)
    public_context()  --------- bytes --------------->  IndexLookupServer(public_context)
    query(j)          --------- list[bytes] --------->  answer(query, table=perm)
    decode(reply)     <-------- bytes ----------------
      == table[j]

- The vocabulary is split into ``n_chunks = ceil(vocab / S)`` chunks of ``S = N/2`` slots (one BFV
  batching row; TenSEAL's BFV ``sum`` rotates within a row, larger steps fail with "step count too
  large"). Chunk c of the query encrypts the slice c of one-hot(j), zero-padded to S.
- The owner computes acc = sum_c query_c * table_c (slot-wise, plaintext multiply), then the row sum
  (log2 S rotations), so every slot of row 0 holds sum_i onehot_i * table_i = table[j] and row 1 holds
  0: no slot carries any other table entry. Then it adds a flooding encryption of zero (below) and
  returns that single ciphertext.
- All wire data is TenSEAL's own ``serialize()`` output; nothing is pickled.

Parameters. ``poly_modulus_degree = N = 4096`` (the default) is the smallest ring that works: N = 2048
has too little noise budget for one plaintext multiply at a 17-bit plain modulus. The coefficient
modulus is SEAL's 128-bit-secure default (N=4096: 36+36+37 bits; N=8192: 43+43+44+44+44 bits). The
plain modulus is the smallest prime t = 1 (mod 2N) with t >= vocab_size (65537 for vocab 49152).
For vocab 49152 and N=4096 the query is 24 ciphertexts and the reply one; the public context carries
Galois keys for all power-of-two row steps (TenSEAL cannot generate a subset). N=8192 takes 12 chunks
and larger ciphertexts and context, but leaves room for a real (about 40-bit) noise flood, see below.

What each side learns (semi-honest parties):

- Owner: only ciphertexts under the user's key (RLWE semantic security) whose number and sizes do
  not depend on j, and it runs a fixed circuit. Nothing about j or the token.
- User: table[j] from the slots. The reply is one ciphertext; slot-wise it carries exactly table[j]
  (row 0) and 0 (row 1). Even a user who deviates and sends a non-one-hot query gets a single value
  sum_i q_i * table_i mod t (about 16 bits), never whole chunks.
- Residual leakage, NOT hidden: the user holds the secret key, so it can compute the decryption
  noise of the reply. That noise is a linear function of the table's plaintext polynomials and of
  the user's own query noise (which the user also knows): TenSEAL (SEAL) provides no circuit
  privacy. The owner mitigates by adding ``Enc_pk(0) * R`` (fresh public-key encryption of zero,
  scaled by a secret random integer R made of several random factors). This also re-randomizes the
  ciphertext components. R is chosen as large as the noise budget allows while keeping >= 12 bits of
  decryption margin (checked against SEAL's invariant_noise_budget for N in {4096, 8192} and vocab
  sizes 10..2^18): with N=8192 the flood exceeds the table-dependent noise by about 38-40 bits
  (heuristic noise flooding); with the default N=4096 only by about 0-7 bits (3 at vocab 49152), i.e.
  a partial, heuristic smudging that leaves most of the noise leakage in place. Statistical circuit
  privacy would need noise flooding with a proven distribution or bootstrapping, neither of which
  TenSEAL exposes.

Errors: malformed wire data raises :class:`permllm.errors.ProtocolError` (checked sizes first, then
TenSEAL parsing, every native exception wrapped); bad local arguments raise
:class:`permllm.errors.ConfigError`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import tenseal as ts

from permllm.errors import ConfigError, ProtocolError
from permllm.he_params import (
    COEFF_MODULUS_CHAIN_BITS,
    DEFAULT_MAX_CONTEXT_BYTES,
    MAX_VOCAB_SIZE,
    SUPPORTED_POLY_MODULUS_DEGREES,
    batching_prime,
    check_expectations,
    check_int,
    describe_error,
    load_public_context,
    max_ciphertext_bytes,
)
from permllm.he_params import is_prime as _is_prime  # noqa: F401  (importable from here as before)

__all__ = [
    "IndexLookupClient",
    "IndexLookupServer",
    "SUPPORTED_POLY_MODULUS_DEGREES",
    "MAX_VOCAB_SIZE",
    "DEFAULT_MAX_CONTEXT_BYTES",
    "COEFF_MODULUS_CHAIN_BITS",
    "batching_prime",
    "max_ciphertext_bytes",
]

#: Bits of decryption noise budget the flood must leave untouched (measured estimates are within a
#: few bits; a negative budget would silently decrypt to a wrong token id).
_FLOOD_MARGIN_BITS = 12
#: Target gap between the flood and the table-dependent noise (statistical flooding needs ~40).
_FLOOD_TARGET_BITS = 40


class IndexLookupClient:
    """User side: holds the BFV secret key, encrypts one-hot(j) queries and decrypts replies.

    Parameters
    ----------
    vocab_size:
        Number of (permuted) positions, 1 <= vocab_size <= MAX_VOCAB_SIZE. Replies must decode to a
        value < vocab_size (token ids), otherwise ``decode`` raises ProtocolError.
    poly_modulus_degree:
        BFV ring degree N, 4096 (default; smallest and fastest) or 8192 (about 2.5x larger queries and
        an 8x larger public context, but room for a ~40-bit noise flood on the owner side).
    seed:
        Accepted for signature symmetry with the rest of permllm and stored as ``self.seed``; it has
        NO effect: SEAL draws keys and encryption randomness from its own CSPRNG and TenSEAL offers no
        way to seed it, so keys and ciphertexts are never reproducible.
    """

    def __init__(self, vocab_size: int, *, poly_modulus_degree: int = 4096, seed=None) -> None:
        vocab_size = check_int("vocab_size", vocab_size)
        if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError(f"vocab_size must be in [1, {MAX_VOCAB_SIZE}], got {vocab_size}")
        n = check_int("poly_modulus_degree", poly_modulus_degree)
        if n not in SUPPORTED_POLY_MODULUS_DEGREES:
            raise ConfigError(f"poly_modulus_degree must be one of {SUPPORTED_POLY_MODULUS_DEGREES}, got {n}")
        self.vocab_size = vocab_size
        self.poly_modulus_degree = n
        self.seed = seed
        self.chunk_slots = n // 2
        self.n_chunks = -(-vocab_size // self.chunk_slots)
        self.plain_modulus = batching_prime(n, max(vocab_size, 2))
        self._ctx = ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=n,
            plain_modulus=self.plain_modulus,
            encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
        )
        self._ctx.generate_galois_keys()  # the owner's row sum rotates by powers of two
        n_data_primes = self._ctx.seal_context().data.first_context_data().chain_index() + 1
        self.max_reply_bytes = max_ciphertext_bytes(n, n_data_primes)
        self._public: bytes | None = None

    def public_context(self) -> bytes:
        """Serialized context with public key and Galois keys, no secret key, no relin keys."""
        if self._public is None:
            self._public = self._ctx.serialize(
                save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=False
            )
        return self._public

    def query(self, j: int) -> list[bytes]:
        """Encrypt one-hot(j) as ``n_chunks`` ciphertexts of ``chunk_slots`` slots each."""
        j = check_int("j", j)
        if not 0 <= j < self.vocab_size:
            raise ConfigError(f"j must be in [0, {self.vocab_size}), got {j}")
        s = self.chunk_slots
        zeros = [0] * s
        hot_chunk, hot_slot = divmod(j, s)
        out = []
        for c in range(self.n_chunks):
            if c == hot_chunk:
                vec = list(zeros)
                vec[hot_slot] = 1
            else:
                vec = zeros
            out.append(ts.bfv_vector(self._ctx, vec).serialize())
        return out

    def decode(self, reply: bytes) -> int:
        """Decrypt the owner's reply to table[j] (an int in [0, vocab_size))."""
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"reply must be bytes, got {type(reply).__name__}")
        if not 0 < len(reply) <= self.max_reply_bytes:
            raise ProtocolError(f"reply has {len(reply)} bytes, expected 1..{self.max_reply_bytes}")
        try:
            vec = ts.bfv_vector_from(self._ctx, bytes(reply))
            cts = vec.ciphertext()
            if vec.size() != 1 or len(cts) != 1 or cts[0].size() != 2:
                raise ProtocolError("reply must be one 2-component ciphertext of vector size 1")
            value = int(vec.decrypt()[0]) % self.plain_modulus
        except ProtocolError:
            raise
        except Exception as exc:  # TenSEAL/SEAL raise ValueError/RuntimeError/TypeError
            raise ProtocolError(f"malformed reply ciphertext ({describe_error(exc)})") from None
        if value >= self.vocab_size:
            raise ProtocolError(
                f"reply decodes to {value}, outside [0, {self.vocab_size}): wrong table or corrupted reply"
            )
        return value


class IndexLookupServer:
    """Owner side: evaluates table[j] on the user's encrypted one-hot query; never sees a secret key.

    Parameters
    ----------
    public_context:
        Bytes from :meth:`IndexLookupClient.public_context`. Must be a BFV batching context with
        public key and Galois keys and WITHOUT secret key (refused otherwise), N in
        SUPPORTED_POLY_MODULUS_DEGREES, at most ``max_context_bytes`` long.
    vocab_size:
        The table size the owner will answer for. When given, the plain modulus must be exactly
        ``batching_prime(N, max(vocab_size, 2))`` (what IndexLookupClient picks) and queries must
        have ``ceil(vocab_size / (N/2))`` chunks; otherwise any batching prime up to the one for
        MAX_VOCAB_SIZE is accepted.
    poly_modulus_degree:
        When given, the only accepted N (else any of SUPPORTED_POLY_MODULUS_DEGREES).
    max_context_bytes:
        Size cap applied before parsing.

    The coefficient modulus must be SEAL's default for N (COEFF_MODULUS_CHAIN_BITS), whatever the
    arguments: a peer choosing its own modulus could weaken the keys or the noise flood.

    ``answer`` computes sum_c query_c * table_c, row-sums it (every slot of row 0 = table[j], row 1
    = 0), then adds ``Enc_pk(0) * R`` for a secret random R (see the module docstring: re-randomizes
    the ciphertext and partially floods the noise; circuit privacy is NOT provided by TenSEAL, the
    key-holding user can still read table-dependent decryption noise, heavily at N=4096).
    """

    def __init__(
        self,
        public_context: bytes,
        *,
        vocab_size: int | None = None,
        poly_modulus_degree: int | None = None,
        max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
    ) -> None:
        vocab_size = check_expectations(vocab_size, poly_modulus_degree)
        params = load_public_context(
            public_context,
            vocab_size=vocab_size,
            poly_modulus_degree=poly_modulus_degree,
            max_context_bytes=max_context_bytes,
        )
        ctx, n, t = params.context, params.poly_modulus_degree, params.plain_modulus
        log_q, n_data_primes, first_parms_id = params.log_q, params.n_data_primes, params.first_parms_id
        self._ctx = ctx
        self.poly_modulus_degree = n
        self.plain_modulus = t
        self.chunk_slots = n // 2
        self.vocab_size = vocab_size
        self._log_q = log_q
        self._first_parms_id = first_parms_id
        self.max_chunk_bytes = max_ciphertext_bytes(n, n_data_primes)

    @property
    def context(self) -> ts.Context:
        """The deserialized public TenSEAL context (for inspection; holds no secret key)."""
        return self._ctx

    def expected_chunks(self, table_size: int) -> int:
        return -(-int(table_size) // self.chunk_slots)

    def check_query_count(self, count: int, table_size: int) -> None:
        """Refuse (ProtocolError) a query announcing other than expected_chunks(table_size) ciphertexts,
        before any of them is received."""
        expected = self.expected_chunks(table_size)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count != expected:
            raise ProtocolError(f"query has {count!r} chunks (ciphertexts), expected {expected}")

    def _flood_factors(self, n_chunks: int) -> list[int]:
        """Secret random factors whose product R scales a fresh Enc(0) into the noise flood.

        Noise-budget model (bits, calibrated with SEAL's invariant_noise_budget on these parameters,
        within ~3 bits): fresh = log q - log t - 8; answer growth G = log t + log N / 2 +
        log(n_chunks) / 2 + 0.75 log S + 2. R takes min(G + 40, fresh - margin) bits.
        """
        log_t = math.log2(self.plain_modulus)
        n = self.poly_modulus_degree
        fresh = self._log_q - log_t - 8
        growth = log_t + math.log2(n) / 2 + math.log2(max(n_chunks, 1)) / 2 + 0.75 * math.log2(n // 2) + 2
        r_bits = min(growth + _FLOOD_TARGET_BITS, fresh - _FLOOD_MARGIN_BITS)
        total = max(2, math.floor(r_bits))
        per_factor_max = max(2, math.floor(log_t) - 2)  # every factor < t/4: a plain scalar, no wrap
        k = max(1, math.ceil(total / per_factor_max))
        widths = [total // k + (1 if i < total % k else 0) for i in range(k)]  # sum(widths) == total
        # factor i is uniform in [2^(w-1), 2^w): R in [2^(total-k), 2^total), never 0 mod t
        return [(1 << (w - 1)) + secrets.randbelow(1 << (w - 1)) for w in widths]

    def _load_chunks(self, query: Sequence[bytes], expected: int) -> list:
        if not isinstance(query, (list, tuple)):
            raise ProtocolError(f"query must be a list of bytes, got {type(query).__name__}")
        self.check_query_count(len(query), expected * self.chunk_slots)
        for i, chunk in enumerate(query):
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise ProtocolError(f"query chunk {i} must be bytes, got {type(chunk).__name__}")
            if not 0 < len(chunk) <= self.max_chunk_bytes:
                raise ProtocolError(f"query chunk {i} has {len(chunk)} bytes, accepted 1..{self.max_chunk_bytes}")
        vectors = []
        for i, chunk in enumerate(query):
            try:
                vec = ts.bfv_vector_from(self._ctx, bytes(chunk))
                cts = vec.ciphertext()
                ok = (
                    vec.size() == self.chunk_slots
                    and len(cts) == 1
                    and cts[0].size() == 2
                    and not cts[0].is_ntt_form()
                    and cts[0].parms_id() == self._first_parms_id
                )
            except Exception as exc:
                raise ProtocolError(f"query chunk {i} is not a BFV ciphertext ({describe_error(exc)})") from None
            if not ok:
                raise ProtocolError(
                    f"query chunk {i} must be one fresh 2-component ciphertext of {self.chunk_slots} slots"
                )
            vectors.append(vec)
        return vectors

    def _check_table(self, table: np.ndarray) -> np.ndarray:
        if not isinstance(table, np.ndarray) or table.ndim != 1 or table.size == 0:
            raise ConfigError("table must be a non-empty 1-D numpy array")
        if self.vocab_size is not None and table.size != self.vocab_size:
            raise ConfigError(f"table has {table.size} entries, this server was pinned to vocab {self.vocab_size}")
        if not np.issubdtype(table.dtype, np.integer):
            raise ConfigError(f"table must have an integer dtype, got {table.dtype}")
        table = table.astype(np.int64, copy=False)
        lo, hi = int(table.min()), int(table.max())
        if lo < 0 or hi >= self.plain_modulus:
            raise ConfigError(
                f"table values must be in [0, {self.plain_modulus}) (the plain modulus), got [{lo}, {hi}]"
            )
        return table

    def answer(self, query: Sequence[bytes], table: np.ndarray) -> bytes:
        """Return one ciphertext encrypting table[j] in every slot of row 0 (0 in row 1)."""
        table = self._check_table(table)
        s = self.chunk_slots
        n_chunks = self.expected_chunks(table.size)
        vectors = self._load_chunks(query, n_chunks)
        padded = np.zeros(n_chunks * s, dtype=np.int64)
        padded[: table.size] = table
        try:
            acc = None
            for c, vec in enumerate(vectors):
                part = padded[c * s : (c + 1) * s]
                if not part.any():  # the product would be transparent; contributes nothing
                    continue
                prod = vec.mul(part.tolist())
                acc = prod if acc is None else acc.add_(prod)
            if acc is None:  # all-zero table
                acc = ts.bfv_vector(self._ctx, [0] * s)
            result = acc.sum()
            flood = ts.bfv_vector(self._ctx, [0])
            for factor in self._flood_factors(n_chunks):
                flood.mul_(factor)
            result.add_(flood)
            return result.serialize()
        except Exception as exc:
            raise ProtocolError(f"homomorphic evaluation failed on this query ({describe_error(exc)})") from None
