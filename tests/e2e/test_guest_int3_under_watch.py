"""The guest's own INT3 while a page-protection watchpoint covers its GDT.

The idt guest keeps its GDT on the same page as ``counter`` and
``bp_count``. On this KVM a read or access watchpoint takes that page out
of the memory slots; when a vCPU then executes the guest's own ``int3``,
KVM cannot read the GDT to deliver the #BP and the guest triple faults
(CI saw it about once in sixteen ``rwatch`` runs, whenever a vCPU sat on
its ``int3`` as the guest resumed). Here the vCPU is put on that ``int3``
on purpose: the #BP must reach the guest's handler, the handler's access
to ``bp_count`` must be the watchpoint's hit, and the guest must run on.
"""

from __future__ import annotations

import re

import pytest
from tests.support import Gdb, VmProcess, elf_symbols, free_port, require_kvm


@pytest.mark.parametrize("accel", ["kvm", "emu"])
def test_guest_int3_reaches_its_handler_while_its_gdt_page_is_watched(accel):
    from vmscope.guests import guest_elf

    if accel == "kvm":
        require_kvm()
    elf = guest_elf("idt", "x86_64")
    symbols = elf_symbols(elf)
    port = free_port()
    vm = VmProcess("--accel", accel, "--cpus", "1", "--kernel", str(elf), gdb_port=port)
    gdb = None
    try:
        vm.wait_listening()
        gdb = Gdb(elf)
        gdb.cmd(f"target remote 127.0.0.1:{port}")
        gdb.cmd("hbreak guest_int3")
        out = gdb.cmd("continue", timeout=60)
        assert gdb.value("$pc") == symbols["guest_int3"], out
        gdb.cmd("delete")
        before = gdb.value("bp_count")
        assert "watchpoint" in gdb.cmd("awatch bp_count")
        out = gdb.cmd("continue", timeout=60)
        assert re.search(r"access \(read/write\) watchpoint \d+: bp_count", out), out + vm.stderr[-2000:]
        pc = gdb.value("$pc")
        assert symbols["bp_handler"] <= pc < symbols["putc"], f"stopped at {pc:#x}, not in bp_handler\n{out}"
        gdb.cmd("delete")
        gdb.cmd("hbreak tick")
        gdb.cmd("continue", timeout=60)
        gdb.cmd("delete")
        assert gdb.value("bp_count") == before + 1
        assert gdb.value("$pc") == symbols["tick"]
        gdb.cmd("detach")
        assert vm.proc.poll() is None, vm.stderr[-2000:]
        assert "triple fault" not in vm.stderr
    finally:
        if gdb is not None:
            gdb.close()
        vm.close()
