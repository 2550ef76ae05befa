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

Breakpoints and watchpoints:

- software breakpoints patch ``BRK #0`` / ``INT3`` into guest RAM (memory
  reads show the original bytes, as gdbserver does). A breakpoint
  instruction that is not ours is the guest's own: it is delivered to the
  guest's handler (x86 IDT vector 3, arm64 VBAR_EL1 synchronous vector),
  which Unicorn does not do itself, or, when the guest has no handler,
  reported to GDB as SIGTRAP. Other guest exceptions are reported as SIGILL
  (undefined instruction) or SIGSEGV, not delivered.
- hardware breakpoints are Unicorn code hooks on one address; they stop
  before the instruction runs. Resuming from one runs its instruction once
  (like x86's RF flag). There is no slot limit.
- watchpoints are memory hooks on the physical pages the watched range maps
  to when set (Unicorn hooks see physical addresses); any number, any
  length. Unicorn calls a
  write hook before the store, and stopping from the hook leaves the store
  done but the instruction unfinished (pc on it, register write-back not
  done: measured). So the target puts the old bytes back and re-executes
  that one instruction with hooks muted: the instruction then completes
  exactly once (also for read-modify-write ones like ``lock inc``) and the
  stop is reported after it with the new value in memory, as GDB expects.

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

from unicorn import UC_HOOK_CODE, UC_HOOK_INTR, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_MEM_WRITE, UcError

from vmscope.arch.registers import Arch
from vmscope.emu.breakpoints import PatchedBreakpoints
from vmscope.emu.cpu import EmuCpu
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
    StopNotifier,
    SwBreakpoints,
    Target,
    TargetError,
    ThreadNames,
    WatchKind,
    Watchpoints,
)

log = logging.getLogger("vmscope.emu")

SIGILL = 4
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
_WATCH_STOP = {"write": "watch", "read": "rwatch", "access": "awatch"}
_WATCH_HOOKS = {"write": UC_HOOK_MEM_WRITE, "read": UC_HOOK_MEM_READ, "access": UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE}
#: widen a watch hook's range by this much below its start: Unicorn matches a
#: hook on the access's first byte, and an 8-byte store may start before the
#: watched byte; the callback checks the exact overlap
_WIDEST_ACCESS = 64


class _CpuRunState:
    """What the hooks of one CPU noticed during a slice."""

    __slots__ = ("event", "event_pc", "watch_hit", "muted", "skip_hw_at", "guest_breakpoint", "firmware_call")

    def __init__(self) -> None:
        self.event: StopEvent | None = None
        #: where pc must point once stopped (x86 reports int3 past the 0xcc)
        self.event_pc: int | None = None
        #: (reported address, stop kind, physical address, bytes before the store or None)
        self.watch_hit: tuple[int, str, int | None, bytes | None] | None = None
        self.muted = False
        self.skip_hw_at: int | None = None
        #: the guest executed a breakpoint instruction of its own
        self.guest_breakpoint = False
        #: the guest called firmware (arm64 PSCI through hvc/smc)
        self.firmware_call = False


