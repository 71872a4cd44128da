"""permllm: private two-party LLM inference over an exact 64-bit ring with secure random permutations."""

__version__ = "0.1.0"
