"""Bad input gives one clear line and exit status 1, never a traceback or a
hang: a guest frozen at reset (``qemu -S``: no kernel, paging off),
unmapped and non-canonical addresses, memory outside RAM, a stub that is
not there, and malformed arguments."""

from __future__ import annotations

import shutil
import socket

import pytest

from vmscope.client.helpers.qemu_launch import QemuGuest
from vmscope.client.inspect_cli import main as inspect_main

pytestmark = pytest.mark.timeout(300)

GDB_PORT, QMP_PORT, NOBODY_PORT = 16130, 16131, 16139


@pytest.fixture(scope="module")
def frozen():
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed")
    from vmscope.images.linux import build_linux_guest

    image = build_linux_guest(mode="shell", quiet=True)
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), GDB_PORT, QMP_PORT, extra=["-S"]) as vm:
        yield vm


def run(capsys, vm, *args):
    rc = inspect_main(["--gdb", vm.gdb, "--qmp", vm.qmp, *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_no_kernel_yet(frozen, capsys):
    rc, _, err = run(capsys, frozen, "ps")
    assert rc == 1 and "no kernel image mapped" in err and "0xffffffff80000000" in err


def test_registers_still_work_at_reset(frozen, capsys):
    rc, out, _ = run(capsys, frozen, "regs")
    assert rc == 0 and "cr0" in out and "efer" in out


def test_translate_with_paging_off_says_so(frozen, capsys):
    rc, _, err = run(capsys, frozen, "translate", "0x1000")
    assert rc == 1 and "paging is off" in err


def test_non_canonical_and_unmapped_addresses_name_address_and_level(frozen, capsys):
    rc, _, err = run(capsys, frozen, "translate", "--cr3", "0x0", "0x8000000000000000")
    assert rc == 1 and "0x8000000000000000" in err and "non-canonical" in err and "PML4" in err


def test_physical_read_outside_ram(frozen, capsys):
    rc, _, err = run(capsys, frozen, "read", "--physical", "0x7fffffff000", "16")
    assert rc == 1 and "0x7fffffff000" in err and "not backed" in err
    rc, out, _ = run(capsys, frozen, "read", "--physical", "0x100000", "16")
    assert rc == 0 and out.startswith("0000000000100000")


def test_malformed_arguments(frozen, capsys):
    with pytest.raises(SystemExit) as exc:
        inspect_main(["--gdb", frozen.gdb, "read", "0xZZ", "16"])
    assert exc.value.code == 2 and "not a number" in capsys.readouterr().err
    assert inspect_main(["ps"]) == 2 and "--gdb" in capsys.readouterr().err
    assert inspect_main(["--gdb", "nohostport", "ps"]) == 1
    assert "HOST:PORT" in capsys.readouterr().err


def test_nobody_listening(capsys):
    with socket.socket() as s:  # make sure the port is free, then leave it closed
        s.bind(("127.0.0.1", NOBODY_PORT))
    rc = inspect_main(["--gdb", f"127.0.0.1:{NOBODY_PORT}", "regs"])
    err = capsys.readouterr().err
    assert rc == 1 and "refused" in err.lower()
