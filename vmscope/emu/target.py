"""EmuTarget: the GDB stub's view of the emulated CPUs.

Scheduling: one runner thread executes the CPUs round-robin in slices of a
fixed number of instructions, never two at once. That keeps all-stop
semantics trivial (a stop in one CPU means no other CPU is mid-instruction),
makes guest memory races impossible and uses one host core however many
vCPUs the guest has; the cost is that vCPUs do not run in parallel, which is
fine for a debugging target. Slices end on an instruction count, never on
Unicorn's timeout or an ``emu_stop`` from another thread: those stop a CPU
in the middle of an instruction whose memory write is already done, so
resuming at pc repeats it (measured: ``lock inc`` counted twice, increments
lost). ``interrupt`` therefore only raises a flag that the runner checks
between slices, whose instruction count adapts so that one lasts about
5 ms.

A CPU that executes ``hlt`` (x86) or ``wfi``/``wfe`` (arm64) returns from
its slice at once; it is left out for the rest of the round and resumed
after the halt in the next one, as if woken (spurious wake-ups are
architectural for wfi/wfe; with no interrupt controller nothing else would
ever wake it). When every CPU is halted the runner sleeps between rounds.

Breakpoints, watchpoints and guest exceptions are Unicorn hooks
(:mod:`vmscope.emu.debughooks`); ``monitor`` is :mod:`vmscope.emu.monitor`.

Stepping one thread leaves the others stopped (as QEMU and kvmtool do); a
step runs in the caller's thread, a continue starts with one short round
there and goes on in the runner thread.
"""

from __future__ import annotations

import atexit
import errno
import logging
import threading
import time
from typing import Mapping

from unicorn import UC_HOOK_INTR, UcError

from vmscope.arch.registers import Arch
from vmscope.emu.breakpoints import PatchedBreakpoints
from vmscope.emu.cpu import EmuCpu
from vmscope.emu.debughooks import CpuRunState, EmuDebugHooks
from vmscope.emu.monitor import EmuMonitor
from vmscope.devices.ram import GuestRam
from vmscope.gdbserver.target import (
    SIGINT,
    SIGSEGV,
    SIGTRAP,
    AddressTranslation,
    HwBreakpoints,
    MonitorCommands,
    PhysicalMemory,
    ResumeActions,
    StopEvent,
    SwBreakpoints,
    Target,
    TargetError,
    ThreadNames,
    Watchpoints,
)
from vmscope.gdbserver.toolkit import StopNotifying, physical_pieces, refuse_while_running, thread_ids, vcpu_index

log = logging.getLogger("vmscope.emu")

#: a slice aims at this much wall time: the latency of ``interrupt``. Its
#: instruction count adapts (code full of device accesses, each a Python
#: hook, runs a hundred times slower than plain code).
SLICE_SECONDS = 0.005
SLICE_INSNS_RANGE = (1_000, 4_000_000)
#: instructions per CPU that ``resume`` runs itself before the runner takes over
QUICK_INSNS = 20_000
#: how long a round in which every CPU is halted waits before the next one
IDLE_WAIT = 0.01
#: Every emu_start passes an instruction count:
#: Unicorn counts with a code hook that only blocks translated while it is
#: installed carry, and it removes it (flushing every block) when a run has
#: no count. Alternating runs and single steps without a count therefore
#: either flushes all code per switch or, after a stop from a memory hook,
#: lets a "count=1" step run on for many instructions (measured). Keeping
#: the hook installed costs about 2.7x on a tight loop (90 M instructions/s).
PAGE = 0x1000


