#!/usr/bin/env python3
"""What a debug stop costs inside vmscope's stub on KVM, without gdb or a socket.

Why: ``bench/gdb_ops.py`` measures stops through stock gdb, where gdb's
own share (the floor) is most of each round trip; this isolates the stub's
share. A :class:`~vmscope.gdbserver.session.Session` drives the demo guest
on KVM in process: N single steps (``vCont;s:1`` and the stop through the
stop pipe), then N/2 breakpoint hits as gdb makes them (``z0``, step off,
``Z0``, ``vCont;c`` to the INT3), then the single parts: a
``KVM_SET_GUEST_DEBUG`` toggle and a breakpoint's insert and removal.
Wall and CPU time per operation are printed. The stop is taken in the
calling thread, so each resume here pays two thread hand-offs that
vmscope's stub, which serves gdb from the stepping vCPU's thread, does not
(docs/performance.md).

    python bench/stop_cost.py [N]     # default 2000
"""

from __future__ import annotations

import io
import select
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # not bench/: bench/inspect.py would shadow the standard library


def main(n: int) -> None:
    from vmscope.gdbserver.session import Session
    from vmscope.guests import guest_symbols
    from vmscope.kvm import KvmMachine, abi
    from vmscope.machine import MachineConfig

    tick = guest_symbols("demo")["tick"]
    machine = KvmMachine(MachineConfig(arch="x86_64", cpus=1, mem_mib=64, serial_out=io.BytesIO()))
    machine.start(paused=True)
    try:
        target = machine.debug_target()
        session = Session(target)
        stop_fd = target.stop_fd()

        def stop() -> None:
            ready, _, _ = select.select([stop_fd], [], [], 10)
            if not ready:
                raise SystemExit("no stop within 10 s")
            session.on_stop(target.take_stop())

        def timed(label: str, count: int, body) -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                body()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{label:<42} {wall / count * 1e6:8.1f} us wall {cpu / count * 1e6:8.1f} us CPU")

        session.handle(b"Z1,%x,1" % tick)  # into the loop, as gdb_ops does
        session.handle(b"vCont;c")
        stop()
        session.handle(b"z1,%x,1" % tick)

        def step() -> None:
            session.handle(b"vCont;s:1")
            stop()

        def hit() -> None:
            session.handle(b"z0,%x,1" % tick)
            session.handle(b"vCont;s:1")
            stop()
            session.handle(b"Z0,%x,1" % tick)
            session.handle(b"vCont;c")
            stop()

        timed("single step (resume to stop)", n, step)
        session.handle(b"Z0,%x,1" % tick)
        timed("breakpoint hit (z0, step off, Z0, continue)", max(1, n // 2), hit)
        session.handle(b"z0,%x,1" % tick)
        vcpu = machine.vcpus[0].vcpu
        base = abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_SW_BP
        flip = iter(range(10**9))
        timed("KVM_SET_GUEST_DEBUG, single-step toggled", n,
              lambda: vcpu.set_guest_debug(base | (abi.KVM_GUESTDBG_SINGLESTEP if next(flip) & 1 else 0), [0] * 8))

        def insert_remove() -> None:
            target.translator.clear()  # as after a resume
            target.add_sw_breakpoint(tick, 1)
            target.remove_sw_breakpoint(tick, 1)

        timed("breakpoint insert + remove after a resume", n, insert_remove)
    finally:
        machine.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
