"""The test suite's own layout rules, checked on its source:

- no test module imports another test module (shared helpers live in
  tests/support.py, tests/kvm_support.py, tests/emu_support.py), so a test
  file can move or change without breaking another;
- tests in tests/unit run in this process: they start no ``vmscope run``,
  interactive gdb or QEMU (that is what tests/e2e, marked ``e2e``, is for).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
MODULES = sorted(p for p in TESTS.rglob("*.py") if p.name.startswith("test_"))
PROCESS_HELPERS = {"VmProcess", "Gdb", "QemuGuest"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_module_imports_another(path):
    for module, _ in _imports(path):
        last = module.rsplit(".", 1)[-1]
        assert not (module.startswith("tests") and last.startswith("test_")), \
            f"{path.relative_to(TESTS)} imports {module}: move the shared helper to tests/support.py"
        assert not module.endswith("conftest"), \
            f"{path.relative_to(TESTS)} imports {module}: conftest modules are pytest's, not helpers"


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent.name == "unit"], ids=lambda p: p.name)
def test_unit_tests_start_no_vm_debugger_or_qemu_process(path):
    used = {name for _, names in _imports(path) for name in names} & PROCESS_HELPERS
    assert not used, f"{path.name} uses {sorted(used)}: it drives real processes, so it belongs in tests/e2e"
