"""Every register of the emulated targets (x86_64 and aarch64 on Unicorn),
written and read back at the demo guest's entry: what GDB's ``P`` and
``G`` packets do."""

from __future__ import annotations

import io

import pytest

from tests.support import register_round_trip, x86_with_an_msr_line
from vmscope.emu import EmuMachine
from vmscope.machine import MachineConfig

pytestmark = pytest.mark.timeout(120)

@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_every_register_reads_back_what_was_written(arch):
    m = EmuMachine(MachineConfig(arch=arch, cpus=2, serial_out=io.BytesIO()))
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
        for tid in (1, 2):
            took, refused = register_round_trip(t, tid)
            assert not refused, refused
            assert set(took) == set(t.arch.index)
    finally:
        m.shutdown()


def test_registers_the_architecture_derives_refuse_a_new_value():
    """CurrentEL (from PSTATE) and MPIDR_EL1 (the CPU's index) cannot be
    written: a different value is an error, not accepted and dropped."""
    from vmscope.gdbserver.target import TargetError

    m = EmuMachine(MachineConfig(arch="aarch64", cpus=1, serial_out=io.BytesIO()))
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
        for name in ("CurrentEL", "MPIDR_EL1"):
            before = t.read_registers(1)[name]
            with pytest.raises(TargetError, match="read-only"):
                t.write_registers(1, {name: before ^ 0x4})
            assert t.read_registers(1)[name] == before
    finally:
        m.shutdown()


def test_an_msr_register_is_one_table_line(monkeypatch):
    """The emulated x86_64 CPU serves a table with one more MSR line with
    no other change (Unicorn's MSR id)."""
    from vmscope.emu.x86_64 import X86Cpu

    arch = x86_with_an_msr_line()
    monkeypatch.setattr(X86Cpu, "arch", arch)
    m = EmuMachine(MachineConfig(arch="x86_64", cpus=1, serial_out=io.BytesIO()))
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.arch = arch
        t.initial_stop()
        took, refused = register_round_trip(t, 1, skip=frozenset(arch.index) - {"star"})
        assert took == ["star"] and not refused
    finally:
        m.shutdown()
