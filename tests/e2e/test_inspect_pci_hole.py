"""Shared RAM across QEMU's PCI hole: with 4 GiB, the ``pc`` machine puts
3 GiB below 4 GiB and the rest at 4 GiB, while the backing file continues
at 3 GiB. Physical reads through the mapped file must equal QEMU's own
physical reads (over RSP) on both sides of the hole, and the Linux layer
must see the same processes either way. The RAM file is sparse: only the
pages the guest touches use host memory.

The guest runs on ``-cpu max``, which offers LA57, so Debian's kernel
switches to 5-level paging: the same tests walk 5-level tables of a real
kernel."""

from __future__ import annotations

import json
import shutil

import pytest

from vmscope.client import Client
from vmscope.client.helpers.qemu import QemuMonitor
from vmscope.client.helpers.qemu_launch import QemuGuest
from vmscope.client.inspect_cli import main as inspect_main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GDB_PORT, QMP_PORT = 16110, 16111


@pytest.fixture(scope="module")
def vm():
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed")
    from vmscope.images.linux import READY_MARKER, build_linux_guest

    image = build_linux_guest(mode="shell", quiet=True)
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), GDB_PORT, QMP_PORT, memory_mib=4096,
                   extra=["-cpu", "max"]) as guest:
        guest.console.wait_for(READY_MARKER.encode())
        guest.console.run("true")
        yield guest


def test_ram_above_4g_maps_to_the_file_after_low_ram(vm):
    qmp = QemuMonitor(vm.qmp)
    try:
        ranges = [r for r in qmp.ram_ranges() if r.region == "mem"]
        high = [r for r in ranges if r.gpa >= 1 << 32]
        assert high and high[0].gpa == 1 << 32 and high[0].offset < 1 << 32  # not offset == address
        mem = qmp.shared_ram()
        with Client.connect(vm.gdb) as c:
            top = high[0].gpa + high[0].size
            # The kernel's struct pages for high memory live near the top: non-zero data.
            for addr in (top - (1 << 20), high[0].gpa, 0x100000):
                ours = mem.read(addr, 4096)
                assert ours == c.read_memory(addr, 4096, physical=True)
            assert any(mem.read(top - (1 << 20), 1 << 20))
            c.detach()
    finally:
        qmp.close()


def test_ps_is_the_same_through_shared_ram_and_rsp(vm, capsys):
    def ps(memory: str):
        rc = inspect_main(["--gdb", vm.gdb, "--qmp", vm.qmp, "--memory", memory, "--json", "ps"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        return [(r["pid"], r["ppid"], r["comm"]) for r in json.loads(out.out)]

    shared = ps("shared")
    assert len(shared) > 20 and shared[1][2] == "init"
    assert ps("rsp") == shared


def test_writes_through_shared_ram_and_rsp_meet(vm):
    """A write through the mapped file is what QEMU reads, and the reverse;
    the guest is stopped while the stub is attached and the bytes are
    restored before it runs again."""
    qmp = QemuMonitor(vm.qmp)
    try:
        mem = qmp.shared_ram(writable=True)
        high = [r for r in qmp.ram_ranges() if r.region == "mem" and r.gpa >= 1 << 32][0]
        addr = high.gpa + high.size // 2
        with Client.connect(vm.gdb) as c:
            original = mem.read(addr, 32)
            try:
                mem.write(addr, b"written-via-shared-ram-file!!!!!")
                assert c.read_memory(addr, 32, physical=True) == b"written-via-shared-ram-file!!!!!"
                c.write_memory(addr, b"written-over-rsp-phys-mode......", physical=True)
                assert mem.read(addr, 32) == b"written-over-rsp-phys-mode......"
            finally:
                mem.write(addr, original)
            assert c.read_memory(addr, 32, physical=True) == original
            c.detach()
    finally:
        qmp.close()


def test_a_real_kernel_on_5_level_paging(vm, capsys):
    from vmscope.client.session import Inspector

    with Inspector(vm.gdb, vm.qmp) as ins:
        assert ins.registers()["cr4"] & (1 << 12), "QEMU's -cpu max should give the guest LA57"
        kernel = ins.kernel()
        assert kernel.aspace.walker.levels == 5
        tr = kernel.aspace.translate(kernel.symbols["init_task"])
        assert not tr.page.user and tr.page.nx  # kernel data: supervisor, not executable
        assert ins.client.read_memory(tr.paddr, 64, physical=True) == kernel.read(kernel.symbols["init_task"], 64)
