"""Breakpoints, watchpoints and guest exceptions of the emulated CPUs, as
Unicorn hooks (a mixin of :class:`~vmscope.emu.target.EmuTarget`).

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
"""

from __future__ import annotations

import errno
import logging

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_MEM_WRITE, UcError

from vmscope.emu.cpu import EmuCpu
from vmscope.gdbserver.target import SIGSEGV, SIGTRAP, StopEvent, TargetError, WatchKind
from vmscope.gdbserver.toolkit import WATCH_STOP_KIND, pages

log = logging.getLogger("vmscope.emu")

SIGILL = 4
_WATCH_HOOKS = {"write": UC_HOOK_MEM_WRITE, "read": UC_HOOK_MEM_READ, "access": UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE}
#: widen a watch hook's range by this much below its start: Unicorn matches a
#: hook on the access's first byte, and an 8-byte store may start before the
#: watched byte; the callback checks the exact overlap
_WIDEST_ACCESS = 64


class CpuRunState:
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


class EmuDebugHooks:
    """Mixin of :class:`~vmscope.emu.target.EmuTarget`: software and
    hardware breakpoints, watchpoints and guest exceptions (``self.cpus``,
    ``self.ram``, ``self._state``, ``self._sw``, ``self._hw``,
    ``self._watch`` are the target's)."""

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
        return [(vaddr, cpu.translate(vaddr), size) for vaddr, size in pages(addr, length)]

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
        state.watch_hit = (wvaddr + max(address - wphys, 0), WATCH_STOP_KIND[kind], address, old)
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

    def _finish_watched_instruction(self, cpu: EmuCpu, state: CpuRunState) -> StopEvent:
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
