"""``vmscope run -v`` reports its start-up phases with their durations, so a
slow start can be told apart from a hang (a run in the nested lab once
printed nothing for 120 s)."""

from __future__ import annotations

import re

import pytest

from tests.support import VmProcess, free_port

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("accel", ["kvm", "emu"])
def test_run_v_logs_start_up_timings_before_waiting_for_gdb(accel):
    if accel == "kvm":
        from tests.support import require_kvm

        require_kvm()
    vm = VmProcess("-v", "--accel", accel, gdb_port=free_port())
    try:
        vm.wait_listening()
        vm.wait_for(r"start-up: ready after \d+ ms", stream="stderr", timeout=30)
        err = vm.stderr
        for phase in ("python and imports before main", "importing the stub", "creating the machine",
                      "opening the gdb port", "starting the vCPU threads"):
            assert re.search(rf"start-up: {re.escape(phase)}[^\n]*: \d+ ms", err), (phase, err)
        assert err.index("creating the machine") < err.index("waiting for gdb")
        assert "start-up is slow" not in err
    finally:
        vm.close()
