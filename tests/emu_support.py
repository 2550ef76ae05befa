"""The emulated-CPU target booted in this process (no stub, no GDB), and the
waits its tests share (tests/unit/test_emu_target.py, test_emu_tiny_guests.py).
"""

from __future__ import annotations

import io
import select
import time

from vmscope.emu import EmuMachine
from vmscope.gdbserver.target import ResumeAction, ResumeActions
from vmscope.guests import guest_symbols
from vmscope.machine import MachineConfig

ARCHES = ["x86_64", "aarch64"]
CONTINUE = ResumeActions(default=ResumeAction("continue"))
PC = {"x86_64": "rip", "aarch64": "pc"}


def step(tid: int = 1) -> ResumeActions:
    return ResumeActions(per_thread={tid: ResumeAction("step")})


def wait_stop(target, timeout: float = 30.0):
    ready, _, _ = select.select([target.stop_fd()], [], [], timeout)
    assert ready, f"no stop within {timeout} s"
    event = target.take_stop()
    assert event is not None
    assert not target.is_running()
    return event


def u64(target, addr: int, tid: int = 1) -> int:
    return int.from_bytes(target.read_memory(addr, 8, tid), "little")


class Booted:
    def __init__(self, arch: str, cpus: int = 2, kernel=None) -> None:
        self.arch = arch
        self.serial = io.BytesIO()
        self.machine = EmuMachine(MachineConfig(arch=arch, cpus=cpus, kernel=kernel, serial_out=self.serial))
        self.target = self.machine.debug_target()
        self.sym = guest_symbols("demo", arch) if kernel is None else {}
        self.pc = PC[arch]

    def regs(self, tid: int = 1):
        return self.target.read_registers(tid)

    def run_until_stop(self):
        self.target.resume(CONTINUE)
        return wait_stop(self.target)

    def wait_serial(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.serial.getvalue():
            assert time.monotonic() < deadline, f"{text!r} not printed; serial: {self.serial.getvalue()!r}"
            time.sleep(0.02)
