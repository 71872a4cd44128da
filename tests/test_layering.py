"""The layer rule, checked on the source: imports only run downwards.

    permllm            foundations: ring, fixed point, PRG, kernels, ring products, sharing,
                       transport, HE, sampling, plaintext model loading and reference
    netsim, protocols  beside each other, each on top of permllm only (protocols.model excluded)
    protocols.model    the secure model programs, composed from protocols
    parties            roles, session, CLI, launcher
    permllm_bench      harnesses (bench/permllm_bench): may use everything above

Every ``import`` and ``from ... import`` counts, also those inside functions, and so does
``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("permllm", "netsim", "protocols", "protocols.model", "parties", "permllm_bench")

# layer -> the project layers it may import (itself included)
ALLOWED = {
    "permllm": {"permllm"},
    "netsim": {"permllm", "netsim"},
    "protocols": {"permllm", "protocols"},
    "protocols.model": {"permllm", "protocols", "protocols.model"},
    "parties": {"permllm", "netsim", "protocols", "protocols.model", "parties"},
    "permllm_bench": set(PROJECT),
}

SOURCES = {
    "permllm": ROOT / "permllm",
    "netsim": ROOT / "netsim",
    "protocols": ROOT / "protocols",
    "parties": ROOT / "parties",
    "permllm_bench": ROOT / "bench" / "permllm_bench",
}


def layer_of_module(name: str) -> str | None:
    """The project layer a dotted module name belongs to, or None for third-party modules."""
    top = name.split(".")[0]
    if top == "protocols" and (name == "protocols.model" or name.startswith("protocols.model.")):
        return "protocols.model"
    return top if top in PROJECT else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "bench" if path.is_relative_to(ROOT / "bench") else ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, this_module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in a parsed module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = this_module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from protocols import model` reaches the layer above `protocols`
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def upward_imports(layer_root: Path, layer: str) -> list[str]:
    violations = []
    for path in sorted(layer_root.rglob("*.py")):
        name = module_name(path)
        own = layer_of_module(name) or layer
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in imported_names(tree, name, path.name == "__init__.py"):
            target_layer = layer_of_module(target)
            if target_layer is not None and target_layer not in ALLOWED[own]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {target} ({target_layer})")
    return violations


@pytest.mark.parametrize("layer", sorted(SOURCES))
def test_imports_only_run_downwards(layer):
    assert SOURCES[layer].is_dir(), f"layer {layer} has no source folder at {SOURCES[layer]}"
    assert upward_imports(SOURCES[layer], layer) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker's own power: a foundation module importing a protocol, also lazily, is reported."""
    fake = tmp_path / "permllm"
    fake.mkdir()
    (fake / "ring.py").write_text("def f():\n    from protocols.linear import linear\n")
    (fake / "he.py").write_text("import importlib\nimportlib.import_module('parties.roles')\n")
    (fake / "ok.py").write_text("import numpy\nfrom permllm import prg\n")
    found = []
    for path in sorted(fake.glob("*.py")):
        tree = ast.parse(path.read_text())
        found += [t for _, t in imported_names(tree, f"permllm.{path.stem}", False) if layer_of_module(t)]
    assert [t for t in found if layer_of_module(t) not in ALLOWED["permllm"]] == [
        "parties.roles",
        "protocols.linear",
        "protocols.linear.linear",
    ]
