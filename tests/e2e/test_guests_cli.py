"""`vmscope guest demo --out DIR [--arch aarch64]`, as the issue spells it.

The command writes the packaged ELF; gdb then knows `tick` and `counter`
from that file alone (checked in depth in test_guests_qemu.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmscope.guests import guest_elf

ROOT = Path(__file__).resolve().parents[2]


def vmscope(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmscope", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("arch_args,arch", [((), "x86_64"), (("--arch", "aarch64"), "aarch64")])
def test_guest_demo_writes_the_elf_into_out(tmp_path, arch_args, arch):
    out = tmp_path / "new" / "dir"
    result = vmscope("guest", "demo", "--out", str(out), *arch_args)
    assert result.returncode == 0, result.stderr
    written = out / "demo.elf"
    assert written.read_bytes() == guest_elf("demo", arch).read_bytes()
    assert str(written) in result.stdout


def test_guest_demo_then_gdb_knows_tick_and_counter(tmp_path):
    result = vmscope("guest", "demo", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    gdb = subprocess.run(["gdb", "-nx", "-batch", str(tmp_path / "demo.elf"), "-ex", "info address tick",
                          "-ex", "ptype counter"], capture_output=True, text=True, timeout=60)
    assert 'Symbol "tick" is at 0x' in gdb.stdout, gdb.stdout + gdb.stderr
    assert "type = unsigned long" in gdb.stdout, gdb.stdout + gdb.stderr
