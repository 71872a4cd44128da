"""BFV parameters of the token-id lookup (`permllm.he`) and the owner's checks of a received context.

The user picks the parameters; the owner accepts only the ones `IndexLookupClient` would pick:
N in SUPPORTED_POLY_MODULUS_DEGREES, SEAL's default coefficient modulus for N, and a batching
plain modulus (pinned to the vocabulary's when the owner states it). Every refusal is a
ProtocolError; nothing from the context is trusted before it is checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tenseal as ts

from permllm.errors import ConfigError, ProtocolError

SUPPORTED_POLY_MODULUS_DEGREES = (4096, 8192)
#: Largest vocabulary whose plain modulus (<= ~2^18) still leaves a safe noise budget at N = 4096.
MAX_VOCAB_SIZE = 1 << 18
#: Cap on a public context accepted by the owner (N=8192 contexts are ~52 MB).
DEFAULT_MAX_CONTEXT_BYTES = 96 << 20
_SERIALIZATION_SLACK = 16 << 10  # SEAL header + TenSEAL protobuf framing
#: Total coefficient-modulus bits at each level of SEAL's default BFV modulus chain, key level first
#: (N=4096: primes of 36, 36 and 37 bits; N=8192: 43, 43, 44, 44 and 44 bits). The owner accepts no other.
COEFF_MODULUS_CHAIN_BITS = {4096: (109, 72, 36), 8192: (218, 174, 130, 86, 43)}


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:  # deterministic for n < 3.3e24
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(poly_modulus_degree: int, at_least: int) -> int:
    """Smallest prime t with t = 1 (mod 2N) and t >= at_least (BFV batching plain modulus)."""
    step = 2 * poly_modulus_degree
    t = step * max(1, -(-(at_least - 1) // step)) + 1
    while not is_prime(t):
        t += step
    return t


def max_ciphertext_bytes(poly_modulus_degree: int, n_data_primes: int) -> int:
    """Upper bound on a serialized fresh 2-component ciphertext (uncompressed size + framing)."""
    return 2 * poly_modulus_degree * n_data_primes * 8 + _SERIALIZATION_SLACK


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}"


def check_int(name: str, value, error=ConfigError) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise error(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


@dataclass(frozen=True)
class PublicParameters:
    """What the owner reads from a checked public context."""

    context: ts.Context
    poly_modulus_degree: int
    plain_modulus: int
    log_q: int
    n_data_primes: int
    first_parms_id: object


def check_expectations(vocab_size: int | None, poly_modulus_degree: int | None) -> int | None:
    """Validate the owner's own pins (ConfigError); returns vocab_size as an int or None."""
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size)
        if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError(f"vocab_size must be in [1, {MAX_VOCAB_SIZE}], got {vocab_size}")
    if poly_modulus_degree is not None and poly_modulus_degree not in SUPPORTED_POLY_MODULUS_DEGREES:
        raise ConfigError(
            f"poly_modulus_degree must be one of {SUPPORTED_POLY_MODULUS_DEGREES}, got {poly_modulus_degree!r}"
        )
    return vocab_size


def load_public_context(
    public_context, *, vocab_size: int | None, poly_modulus_degree: int | None, max_context_bytes: int
) -> PublicParameters:
    """Parse the user's public context and check its parameters (see the module docstring).

    public_context: bytes of at most max_context_bytes; vocab_size / poly_modulus_degree: the
    owner's pins, or None. Returns the PublicParameters; raises ProtocolError on anything else.
    """
    if not isinstance(public_context, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"public context must be bytes, got {type(public_context).__name__}")
    if not 0 < len(public_context) <= max_context_bytes:
        raise ProtocolError(f"public context has {len(public_context)} bytes, accepted 1..{max_context_bytes}")
    try:
        ctx = ts.context_from(bytes(public_context))
    except Exception as exc:
        raise ProtocolError(f"public context is not a TenSEAL context ({describe_error(exc)})") from None
    if ctx.is_private() or ctx.has_secret_key():
        raise ProtocolError("public context carries a secret key; the owner refuses to hold it")
    try:
        first = ctx.seal_context().data.first_context_data()
        parms = first.parms()
        scheme = parms.scheme()
        n = int(parms.poly_modulus_degree())
        batching = bool(first.qualifiers().using_batching)
        t = 2 * int(first.plain_upper_half_threshold()) - 1
        log_q = int(first.total_coeff_modulus_bit_count())
        n_data_primes = int(first.chain_index()) + 1
        first_parms_id = ctx.seal_context().data.first_parms_id()
        chain_bits = []
        level = ctx.seal_context().data.key_context_data()
        while level is not None and len(chain_bits) <= 8:
            chain_bits.append(int(level.total_coeff_modulus_bit_count()))
            level = level.next_context_data()
    except Exception as exc:
        raise ProtocolError(f"public context has unreadable parameters ({describe_error(exc)})") from None
    if scheme != ts.SCHEME_TYPE.BFV.value:
        raise ProtocolError(f"public context must use BFV, got {scheme}")
    if n not in SUPPORTED_POLY_MODULUS_DEGREES:
        raise ProtocolError(f"poly_modulus_degree {n} not in {SUPPORTED_POLY_MODULUS_DEGREES}")
    if poly_modulus_degree is not None and n != poly_modulus_degree:
        raise ProtocolError(f"poly_modulus_degree {n}, the owner expects {poly_modulus_degree}")
    if tuple(chain_bits) != COEFF_MODULUS_CHAIN_BITS[n]:
        raise ProtocolError(
            f"coefficient modulus chain of {chain_bits} bits, the owner accepts only SEAL's default "
            f"{list(COEFF_MODULUS_CHAIN_BITS[n])} for N={n}"
        )
    if not batching or t % (2 * n) != 1:
        raise ProtocolError(f"plain modulus {t} does not support batching for N={n}")
    if vocab_size is not None and t != batching_prime(n, max(vocab_size, 2)):
        raise ProtocolError(
            f"plain modulus {t}, the owner expects {batching_prime(n, max(vocab_size, 2))} "
            f"for vocab {vocab_size} at N={n}"
        )
    if t > batching_prime(n, MAX_VOCAB_SIZE) or not is_prime(t):
        raise ProtocolError(f"plain modulus {t} is not a batching prime up to the one for vocab {MAX_VOCAB_SIZE}")
    if not ctx.has_public_key():
        raise ProtocolError("public context lacks the public key")
    if not ctx.has_galois_keys():
        raise ProtocolError("public context lacks Galois keys (needed for the slot sum)")
    return PublicParameters(ctx, n, t, log_q, n_data_primes, first_parms_id)
