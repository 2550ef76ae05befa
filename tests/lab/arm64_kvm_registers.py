"""Run inside the arm64 lab's L1: every register of the arm64 KVM target
written and read back (tests/support.register_round_trip) on both vCPUs of
the demo guest, stopped at its entry; the result as JSON on the last line.
(``python3 tests/lab/arm64_kvm_registers.py``)"""

import faulthandler
import io
import json
import sys
from pathlib import Path

faulthandler.dump_traceback_later(100, exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support import register_round_trip  # noqa: E402
from vmscope.kvm.arm64 import Arm64KvmMachine  # noqa: E402
from vmscope.machine import MachineConfig  # noqa: E402


def main() -> None:
    m = Arm64KvmMachine(MachineConfig(arch="aarch64", cpus=2, mem_mib=64, serial_out=io.BytesIO()))
    report = {}
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
        for tid in (1, 2):
            took, refused = register_round_trip(t, tid)
            report[tid] = {"took": len(took), "refused": refused,
                           "missing": sorted(set(t.arch.index) - set(took) - set(refused))}
    finally:
        m.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
