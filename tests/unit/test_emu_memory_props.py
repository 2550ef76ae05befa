"""Properties of the emulated target's memory view under breakpoints: GDB
must always read back what it wrote, whatever breakpoints are inserted, and
removing them all must leave exactly those bytes in guest RAM."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmscope.emu import EmuMachine
from vmscope.machine import MachineConfig

WINDOW = 0x2000  # two pages: writes and breakpoints cross the boundary


@pytest.fixture(scope="module", params=["x86_64", "aarch64"])
def target(request):
    machine = EmuMachine(MachineConfig(arch=request.param, cpus=1, mem_mib=4, serial_out=io.BytesIO()))
    machine.start(paused=True)
    yield machine.debug_target()
    machine.shutdown()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(WINDOW // 2 - 40, WINDOW // 2 + 8), st.binary(min_size=1, max_size=64)),
        # breakpoints crowd the page boundary, so they overlap and straddle it
        st.tuples(st.just("break"), st.integers(WINDOW // 2 - 6, WINDOW // 2 + 2), st.none()),
        st.tuples(st.just("unbreak"), st.integers(WINDOW // 2 - 6, WINDOW // 2 + 2), st.none()),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_reads_show_what_gdb_wrote_whatever_breakpoints_are_in(target, ops):
    base = target.ram.base + 0x10_0000
    kind = target.arch.breakpoint_kind
    model = bytearray(target.read_memory(base, WINDOW, 1))
    inserted: set[int] = set()
    for op, offset, data in ops:
        if op == "write":
            data = data[: WINDOW - offset]
            target.write_memory(base + offset, data, 1)
            model[offset : offset + len(data)] = data
        elif op == "break":
            target.add_sw_breakpoint(base + offset, kind)
            inserted.add(offset)
        else:
            target.remove_sw_breakpoint(base + offset, kind)
            inserted.discard(offset)
        assert target.read_memory(base, WINDOW, 1) == bytes(model)
    for offset in sorted(inserted):  # any order, overlapping ones included
        target.remove_sw_breakpoint(base + offset, kind)
    assert target.read_physical(base, WINDOW) == bytes(model)
