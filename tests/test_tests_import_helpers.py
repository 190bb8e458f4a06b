"""The tests' own rule: shared helpers live in tests/helpers.py. A test module never imports from
another test module or from conftest.py (conftest's fixtures reach tests by name, not by import).
Read from the source (ast), no imports run."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

TESTS = REPO / "tests"


def _forbidden(module: str, own: str) -> bool:
    """An import of another test module or of conftest, however it is spelled (a module may import
    itself, ``own``, to patch its own names)."""
    parts = module.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and parts[0] != own and (parts[0] == "conftest" or parts[0].startswith("test_"))


def imports_of_tests(path: Path) -> list[str]:
    """``path``'s imports of test modules or of conftest, as ``line: module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:   # from .test_x import y, from . import test_x
            names = [node.module] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [f"{node.lineno}: {n}" for n in names if _forbidden(n, path.stem)]
    return found


def test_no_test_module_imports_another_or_conftest() -> None:
    bad = {p.name: found for p in sorted(TESTS.glob("*.py")) if p.name != "conftest.py"
           if (found := imports_of_tests(p))}
    assert not bad, f"import shared helpers from tests.helpers (move them there): {bad}"


def test_the_check_finds_each_spelling(tmp_path: Path) -> None:
    module = tmp_path / "test_x.py"
    module.write_text("from tests.test_engine import say\nfrom tests.conftest import REPO\nimport tests.test_bus\n"
                      "from .test_phone import Bus\nfrom . import conftest\nfrom tests.helpers import say\n"
                      "import tests.test_x as me\n")
    assert imports_of_tests(module) == ["1: tests.test_engine", "2: tests.conftest", "3: tests.test_bus",
                                        "4: test_phone", "5: conftest"]