class EmuTarget(
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
        self._state = {cpu.tid: _CpuRunState() for cpu in cpus}
        self._notifier = StopNotifier()
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
        for cpu in cpus:
            cpu.uc.hook_add(UC_HOOK_INTR, self._on_exception, cpu)
        self._thread = threading.Thread(target=self._runner, name="vmscope-emu-cpus", daemon=True)
        self._thread.start()
        # a runner still inside emu_start while the interpreter tears down
        # Unicorn crashes the process: stop it first
        atexit.register(self.close)

    # --- required core -----------------------------------------------------

    def threads(self) -> list[int]:
        return [cpu.tid for cpu in self.cpus]

    def _cpu(self, tid: int) -> EmuCpu:
        if not 1 <= tid <= len(self.cpus):
            raise TargetError(f"no thread {tid}: threads are 1..{len(self.cpus)}", errno.ESRCH)
        return self.cpus[tid - 1]

    def _check_stopped(self) -> None:
        if self._running:
            raise TargetError("the guest is running; stop it first", errno.EBUSY)

    def read_registers(self, tid: int) -> Mapping[str, int]:
        self._check_stopped()
        return self._cpu(tid).registers()

    def write_registers(self, tid: int, values: Mapping[str, int]) -> None:
        self._check_stopped()
        unknown = set(values) - set(self.arch.index)
        if unknown:
            raise TargetError(f"no register {sorted(unknown)[0]!r} on {self.arch.name}", errno.EINVAL)
        self._cpu(tid).write_registers(values)

    def read_memory(self, addr: int, length: int, tid: int) -> bytes:
        self._check_stopped()  # translation reads the CPU's registers
        cpu = self._cpu(tid)
        out = bytearray()
        while len(out) < length:
            vaddr = addr + len(out)
            chunk = min(length - len(out), PAGE - (vaddr & (PAGE - 1)))
            try:
                phys = cpu.translate(vaddr)
                out += self.ram.read(phys, chunk)
            except TargetError:
                if not out:
                    raise
                break
        self._sw.hide(addr, out)
        return bytes(out)

    def write_memory(self, addr: int, data: bytes, tid: int) -> None:
        self._check_stopped()
        cpu = self._cpu(tid)
        pieces = []  # translate everything first: all or nothing
        done = 0
        while done < len(data):
            vaddr = addr + done
            chunk = min(len(data) - done, PAGE - (vaddr & (PAGE - 1)))
            phys = cpu.translate(vaddr)
            if not self.ram.contains(phys, chunk):
                raise TargetError(f"{vaddr:#x} (physical {phys:#x}) is not RAM", errno.EFAULT)
            pieces.append((vaddr, phys, data[done : done + chunk]))
            done += chunk
        for vaddr, phys, piece in pieces:
            self.ram.write(phys, self._sw.write_through(vaddr, piece))
        self._flush_code(addr, len(data))

    def resume(self, actions: ResumeActions) -> None:
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
            self._notifier.post(event)
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

    def stop_fd(self) -> int:
        return self._notifier.fd

    def take_stop(self) -> StopEvent | None:
        return self._notifier.take()

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

    # --- software breakpoints ------------------------------------------------

    def add_sw_breakpoint(self, addr: int, kind: int) -> None:
        self._check_stopped()
        if kind != self.arch.breakpoint_kind:
            raise TargetError(f"breakpoint kind {kind} unsupported on {self.arch.name} (use {self.arch.breakpoint_kind})", errno.EINVAL)
        if addr not in self._sw:
            self._sw.insert(addr, self.cpus[0].translate(addr))
            self._flush_code(addr, len(self.arch.breakpoint))

    def remove_sw_breakpoint(self, addr: int, kind: int) -> None:
        self._check_stopped()
        if self._sw.remove(addr):
            self._flush_code(addr, len(self.arch.breakpoint))

    def _flush_code(self, addr: int, length: int) -> None:
        """Drop translated code over a patched range in every CPU (Unicorn
        does not notice writes to the shared RAM made from outside)."""
        for cpu in self.cpus:
            cpu.uc.ctl_remove_cache(addr, addr + max(length, 1))

    # --- hardware breakpoints ------------------------------------------------

    def add_hw_breakpoint(self, addr: int, kind: int) -> None:
        self._check_stopped()  # Unicorn hooks change only while no CPU runs
        if addr in self._hw:
            return
        self._hw[addr] = [cpu.uc.hook_add(UC_HOOK_CODE, self._on_hw_breakpoint, cpu, addr, addr) for cpu in self.cpus]
        self._flush_code(addr, 1)

    def remove_hw_breakpoint(self, addr: int, kind: int) -> None:
        self._check_stopped()
        handles = self._hw.pop(addr, None)
        if handles is None:
            return
        for cpu, handle in zip(self.cpus, handles):
            cpu.uc.hook_del(handle)
        self._flush_code(addr, 1)

    def _on_hw_breakpoint(self, uc, address: int, size: int, cpu: EmuCpu) -> None:
        state = self._state[cpu.tid]
        if state.muted:
            return
        if state.skip_hw_at == address:
            state.skip_hw_at = None  # resuming from it: run it once
            return
        if state.event is None:
            state.event = StopEvent("hwbreak", cpu.tid, SIGTRAP)
        uc.emu_stop()

    # --- watchpoints -----------------------------------------------------------

    def add_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        self._check_stopped()
        if kind not in _WATCH_HOOKS:
            raise TargetError(f"unknown watchpoint kind {kind!r}", errno.EINVAL)
        if length <= 0:
            raise TargetError(f"watchpoint length must be positive, got {length}", errno.EINVAL)
        key = (addr, length, kind)
        if key in self._watch:
            return
        handles: list[tuple[EmuCpu, int]] = []
        try:
            for cpu in self.cpus:
                for vaddr, phys, size in self._physical_pieces(cpu, addr, length):
                    begin = max(0, phys - _WIDEST_ACCESS + 1)
                    piece = (cpu, vaddr, phys, size, kind)
                    handles.append((cpu, cpu.uc.hook_add(_WATCH_HOOKS[kind], self._on_memory_access, piece, begin, phys + size - 1)))
        except TargetError:
            for cpu, handle in handles:
                cpu.uc.hook_del(handle)
            raise
        self._watch[key] = handles

    @staticmethod
    def _physical_pieces(cpu: EmuCpu, addr: int, length: int) -> list[tuple[int, int, int]]:
        """(virtual, physical, length) per page of a watched range: Unicorn
        hands memory hooks physical addresses (measured on both arches with
        paging on), so watchpoints hook where the guest's page tables put
        the range when it is set (a later remap is not followed)."""
        pieces, done = [], 0
        while done < length:
            vaddr = addr + done
            size = min(length - done, PAGE - (vaddr & (PAGE - 1)))
            pieces.append((vaddr, cpu.translate(vaddr), size))
            done += size
        return pieces

    def remove_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        self._check_stopped()
        for cpu, handle in self._watch.pop((addr, length, kind), ()):
            cpu.uc.hook_del(handle)

    def _on_memory_access(self, uc, access: int, address: int, size: int, value: int, piece) -> None:
        cpu, wvaddr, wphys, wlen, kind = piece
        state = self._state[cpu.tid]
        if state.muted or state.watch_hit is not None:
            return
        if address + size <= wphys or address >= wphys + wlen:
            return  # inside the widened hook range only
        old = self.ram.read(address, size) if access == UC_MEM_WRITE and self.ram.contains(address, size) else None
        state.watch_hit = (wvaddr + max(address - wphys, 0), _WATCH_STOP[kind], address, old)
        uc.emu_stop()

    # --- exceptions ------------------------------------------------------------

    def _on_exception(self, uc, intno: int, cpu: EmuCpu) -> None:
        state = self._state[cpu.tid]
        bp_addr = cpu.breakpoint_address(intno)
        if bp_addr is not None and bp_addr in self._sw:
            # report the breakpoint's own address; set once Unicorn has
            # returned (it moves x86's rip past the int3 after this hook)
            state.event_pc = bp_addr
            event = StopEvent("swbreak", cpu.tid, SIGTRAP)
        elif bp_addr is not None:
            # the guest's own: into its handler once Unicorn has returned,
            # or to the debugger as SIGTRAP if it has none
            state.guest_breakpoint = True
            uc.emu_stop()
            return
        elif cpu.is_firmware_call(intno):
            state.firmware_call = True  # carried out once Unicorn has returned
            uc.emu_stop()
            return
        else:
            signal = SIGILL if intno == cpu.undefined_instruction_exception else SIGSEGV
            log.info("cpu %d: exception %d at %#x reported as signal %d", cpu.index, intno, cpu.pc, signal)
            event = StopEvent("signal", cpu.tid, signal)
        if state.event is None:
            state.event = event
        uc.emu_stop()

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

    def _finish_watched_instruction(self, cpu: EmuCpu, state: _CpuRunState) -> StopEvent:
        addr, kind, phys, old = state.watch_hit
        state.watch_hit = None
        if old is not None:
            self.ram.write(phys, old)
        state.muted = True
        try:
            cpu.uc.emu_start(cpu.pc, 0, count=1)
        except UcError as e:
            log.info("cpu %d: re-running the watched instruction failed: %s", cpu.index, e)
        finally:
            state.muted = False
            cpu.invalidate()
        return StopEvent(kind, cpu.tid, SIGTRAP, addr=addr)

    # --- optional extras --------------------------------------------------------

    def thread_name(self, tid: int) -> str:
        cpu = self._cpu(tid)
        return f"vcpu {cpu.index}" + (" (waiting for SIPI)" if cpu.parked else " (halted)" if cpu.halted else "")

    def read_physical(self, addr: int, length: int) -> bytes:
        return self.ram.read(addr, length)

    def write_physical(self, addr: int, data: bytes) -> None:
        self.ram.write(addr, data)
        self._flush_code(addr, len(data))  # identity-mapped guests run code at its physical address

    def translate(self, addr: int, tid: int) -> int:
        self._check_stopped()
        return self._cpu(tid).translate(addr)

    _HELP = (
        "vmscope emulated target (Unicorn), monitor commands:\n"
        "  help             this text\n"
        "  cpus             each vCPU: thread id, pc, state\n"
        "  translate ADDR   guest-virtual to guest-physical (current thread 1)\n"
    )

    def monitor(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
            return self._HELP
        if words[0] == "cpus":
            lines = []
            for cpu in self.cpus:
                state = "running" if self._running else ("halted" if cpu.halted else "stopped")
                pc = "?" if self._running else f"{cpu.pc:#x}"
                lines.append(f"  thread {cpu.tid}: vcpu {cpu.index} pc={pc} {state}")
            return f"{len(self.cpus)} vCPU(s), {self.arch.name}, emulated by Unicorn\n" + "\n".join(lines) + "\n"
        if words[0] == "translate" and len(words) == 2:
            try:
                addr = int(words[1], 0)
            except ValueError:
                return f"translate: {words[1]!r} is not a number\n"
            try:
                return f"{addr:#x} -> physical {self.translate(addr, 1):#x}\n"
            except TargetError as e:
                return f"translate: {e}\n"
        return f"unknown monitor command {command!r}; try 'monitor help'\n"
