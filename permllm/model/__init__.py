"""Model side of permllm: checkpoint loading, architecture mapping and a float64 plaintext reference.

Kept free of heavy imports; use the submodules directly:
``permllm.model.weights`` (dataclasses), ``permllm.model.loading`` (transformers-based loaders),
``permllm.model.reference`` (float64 plaintext forward passes), ``permllm.model.prompts``.
"""
