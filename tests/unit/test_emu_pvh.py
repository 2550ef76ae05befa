"""The emulated x86_64 target boots a standard PVH guest as a PVH loader does.

``walk`` is the guest written like any PVH kernel (Xen note only, entry
``_start`` in 32-bit protected mode, its own GDT, 4 KiB page tables and
stack): the target must start it at that entry with ``ebx`` = the
hvm_start_info, follow the guest's own switch to long mode, leave the
second CPU waiting for a SIPI, and run the guest's loop correctly (the
checksum it computes matches a recomputation from its own data).
In-process (EmuMachine and its target), no KVM.
"""

from __future__ import annotations

import io
import select
import struct
import time

from vmscope.emu import EmuMachine
from vmscope.gdbserver.target import ResumeAction, ResumeActions
from vmscope.guests import guest_elf, guest_symbols
from vmscope.machine import MachineConfig

CONTINUE = ResumeActions(default=ResumeAction("continue"))
HVM_START_MAGIC = 0x336EC578


def wait_stop(target, timeout: float = 30.0):
    ready, _, _ = select.select([target.stop_fd()], [], [], timeout)
    assert ready, f"no stop within {timeout} s"
    event = target.take_stop()
    assert event is not None
    return event


def u64(target, addr: int) -> int:
    return struct.unpack("<Q", target.read_physical(addr, 8))[0]


def rol5(value: int) -> int:
    return ((value << 5) | (value >> 59)) & (2**64 - 1)


def test_walk_guest_starts_at_its_32bit_entry_and_computes_its_checksum():
    serial = io.BytesIO()
    machine = EmuMachine(MachineConfig(arch="x86_64", cpus=2, kernel=guest_elf("walk"), serial_out=serial))
    sym = guest_symbols("walk")
    t = machine.debug_target()
    try:
        machine.start(paused=True)
        regs = t.read_registers(1)
        assert regs["rip"] == sym["_start"]
        assert regs["cr0"] & 1 and not regs["cr0"] & (1 << 31), "protected mode, paging off"
        assert regs["efer"] == 0 and regs["cs"] == 0x10
        start_info = regs["rbx"]
        assert struct.unpack("<I", t.read_physical(start_info, 4))[0] == HVM_START_MAGIC
        assert "waiting for SIPI" in t.thread_name(2)
        ap_pc = t.read_registers(2)["rip"]

        t.add_sw_breakpoint(sym["visit"], 1)
        t.resume(CONTINUE)
        event = wait_stop(t)
        assert event.kind == "swbreak" and event.tid == 1
        regs = t.read_registers(1)
        assert regs["rip"] == sym["visit"] and regs["efer"] & 0x500 == 0x500 and regs["cs"] == 0x10
        assert regs["rdi"] == u64(t, sym["ring_head"]), "the first node visited is the ring's head"
        assert serial.getvalue() == b"walk guest: hvm_start_info ok\n"
        assert u64(t, sym["start_info"]) == start_info, "the guest saw the same ebx"
        t.remove_sw_breakpoint(sym["visit"], 1)

        t.resume(CONTINUE)
        time.sleep(0.3)
        t.interrupt()
        wait_stop(t)
        visits, checksum = u64(t, sym["visits"]), u64(t, sym["checksum"])
        assert visits > 1000
        # A stop may fall between the checksum store and the visits increment:
        # the checksum is that of `visits` or `visits + 1` nodes.
        node, expected, folds = u64(t, sym["ring_head"]), 0, []
        for _ in range(visits + 1):
            expected = rol5(expected) ^ u64(t, node + 8)
            folds.append(expected)
            node = u64(t, node)
        assert checksum in folds[visits - 1 : visits + 1]
        assert t.read_registers(2)["rip"] == ap_pc, "the application processor never ran"
    finally:
        machine.shutdown()
