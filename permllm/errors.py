"""Errors raised by permllm. Every failure a user can cause or meet surfaces as a PermLLMError."""


class PermLLMError(Exception):
    """Base class of every error permllm raises on purpose."""


class ChannelTimeout(PermLLMError):
    """A receive waited longer than its timeout; the message names the peer and the awaited tag."""


class PeerGone(PermLLMError):
    """The peer closed its end or stopped answering."""


class ProtocolError(PermLLMError):
    """A frame or message did not match what the protocol expects (tag, dtype, shape, order, size)."""


class AuthenticationRefused(PermLLMError):
    """The peer's CURVE server refused this party's key (ZAP denied it): the keys on the two sides differ."""


class MaterialExhausted(PermLLMError):
    """The offline correlated randomness is used up (prompt or token budget larger than prepared)."""


class MaterialMismatch(PermLLMError):
    """A protocol asked for correlated randomness of another kind or shape than was dealt next."""


class ConfigError(PermLLMError):
    """Bad user input or configuration, detected before any expensive work."""


class FixedPointOverflow(PermLLMError):
    """A fixed-point value outgrew the ring's headroom (|x| >= 2^62 at its scale)."""
