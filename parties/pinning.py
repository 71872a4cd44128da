"""The model fingerprint a user can pin with `permllm user --expect-fingerprint HEX`.

The welcome's "fingerprint" field hashes the public architecture (the helper and the user recompute
it, which catches a corrupted welcome); "weights_digest" is the owner's SHA-256 over its weight
tensors (names, dtypes, shapes and values). The model fingerprint is SHA-256 of the two together:
equal fingerprints mean the owner says it serves exactly these weights. It is the owner's own claim
(a semi-honest owner reports its weights truthfully), so it detects a swapped or misconfigured
model, not an owner that lies. The user checks it right after the welcome, before the HE context,
the helper plan or any prompt-dependent share leaves its process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import torch

from permllm.errors import ConfigError, ProtocolError

FINGERPRINT_HEX_LEN = 64


def weights_digest(weights) -> str:
    """SHA-256 (hex) of every tensor in a weights dataclass (DecoderWeights, EncoderWeights), walked in
    field order; each tensor contributes its path, dtype, shape and bytes. Float tensors are read as
    float64 (exact for float32), so a float32 load of a checkpoint has the digest of its float64 load."""
    digest = hashlib.sha256()
    for path, tensor in _tensors(weights, ""):
        t = tensor.detach().cpu()
        t = (t.to(torch.float64) if t.is_floating_point() else t).contiguous()
        digest.update(f"{path}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _tensors(value, path):
    if isinstance(value, torch.Tensor):
        yield path, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}[{i}]")


def model_fingerprint(welcome: dict) -> str:
    """SHA-256 (hex) of the welcome's architecture fingerprint and weights digest."""
    arch, weights = welcome.get("fingerprint"), welcome.get("weights_digest")
    if not isinstance(arch, str) or not isinstance(weights, str):
        raise ProtocolError("the owner's welcome carries no weights digest, so its model cannot be pinned")
    return hashlib.sha256(f"permllm-model\t{arch}\t{weights}".encode()).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """The --expect-fingerprint value in lower-case hex; ConfigError when it is not 64 hex digits."""
    value = text.strip().lower()
    if len(value) != FINGERPRINT_HEX_LEN or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(f"--expect-fingerprint must be {FINGERPRINT_HEX_LEN} hex digits, got {text!r:.80}")
    return value


def check_model_fingerprint(welcome: dict, expected: str | None, log) -> None:
    """Log the owner's model fingerprint; ProtocolError when `expected` is given and differs."""
    if expected is None:
        if "weights_digest" in welcome:
            log(f"user: the owner's model fingerprint is {model_fingerprint(welcome)}")
        return
    got = model_fingerprint(welcome)
    if not hmac.compare_digest(got, normalize_fingerprint(expected)):
        raise ProtocolError(
            f"the owner serves a different model: its fingerprint is {got}, --expect-fingerprint is {expected}; "
            "the session stopped before any share of the prompt was sent"
        )
    log(f"user: the owner's model fingerprint matches --expect-fingerprint ({got[:16]}...)")
