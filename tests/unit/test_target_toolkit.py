"""The targets' shared toolkit (vmscope.gdbserver.toolkit), and the arm64
KVM target's use of it, in-process: the arm64 target otherwise runs only in
the nested arm64 lab. Its memory, breakpoint hiding, threads and monitor
run here over real guest RAM (a memfd) with the MMU off, so addresses are
physical and no KVM vCPU is needed: the stand-in vCPU answers only the
system-register reads that the translation makes."""

from __future__ import annotations

import types

import pytest

from vmscope.devices.ram import GuestRam
from vmscope.gdbserver.target import TargetError
from vmscope.gdbserver.toolkit import (
    InsertedBreakpoint,
    hide_breakpoints,
    keep_breakpoints,
    physical_pieces,
    vcpu_index,
)
from vmscope.kvm.arm64.memaccess import BRK0
from vmscope.kvm.arm64.target import Arm64KvmTarget

BASE = 0x4000_0000


def test_breakpoint_bytes_are_hidden_and_kept_also_when_they_overlap():
    opcode = b"\xaa\xbb\xcc\xdd"
    table = {0x100: InsertedBreakpoint(0, b"1234"), 0x102: InsertedBreakpoint(0, b"5678")}
    data = b"..\xaa\xbb\xcc\xdd\xcc\xdd.."  # read at 0xFE: both patches in
    assert hide_breakpoints(0xFE, data, table) == b"..12" + b"5678" + b".."
    far = b"guest code"
    assert hide_breakpoints(0x200, far, table) is far  # nothing to hide: no copy
    stored = keep_breakpoints(0x101, b"xyz", table, opcode)
    assert stored == b"\xbb\xaa\xbb"  # the instructions stay in RAM
    assert table[0x100].orig == b"1xyz" and table[0x102].orig == b"yz78"


def test_a_virtual_range_splits_into_merged_physical_pieces_up_to_the_first_hole():
    mapping = {0x1000: 0x8000, 0x2000: 0x9000, 0x3000: 0x20000}  # two contiguous pages, then a jump

    def translate(vaddr):
        page = mapping.get(vaddr & ~0xFFF)
        return None if page is None else page | (vaddr & 0xFFF)

    assert physical_pieces(0x1800, 0x2000, translate) == ([(0x8800, 0x1800), (0x20000, 0x800)], None, None)
    assert physical_pieces(0x3F00, 0x200, translate) == ([(0x20F00, 0x100)], 0x4000, None)
    assert physical_pieces(0x1000, 0x10, translate, lambda p, n: p >= 0x9000) == ([], 0x1000, None)

    def raising(vaddr):
        raise TargetError(f"{vaddr:#x} is not mapped")

    def large_pages(vaddr):  # 2 MiB pages mapped back to back from 0x200000
        return 0x200000 + vaddr, 0x200000 - vaddr % 0x200000

    assert physical_pieces(0x1FF000, 0x3000, large_pages) == ([(0x3FF000, 0x3000)], None, None)

    pieces, bad, error = physical_pieces(0x5000, 8, raising)
    assert (pieces, bad) == ([], 0x5000) and "0x5000 is not mapped" in str(error)


def test_thread_ids_name_vcpus_and_any_thread_is_the_first_only_where_allowed():
    assert vcpu_index(2, 2) == 1 and vcpu_index(0, 2) == 0 and vcpu_index(-1, 2) == 0
    with pytest.raises(TargetError, match="no thread 3"):
        vcpu_index(3, 2)
    with pytest.raises(TargetError, match="no thread 0"):
        vcpu_index(0, 2, any_thread_ok=False)


class _MmuOffVcpu:
    """An arm64 vCPU as far as translation and ``monitor cpus`` ask: EL1h,
    SCTLR_EL1.M clear (virtual = physical)."""

    def __init__(self, index: int):
        self.index, self.pc, self.pstate = index, BASE, 0x5

    def sys(self, name: str) -> int:
        return 0


@pytest.fixture
def arm64_target():
    ram = GuestRam(BASE, 1 << 20)
    machine = types.SimpleNamespace(
        ram=ram, stopped=True, ending=False, hw_bp_slots=6, hw_wp_slots=4,
        vcpus=[types.SimpleNamespace(vcpu=_MmuOffVcpu(i), online=True) for i in range(2)],
    )
    target = Arm64KvmTarget(machine)
    yield target
    target.notifier.close()
    ram.close()


def test_arm64_kvm_memory_hides_its_brk_and_keeps_it_under_writes(arm64_target):
    t = arm64_target
    t.write_memory(BASE + 0x100, bytes(range(16)), 1)
    t.add_sw_breakpoint(BASE + 0x104, 4)
    assert t.ram.read(BASE + 0x104, 4) == BRK0  # patched in guest RAM
    assert t.read_memory(BASE + 0x100, 16, 2) == bytes(range(16))  # not seen by the debugger
    t.write_memory(BASE + 0x106, b"\xee\xff", 1)
    assert t.ram.read(BASE + 0x104, 4) == BRK0
    t.remove_sw_breakpoint(BASE + 0x104, 4)
    assert t.ram.read(BASE + 0x104, 4) == bytes([4, 5, 0xEE, 0xFF])
    end = t.ram.end
    assert t.read_memory(end - 4, 64, 1) == bytes(4)  # stops at the end of RAM
    with pytest.raises(TargetError, match="not mapped to guest RAM"):
        t.write_memory(end - 4, bytes(8), 1)


def test_arm64_kvm_threads_and_monitor(arm64_target):
    t = arm64_target
    assert t.threads() == [1, 2]
    with pytest.raises(TargetError, match="no thread 3"):
        t.read_memory(BASE, 4, 3)
    assert "debug slots: 6 breakpoints, 4 watchpoints" in t.monitor("help")
    assert "vCPU 1: EL1h pc=0x40000000" in t.monitor("cpus")
    assert t.monitor(f"translate {BASE + 0x10:#x}") == f"{BASE + 0x10:#x} -> {BASE + 0x10:#x}\n"
    assert "not a number" in t.monitor("translate zz")
    assert "usage" in t.monitor("translate")
    assert "unknown monitor command 'help_me'" in t.monitor("help_me")
    assert "unknown monitor command" in t.monitor("guest_running")  # helpers are not commands