class EmuTarget(
    EmuDebugHooks,
    EmuMonitor,
    StopNotifying,
    Target,
    SwBreakpoints,
    HwBreakpoints,
    Watchpoints,
    MonitorCommands,
    ThreadNames,
    PhysicalMemory,
    AddressTranslation,
):
    def __init__(self, cpus: list[EmuCpu], ram: GuestRam, arch: Arch) -> None:
        if not cpus:
            raise ValueError("an emulated machine needs at least one CPU")
        self.arch = arch
        self.cpus = cpus
        self.ram = ram
        self._state = {cpu.tid: CpuRunState() for cpu in cpus}
        self._init_stop_notifier()
        self._cond = threading.Condition()
        self._pending: ResumeActions | None = None
        self._running = False
        self._stop_requested = False
        self._closed = False
        self._next_index = 0  # the CPU the next continue runs first
        self._slice_insns = 200_000
        self._sw = PatchedBreakpoints(ram, arch.breakpoint)
        self._hw: dict[int, list[int]] = {}  # address -> hook handle per CPU
        self._watch: dict[tuple[int, int, str], list[tuple[EmuCpu, int]]] = {}
        self.exit_status: int | None = None
        self.exited = threading.Event()
        # (tid, virtual page) -> physical page, for the debugger's reads while
        # stopped (gdb reads at pc twice per stop); cleared when anything runs
        # or the debugger writes registers or memory (page tables may change)
        self._translations: dict[tuple[int, int], int] = {}
        for cpu in cpus:
            cpu.uc.hook_add(UC_HOOK_INTR, self._on_exception, cpu)
        self._thread = threading.Thread(target=self._runner, name="vmscope-emu-cpus", daemon=True)
        self._thread.start()
        # a runner still inside emu_start while the interpreter tears down
        # Unicorn crashes the process: stop it first
        atexit.register(self.close)

    # --- required core -----------------------------------------------------

    def threads(self) -> list[int]:
        return thread_ids(len(self.cpus))

    def _cpu(self, tid: int) -> EmuCpu:
        return self.cpus[vcpu_index(tid, len(self.cpus), any_thread_ok=False)]

    def _check_stopped(self) -> None:
        refuse_while_running(self._running)

    def read_registers(self, tid: int) -> Mapping[str, int]:
        self._check_stopped()
        return self._cpu(tid).registers()

    def stop_registers(self, tid: int, names: tuple[str, ...]) -> Mapping[str, int]:
        """pc, sp and fp one by one: the full read (every register in a
        batch, then decoded) is most of a step's cost when gdb never asks
        for the rest (docs/performance.md)."""
        self._check_stopped()
        return dict(zip(names, self._cpu(tid)._live(*names)))

    def write_registers(self, tid: int, values: Mapping[str, int]) -> None:
        self._check_stopped()
        self._translations.clear()
        unknown = set(values) - set(self.arch.index)
        if unknown:
            raise TargetError(f"no register {sorted(unknown)[0]!r} on {self.arch.name}", errno.EINVAL)
        self._cpu(tid).write_registers(values)

    def read_memory(self, addr: int, length: int, tid: int) -> bytes:
        self._check_stopped()  # translation reads the CPU's registers
        cpu = self._cpu(tid)
        translations = self._translations

        def translate(vaddr: int) -> int:
            key = (tid, vaddr & ~(PAGE - 1))
            page = translations.get(key)
            if page is None:
                page = translations[key] = cpu.translate(key[1])
            return page | (vaddr & (PAGE - 1))

        pieces, bad, error = physical_pieces(addr, length, translate, self.ram.contains)
        if not pieces and bad is not None:  # nothing readable: say why
            if error is not None:
                raise error
            self.ram.read(cpu.translate(bad), min(length, PAGE - (bad & (PAGE - 1))))  # raises OutsideRam
        out = bytearray()
        for phys, n in pieces:
            out += self.ram.read(phys, n)
        return bytes(self._sw.hide(addr, out))

    def write_memory(self, addr: int, data: bytes, tid: int) -> None:
        self._check_stopped()
        self._translations.clear()
        cpu = self._cpu(tid)
        # translate everything first: all or nothing
        pieces, bad, error = physical_pieces(addr, len(data), cpu.translate, self.ram.contains)
        if error is not None:
            raise error
        if bad is not None:
            raise TargetError(f"{bad:#x} (physical {cpu.translate(bad):#x}) is not RAM", errno.EFAULT)
        stored, off = self._sw.write_through(addr, data), 0
        for phys, n in pieces:
            self.ram.write(phys, stored[off : off + n])
            off += n
        self._flush_code(addr, len(data))

    def resume(self, actions: ResumeActions) -> None:
        self._translations.clear()
        with self._cond:
            if self._closed:
                raise TargetError("the machine has been shut down", errno.ESRCH)
            if self._running:
                raise TargetError("the guest is already running", errno.EBUSY)
            for cpu in self.cpus:  # register caches stay: _slice drops those of CPUs that run
                self._state[cpu.tid].skip_hw_at = cpu.pc if cpu.pc in self._hw else None
            self._stop_requested = False
            self._running = True
        # A single step is a few microseconds of emulation: run it right here
        # rather than paying two thread hand-offs (the runner is idle now);
        # a continue gets a short first round here too.
        if actions.stepping:
            self._finish(self._run_safely(actions))
            return
        try:
            event = self._quick_round(actions)
        except Exception:
            log.exception("emulated CPUs failed")
            event = StopEvent("signal", self.cpus[0].tid, SIGSEGV)
        if event is not None:
            self._finish(event)
            return
        with self._cond:
            self._pending = actions
            self._cond.notify_all()

    def _run_safely(self, actions: ResumeActions) -> StopEvent:
        try:
            return self._run(actions)
        except Exception:  # a bug here must not leave GDB waiting forever
            log.exception("emulated CPUs failed")
            return StopEvent("signal", self.cpus[0].tid, SIGSEGV)

    def _finish(self, event: StopEvent) -> None:
        with self._cond:
            self._stop_requested = False
            self._running = False
            closed = self._closed
            if event.kind in ("exited", "terminated"):
                self._closed = True  # the guest is gone: nothing runs again
                self._cond.notify_all()
        if not closed:
            self.notifier.post(event)
        if event.kind in ("exited", "terminated") and self.exit_status is None:
            self.exit_status = event.code
            self.exited.set()

    def request_exit(self, cpu: EmuCpu, status: int) -> None:
        """A device hook saw the guest power off (or write an exit code):
        stop at once and end the machine with ``status``."""
        state = self._state[cpu.tid]
        if state.event is None:
            state.event = StopEvent("exited", cpu.tid, code=status)
        cpu.uc.emu_stop()

    def interrupt(self) -> None:
        with self._cond:
            if self._running:
                self._stop_requested = True  # seen between slices (see the module doc)
                self._cond.notify_all()

    def is_running(self) -> bool:
        return self._running

    def detach(self) -> None:
        if not self._closed:  # after kill there is nothing left to run
            super().detach()

    def kill(self) -> None:
        if self.exit_status is None:
            self.exit_status = 0
        self.close()
        self.exited.set()

    def close(self) -> None:
        """Stop the runner thread (idempotent); the CPUs never run again."""
        self.interrupt()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        atexit.unregister(self.close)

    # --- the runner ------------------------------------------------------------

    def _runner(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._running = False
                    return
                actions, self._pending = self._pending, None
            self._finish(self._run_safely(actions))

    def _run(self, actions: ResumeActions) -> StopEvent:
        stepping = actions.stepping
        if stepping:
            cpu = self._cpu(stepping[0])
            return self._slice(cpu, 1) or StopEvent("signal", cpu.tid, SIGTRAP)
        running = self._continuing(actions)
        last = running[0] if running else self.cpus[0]
        while True:
            busy = False
            for cpu in running:
                if self._stop_requested or self._closed:
                    self._next_index = last.tid % len(self.cpus)
                    return StopEvent("signal", last.tid, SIGINT)
                last = cpu
                began = time.monotonic()
                event = self._slice(cpu, self._slice_insns)
                self._adapt_slice(time.monotonic() - began)
                if event is not None:
                    self._next_index = cpu.tid % len(self.cpus)
                    return event
                busy |= not cpu.halted
            if not busy:  # every CPU halted (or none to run): idle until Ctrl-C
                with self._cond:
                    if not (self._stop_requested or self._closed):
                        self._cond.wait(IDLE_WAIT)

    def _continuing(self, actions: ResumeActions) -> list[EmuCpu]:
        """The CPUs a continue runs, in round order. Rounds start after the
        CPU that stopped last time, so that with a breakpoint every CPU
        reaches, each continue lets the next one run (always starting at
        CPU 0 would starve the others)."""
        first = self._next_index
        order = self.cpus[first:] + self.cpus[:first]
        return [cpu for cpu in order if (a := actions.action_for(cpu.tid)) is not None and a.kind == "continue"]

    def _quick_round(self, actions: ResumeActions) -> StopEvent | None:
        """One short round in the caller's thread before handing a continue
        to the runner: a breakpoint a few instructions away (the usual case
        when GDB continues over and over) then costs no thread hand-off
        (measured: 150 us of the 160 us a continue-to-breakpoint took)."""
        for cpu in self._continuing(actions):
            if cpu.halted:
                continue
            event = self._slice(cpu, QUICK_INSNS)
            if event is not None:
                self._next_index = cpu.tid % len(self.cpus)
                return event
        return None

    def _adapt_slice(self, elapsed: float) -> None:
        low, high = SLICE_INSNS_RANGE
        if elapsed > 2 * SLICE_SECONDS:
            self._slice_insns = max(low, self._slice_insns // 2)
        elif elapsed < SLICE_SECONDS / 2:
            self._slice_insns = min(high, self._slice_insns * 2)

    def _slice(self, cpu: EmuCpu, count: int) -> StopEvent | None:
        """Run ``cpu`` for up to ``count`` instructions; the stop event its
        hooks produced, if any."""
        if cpu.parked:
            cpu.halted = True
            return None
        state = self._state[cpu.tid]
        state.event = None
        state.event_pc = None
        state.watch_hit = None
        state.guest_breakpoint = False
        state.firmware_call = False
        start = cpu.pc
        cpu.invalidate()
        try:
            cpu.uc.emu_start(start, 0, count=count)
        except UcError as e:
            cpu.invalidate()
            log.info("cpu %d stopped at %#x: %s", cpu.index, cpu.pc, e)
            return state.event or StopEvent("signal", cpu.tid, SIGSEGV)
        cpu.invalidate()
        state.skip_hw_at = None
        if state.watch_hit is not None:
            return self._finish_watched_instruction(cpu, state)
        if state.event is not None:
            if state.event_pc is not None:
                cpu.pc = state.event_pc
            return state.event
        if state.guest_breakpoint and not cpu.deliver_breakpoint():
            return StopEvent("signal", cpu.tid, SIGTRAP)
        if state.firmware_call:
            status = cpu.firmware_call()
            if status is not None:
                return StopEvent("exited", cpu.tid, code=status)
        cpu.halted = count > 1 and cpu.is_halted_after_run()
        return None

    # --- optional extras --------------------------------------------------------

    def thread_name(self, tid: int) -> str:
        cpu = self._cpu(tid)
        return f"vcpu {cpu.index}" + (" (waiting for SIPI)" if cpu.parked else " (halted)" if cpu.halted else "")

    def read_physical(self, addr: int, length: int) -> bytes:
        return self.ram.read(addr, length)

    def write_physical(self, addr: int, data: bytes) -> None:
        self._translations.clear()  # the write may change page tables
        self.ram.write(addr, data)
        self._flush_code(addr, len(data))  # identity-mapped guests run code at its physical address

    def translate(self, addr: int, tid: int) -> int:
        self._check_stopped()
        return self._cpu(tid).translate(addr)

