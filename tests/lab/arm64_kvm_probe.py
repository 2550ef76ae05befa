"""Run inside the arm64 lab's L1: boot the demo guest on vmscope's arm64 KVM
back end for a moment, without a debugger, and print what it said as JSON.
(``python3 tests/lab/arm64_kvm_probe.py``)"""

import faulthandler
import io
import json
import sys
import time

faulthandler.dump_traceback_later(60, exit=True)

from vmscope.kvm.arm64 import Arm64KvmMachine  # noqa: E402
from vmscope.machine import MachineConfig  # noqa: E402


class Out(io.RawIOBase):
    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += b
        return len(b)


def main() -> None:
    cpus = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    out = Out()
    t0 = time.monotonic()
    m = Arm64KvmMachine(MachineConfig(arch="aarch64", cpus=cpus, mem_mib=64, serial_out=out))
    t1 = time.monotonic()
    m.start()
    deadline = time.monotonic() + 30
    want = b"".join(b"vmscope demo guest: cpu %d up\n" % i for i in range(cpus))
    while out.data != want and time.monotonic() < deadline and m.wait(0.05) is None:
        pass
    t2 = time.monotonic()
    m.wait(0.3)  # let the last CPU up tick a few times after its banner (it may not have yet: a race, not a fault)
    stop = m.target.stop(10)
    regs = m.target.read_registers(1)
    counter_addr = m.image.symbols["counter"]
    counter = int.from_bytes(m.target.read_memory(counter_addr, 8, 1), "little")
    report = {"serial": out.data.decode(errors="replace"), "status": m.wait(0),
              "stop": repr(stop), "pc": regs["pc"], "sp": regs["sp"], "cpsr": regs["cpsr"],
              "mpidr": [m.target.read_registers(t)["MPIDR_EL1"] for t in m.target.threads()],
              "counter": counter,
              "cpu1": {k: m.target.read_registers(len(m.vcpus))[k] for k in ("x19", "sp", "x30", "x29", "x1", "x2", "cpsr", "SP_EL1", "SP_EL0", "ESR_EL1", "VBAR_EL1")} if cpus > 1 else None,
              "turn": int.from_bytes(m.target.read_memory(m.image.symbols["announce_turn"], 4, 1), "little"),
              "pcs": [m.target.read_registers(t)["pc"] for t in m.target.threads()],
              "per_cpu": [int.from_bytes(m.target.read_memory(m.image.symbols["per_cpu_counter"] + 8 * i, 8, 1), "little") for i in range(cpus)], "slots": [m.hw_bp_slots, m.hw_wp_slots],
              "create_s": t1 - t0, "boot_s": t2 - t1}
    m.shutdown()
    print(json.dumps(report))


main()
