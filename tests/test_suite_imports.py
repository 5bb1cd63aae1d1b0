"""The test suite's own layout rule: tests do not import other tests.

A helper two test files share lives in ``testsupport/`` (which ``bench/`` imports too); a ``conftest.py``
only defines fixtures. Importing a ``test_*`` module runs its module-level code and collects its tests
a second time under another name; importing a ``conftest`` bypasses pytest's fixture scoping. Static:
the imports are read from the source (``ast``), nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from testsupport.processes import ROOT


def imported_modules(path: Path, package: tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """``(line, dotted module name)`` of every import in ``path``, relative ones resolved against
    ``package`` (default: the package ``path`` is in below ROOT)."""
    if package is None:
        package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.append((node.lineno, module))
            # ``from tests import test_api`` names a module in the imported names
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def is_test_module(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
                 for path in sources("tests", "testsupport", "bench")
                 for line, module in imported_modules(path)
                 if is_test_module(module) and module.split(".")[0] in ("tests", "testsupport", "bench")]
    assert offenders == [], "move the shared helper into testsupport/:\n" + "\n".join(offenders)


def test_testsupport_imports_no_tests_and_no_pytest() -> None:
    # bench/ imports testsupport outside pytest, so nothing in it may need either.
    offenders = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
                 for path in sources("testsupport")
                 for line, module in imported_modules(path)
                 if module.split(".")[0] in ("tests", "pytest", "_pytest")]
    assert offenders == []


def test_the_rule_sees_each_way_of_importing(tmp_path: Path) -> None:
    # The check itself must be able to fail: every import form of a test module is caught.
    sample = tmp_path / "sample.py"
    sample.write_text("from tests.test_api import H\nimport tests.mongo.test_e2e_mongo\nfrom tests import conftest\n"
                      "from . import test_workpool\nfrom .support import EXAMPLE\n")
    caught = sorted(m for _, m in imported_modules(sample, ("tests", "offline")) if is_test_module(m))
    assert caught == ["tests.conftest", "tests.mongo.test_e2e_mongo", "tests.offline.test_workpool", "tests.test_api"]
