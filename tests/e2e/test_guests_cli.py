"""`vmscope guest demo --out DIR [--arch aarch64]`, as the issue spells it.

The command writes the packaged ELF; gdb then knows `tick` and `counter`
from that file alone (checked in depth in test_guests_qemu.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import VmProcess, require_kvm
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


@pytest.mark.parametrize("accel", ["emu", "kvm"])
def test_guest_walk_written_then_booted_by_vmscope_run(tmp_path, accel):
    """The standard PVH guest, written by the CLI, boots under either back
    end from its 32-bit entry and finds the hvm_start_info through ebx."""
    if accel == "kvm":
        require_kvm()
    result = vmscope("guest", "walk", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "walk.elf").read_bytes() == guest_elf("walk").read_bytes()
    vm = VmProcess("--accel", accel, "--kernel", str(tmp_path / "walk.elf"), "--cpus", "2")
    try:
        vm.wait_for(r"walk guest: hvm_start_info ok\n", timeout=60)
    finally:
        vm.close()
