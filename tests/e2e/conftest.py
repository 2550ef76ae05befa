"""Everything in tests/e2e drives real processes (vmscope run, gdb, lldb,
qemu-system-*), so everything here carries the ``e2e`` marker: the directory
and ``-m e2e`` / ``-m "not e2e"`` select the same tests. Tests that run the
VMM or a target in this process belong in tests/unit (with ``kvm`` where
they need /dev/kvm); tests/unit/test_test_layout.py checks the imports that
keep the two apart."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
