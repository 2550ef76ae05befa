"""The client and the AArch64 page-table walker against
``qemu-system-aarch64`` (TCG) running Debian's arm64 kernel.

No root file system is given, so the kernel boots to its "VFS: Unable to
mount root fs" panic and spins there with the MMU on: a stable state to
compare our page-table walk (TTBR0/TTBR1/TCR from QEMU's gdbstub, RAM from
QEMU's shared memfd, mapped at GPA 0x40000000) with QEMU's own ``gva2gpa``
and with the stub's virtual reads."""

from __future__ import annotations

import shutil

import pytest

from tests.support import free_port

from vmscope.client import Client
from vmscope.client.helpers.qemu import QemuMonitor
from vmscope.client.helpers.qemu_launch import QemuGuest
from vmscope.vmi import Aarch64Paging, AddressSpace, TranslationError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GDB_PORT, QMP_PORT = free_port(), free_port()  # free now: no clash with a parallel run


@pytest.fixture(scope="module")
def vm():
    if not shutil.which("qemu-system-aarch64"):
        pytest.fail("qemu-system-aarch64 is not installed")
    from vmscope.images.kernel import cloud_kernel

    kernel = cloud_kernel("arm64", quiet=True)
    guest = QemuGuest(str(kernel.vmlinuz), None, GDB_PORT, QMP_PORT, qemu="qemu-system-aarch64",
                      machine="virt", cmdline="console=ttyAMA0 panic=0", extra=["-cpu", "cortex-a57"],
                      ram_backend="memfd")  # found through QEMU's /proc/PID/fd, not a path
    with guest:
        guest.console.wait_for(b"end Kernel panic", timeout=300)
        client = Client.connect(guest.gdb, timeout=20)
        qmp = QemuMonitor(guest.qmp)
        try:
            yield client, qmp, guest
        finally:
            client.close()
            qmp.close()


def _walker(client, qmp):
    regs = {n: client.register(n) for n in ("TTBR0_EL1", "TTBR1_EL1", "TCR_EL1")}
    return Aarch64Paging(qmp.shared_ram(), regs["TTBR0_EL1"], regs["TTBR1_EL1"], regs["TCR_EL1"])


def test_registers_from_qemus_aarch64_description(vm):
    client, _, _ = vm
    assert client.arch == "aarch64"
    regs = client.registers()
    assert {"x0", "x30", "sp", "pc", "cpsr"} <= set(regs)
    assert regs["pc"] >> 48 == 0xFFFF  # a kernel address: TTBR1 half
    assert client.register("TCR_EL1") != 0 and client.register("TTBR1_EL1") != 0


def test_shared_ram_is_mapped_from_the_memory_tree_not_by_offset(vm):
    _, qmp, _ = vm
    ranges = [r for r in qmp.ram_ranges() if r.region == "mem"]
    assert ranges and ranges[0].gpa == 0x4000_0000 and ranges[0].offset == 0
    mem = qmp.shared_ram()
    assert mem.regions[0].gpa == 0x4000_0000
    assert any(mem.read(0x4000_0000, 1 << 20))


def test_walker_agrees_with_qemu_and_the_stub(vm):
    client, qmp, _ = vm
    walker = _walker(client, qmp)
    aspace = AddressSpace(walker)
    regs = client.registers()
    for va in (regs["pc"], regs["sp"], regs["pc"] & ~0xFFF):
        tr = walker.translate(va)
        qemu_says = qmp.hmp(f"gva2gpa 0x{va:x}").strip()
        assert qemu_says == f"gpa: 0x{tr.paddr:x}"
        assert aspace.read(va, 64) == client.read_memory(va, 64)
        assert client.read_memory(tr.paddr, 64, physical=True) == aspace.read(va, 64)
    text = walker.translate(regs["pc"]).page
    assert not text.user and not text.writable  # kernel text: EL1 only, read-only
    stack = walker.translate(regs["sp"]).page
    assert stack.writable and stack.nx


def test_unmapped_kernel_address_names_the_level(vm):
    client, qmp, _ = vm
    walker = _walker(client, qmp)
    va = 0xFFFF_0000_0000_0000  # bottom of TTBR1's 48-bit range: nothing maps it
    with pytest.raises(TranslationError) as exc:
        walker.translate(va)
    assert exc.value.level.startswith("L") and "0xffff000000000000" in str(exc.value)
    assert "No page" in qmp.hmp(f"gva2gpa 0x{va:x}") or "Unmapped" in qmp.hmp(f"gva2gpa 0x{va:x}")


def test_step_moves_the_pc(vm):
    client, _, _ = vm
    before = client.register("pc")
    stop = client.step()
    assert stop.kind == "signal" and stop.signal == 5
    after = client.register("pc")
    assert after != before and after >> 48 == 0xFFFF


def test_linux_layer_on_arm64_kaslr_ps_and_dmesg(vm, capsys):
    """Debian's arm64 kernel has no data symbols in kallsyms (no
    CONFIG_KALLSYMS_ALL): the task walk starts at the running task (SP_EL0),
    BTF is found by its header and the log buffer through VMCOREINFO. What
    we read must match what the kernel printed on its console."""
    import json
    import re

    from vmscope.client.inspect_cli import main as inspect_main

    client, qmp, guest = vm
    client.close()  # one debugger and one QMP client at a time: inspect attaches itself
    qmp.close()
    try:
        serial = guest.console.buf.decode(errors="replace").replace("\r", "")
        offset = int(re.search(r"Kernel Offset: (0x[0-9a-f]+) from", serial).group(1), 16)
        args = ["--gdb", guest.gdb, "--qmp", guest.qmp, "--json"]
        assert inspect_main([*args, "info"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert int(info["kaslr_slide"], 16) == offset
        assert inspect_main([*args, "ps"]) == 0
        ps = json.loads(capsys.readouterr().out)
        assert [(r["pid"], r["comm"]) for r in ps[:3]] == [(0, "swapper/0"), (1, "swapper/0"), (2, "kthreadd")]
        assert all(r["kind"] == "kernel" for r in ps if r["pid"] > 1)  # pid 1 panicked before becoming init
        assert inspect_main([a for a in args if a != "--json"] + ["dmesg"]) == 0
        log = capsys.readouterr().out.splitlines()
        console = [line for line in serial.splitlines() if line.startswith("[")]
        assert "Kernel panic" in log[-1]
        for line in console[-3:]:  # the console's last line may still be arriving: compare prefixes
            assert any(ours.startswith(line) for ours in log[-3:]), (line, log[-3:])
    finally:  # later tests get their connections back
        client.__dict__.update(Client.connect(guest.gdb, timeout=20).__dict__)
        qmp.__dict__.update(QemuMonitor(guest.qmp).__dict__)
