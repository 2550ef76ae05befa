"""Every register of the x86 KVM target, written and read back on the real
/dev/kvm (at the demo guest's entry, with the guest stopped): what GDB's
``P`` and ``G`` packets do. The only refusals are the x87 selectors KVM
does not keep."""

from __future__ import annotations

import io

import pytest

from tests.support import register_round_trip, require_kvm, x86_with_an_msr_line
from vmscope.machine import MachineConfig

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


def test_every_register_reads_back_what_was_written():
    require_kvm()
    from vmscope.kvm import KvmMachine

    m = KvmMachine(MachineConfig(cpus=2, serial_out=io.BytesIO()))
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
        for tid in (1, 2):
            took, refused = register_round_trip(t, tid)
            assert set(refused) == {"fiseg", "foseg"}, refused
            assert set(took) | set(refused) == set(t.arch.index)
    finally:
        m.shutdown()


def test_kernel_gs_base_reaches_the_msr():
    """``k_gs_base`` writes were accepted and dropped: now the MSR itself
    (KVM_GET_MSRS through a fresh read) holds the value."""
    require_kvm()
    from vmscope.kvm import KvmMachine

    m = KvmMachine(MachineConfig(cpus=1, serial_out=io.BytesIO()))
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
        t.write_registers(1, {"k_gs_base": 0xFFFF_8880_0000_1000})
        t._msr_cache.clear()  # what the next stop would see
        assert t.read_registers(1)["k_gs_base"] == 0xFFFF_8880_0000_1000
    finally:
        m.shutdown()


def test_an_msr_register_is_one_table_line():
    """A table with one more line (an MSR number, nothing else) is served
    by the KVM target with no other change: target.xml has it, and it reads
    back what was written (KVM_GET/SET_MSRS)."""
    require_kvm()
    from vmscope.kvm import KvmMachine

    arch = x86_with_an_msr_line()
    m = KvmMachine(MachineConfig(cpus=1, serial_out=io.BytesIO()))
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.arch = arch
        t.initial_stop()
        took, refused = register_round_trip(t, 1, skip=frozenset(arch.index) - {"star"})
        assert took == ["star"] and not refused
        assert 'name="star"' in t.arch.target_xml
    finally:
        m.shutdown()
