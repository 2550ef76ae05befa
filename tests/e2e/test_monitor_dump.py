"""``monitor dump PATH`` in vmscope's own stub: the VMM writes the stopped
guest as an ELF core (QEMU's dump-guest-memory format) from its own RAM;
``vmscope inspect --core`` and our reader see the same RAM and registers
the stub reports, and the guest runs on after the debugger leaves."""

from __future__ import annotations

import time

import pytest
from elftools.elf.elffile import ELFFile

from tests.support import VmProcess, free_port, require_kvm

pytestmark = pytest.mark.e2e


def test_monitor_dump_writes_a_core_of_the_stopped_guest(tmp_path):
    require_kvm()
    from vmscope.client import Client
    from vmscope.dump.elfcore import CoreFile
    from vmscope.guests import guest_elf

    vm = VmProcess("--accel", "kvm", "--cpus", "2", "--mem", "64", gdb_port=free_port())
    try:
        vm.wait_listening()
        c = Client.connect(f"127.0.0.1:{vm.port}", timeout=30)
        c.resume()
        time.sleep(0.5)
        c.halt(timeout=10)
        path = tmp_path / "guest.core"
        said = c.monitor(f"dump {path}")
        assert "wrote" in said and "64 MiB" in said and "2 vCPUs" in said and "no VMCOREINFO" in said, said
        regs = []
        for tid in c.threads():
            c.select_thread(tid)
            regs.append(c.registers())
        core = CoreFile.open(path)
        assert [cpu["rip"] for cpu in core.cpus] == [r["rip"] for r in regs]
        assert [cpu["cr3"] for cpu in core.cpus] == [r["cr3"] for r in regs]
        with open(guest_elf("demo"), "rb") as f:
            text = ELFFile(f).get_section_by_name(".text")
            addr, data = text["sh_addr"], text.data()
        assert core.memory.read(addr, len(data)) == data
        counter = c.read_memory(next(s["st_value"] for s in ELFFile(open(guest_elf("demo"), "rb"))
                                     .get_section_by_name(".symtab").iter_symbols() if s.name == "counter"), 8)
        assert counter != bytes(8)
        assert "usage" in c.monitor("dump")
        assert "No such file" in c.monitor(f"dump {tmp_path}/missing/dir/x.core")
        c.detach()
        beats = vm.serial.count("heartbeat")
        time.sleep(1.5)
        assert vm.serial.count("heartbeat") > beats, "the guest runs on after the dump"
    finally:
        vm.close()
