"""Stepping a vCPU through a protected code page: a page pulled out of the
memory slots (an execution breakpoint or a read/access watchpoint lies on
it) cannot run natively, so the vCPU single-steps there, with the page
mapped read-only and the other vCPUs parked, decoding each instruction
(:mod:`vmscope.kvm.x86.decode`) to see whether it reads watched data.
"""

from __future__ import annotations

import logging

from vmscope.gdbserver.target import SIGTRAP, StopEvent, TargetError
from vmscope.kvm import abi
from vmscope.kvm.system import KICK_SIGNAL
from vmscope.kvm.x86.breakpoints import UD_VECTOR
from vmscope.kvm.x86.decode import memory_reads
from vmscope.kvm.x86.registers import _LazyRegisters
from vmscope.kvm.x86.translate import PAGE
from vmscope.kvm.x86.vcpu import Vcpu

log = logging.getLogger("vmscope.kvm.x86")

# instructions one vCPU single-steps on a protected page per exclusive turn
PAGE_STEP_BATCH = 256
# port exits one stepped instruction may take (string I/O) before we call the step lost
MAX_IO_EXITS_PER_STEP = 64
# seconds one stepped instruction may block in KVM_RUN with the others parked
STEP_RUN_LIMIT = 0.25


class X86PageStepping:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`."""

    def _fetch_from_watched_page(self, v: Vcpu, rip: int) -> bool:
        """The vCPU tried to run code from a page we pulled out of the
        memory slots (an execution breakpoint or a read/access watchpoint
        lies on it). Report the breakpoint if rip is one, else single-step
        through the page (:meth:`_step_on_watched_page`), decoding each
        instruction (capstone) to see whether it reads watched data.
        False when rip is not in such a page (a real emulation failure)."""
        try:
            page = self.translate(rip, v.index + 1) // PAGE
        except TargetError:
            return False
        # Whether the page was pulled when the vCPU faulted; read before
        # waiting below, while this vCPU (not parked) holds off any stop.
        was_absent = page in self._absent_pages
        if not was_absent:
            return False
        # KVM queued a #UD with the emulation-failure exit; whatever happens
        # below, the guest must not get it (with no IDT it would triple-fault).
        v.drop_exception(UD_VECTOR)
        with self.m.exclusive(v) as granted:
            if not granted:
                return True  # a stop came first: re-run the instruction later
            if page not in self._absent_pages:
                return True  # unprotected meanwhile: simply re-run it
            with self._lock:
                exec_bp = rip in self._exec_pages and self._skip_exec.get(v.index) != rip
            self._skip_exec.pop(v.index, None)
            if exec_bp:
                kind = self._exec_kind.get(rip, "swbreak")
                self.m.request_stop(StopEvent(kind, tid=v.index + 1, signal=SIGTRAP))
                return True
            result = self._step_on_watched_page(v, rip, page)
        tid = v.index + 1
        if self._write_claimed.pop(v.index, False):
            return True  # its watched write already claimed (or deferred) the stop
        if result is None:
            return True
        kind, hit = result
        if kind == "watch":
            self.m.request_stop(StopEvent(hit.kind, tid=tid, addr=hit.addr), keep_if_busy=lambda e: self._pending.__setitem__(v.index, e))
        elif kind == "exec":
            self.m.request_stop(StopEvent(self._exec_kind.get(hit, "swbreak"), tid=tid, signal=SIGTRAP))
        elif kind == "step" and self._stepping == v.index and self.attached:
            self.m.request_stop(StopEvent("signal", tid=tid, signal=SIGTRAP))
        return True

    def _step_on_watched_page(self, v: Vcpu, rip: int, page: int) -> tuple[str, object] | None:
        """Single-step ``v`` through code on the protected ``page``, with
        the page mapped read-only (writes to it still exit, for write
        watches and data beside the code) and the other vCPUs parked, for as
        long as it stays on that page, up to PAGE_STEP_BATCH instructions.

        Why in a batch: each protect/unprotect is a memory-slot change,
        1-20 ms for KVM nested under TCG's SVM (the lab), against a few ms
        for a single step; the demo guest's page-table loop (4,000
        instructions beside ``tick``) took minutes at one slot change pair
        per instruction. The bound lets the other vCPUs run (one may spin
        waiting for this one) and a stop request in.

        Returns ("watch", StopEvent) for a watched access, ("exec", address)
        for an execution breakpoint reached, ("step", None) when the last
        instruction completed, or None when nothing completed (the
        instruction will run again)."""
        has_write_watch = any(
            w.kind == "write" and w.dr_slot is None and any(start // PAGE <= page <= (start + n - 1) // PAGE for start, n in w.phys)
            for w in self.watches
        )
        with self._lock:
            temp = dict(self.m.slots.protected)
            temp[page] = "readonly"
            self.m.slots.set_protection(temp)
        writable = False
        previous = v.debug_state
        step_control = (abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP | abi.KVM_GUESTDBG_USE_SW_BP
                        | self._step_irq_block())
        result: tuple[str, object] | None = None
        try:
            for _ in range(PAGE_STEP_BATCH):
                if self._run_rep_string(v, rip):
                    result = ("step", None)  # done whole
                else:
                    hit = self._decoded_read_hit(v, rip)
                    # Re-armed for every instruction: KVM sets TF only while
                    # rip is where it was at KVM_SET_GUEST_DEBUG, and drops
                    # it after an instruction it emulated (an MMIO write to
                    # this read-only page): the guest would then run free,
                    # straight over the breakpoint.
                    v.set_guest_debug(step_control, force=True)
                    stepped = False
                    io_exits = 0
                    # A time limit: with the others parked, this KVM_RUN may
                    # never return (a PV-spinlock halt waiting for a parked
                    # vCPU's kick; a lost step trap spinning on an IPI).
                    with self._run_watchdog().limit(v, STEP_RUN_LIMIT) as timed_out:
                        while io_exits < MAX_IO_EXITS_PER_STEP and v.enter():
                            reason = v.run.exit_reason
                            if reason == abi.KVM_EXIT_DEBUG:
                                stepped = True
                                break
                            if reason == abi.KVM_EXIT_MMIO:
                                # KVM loses the single-step trap after an emulated
                                # MMIO write; the access ends the instruction anyway.
                                hit = self._complete_mmio(v) or hit
                                stepped = True
                                break
                            self.m.handle_exit_of(v)
                            if reason != abi.KVM_EXIT_IO:
                                break
                            io_exits += 1
                        blocked = timed_out()
                    if blocked:
                        self._note_blocked_step(v, rip)
                    if not stepped:
                        # Also when the step trap got lost and the guest ran
                        # on through port I/O, or the step blocked: back to
                        # the protected page, and the others run meanwhile.
                        return result
                    result = ("step", None)
                    if self._write_claimed.get(v.index) or self.m.ending:
                        return result
                    if hit is not None:
                        return ("watch", hit)
                if self._stepping == v.index:
                    return result  # a debugger's stepi: one instruction
                before, rip = rip, v.regs().rip
                if rip == before and not writable:
                    # No progress: `mov %eax,%ds` with the GDT on this
                    # read-only page loops in KVM (the descriptor's
                    # accessed-bit write goes through write_std, which a
                    # read-only slot refuses, and KVM retries forever). Run
                    # it again with the page writable (unless a write watch
                    # lies on it).
                    if has_write_watch:
                        return result
                    with self._lock:
                        temp.pop(page, None)
                        self.m.slots.set_protection(temp)
                    writable = True
                    continue
                if writable:
                    with self._lock:
                        temp[page] = "readonly"
                        self.m.slots.set_protection(temp)
                    writable = False
                with self._lock:
                    if rip in self._exec_pages:
                        return ("exec", rip)
                # KVM_TRANSLATE, not the per-stop cache: the guest runs and
                # may have just switched its page tables (the demo turns
                # paging on in this very loop's page).
                try:
                    phys = v.translate(rip & ~(PAGE - 1))
                except OSError:
                    phys = None
                if phys is None or phys // PAGE != page or not self.m.vcpus[v.index].runnable:
                    return result  # off the page, or a stop (Ctrl-C) waits for us
            return result
        finally:
            with self._lock:
                self._apply_protection()
            v.set_guest_debug(*previous)
            v.drop_exception(UD_VECTOR)

    def _step_irq_block(self) -> int:
        """KVM_GUESTDBG_BLOCKIRQ where KVM has it: a single step runs one
        instruction, not the interrupt handler KVM would inject first (as
        QEMU's gdbstub steps). Why it matters: the handler runs with TF
        clear, so the "step" runs on through it; a Linux guest's handler may
        then spin or halt (paravirtual spinlock, interrupts off) waiting for
        a vCPU the step keeps parked, and nothing ever exits (the nested
        lab's soft lockups under page-protection breakpoints)."""
        return abi.KVM_GUESTDBG_BLOCKIRQ & getattr(self.m, "guest_debug_flags", 0)

    def _run_watchdog(self):
        if self._watchdog is None:
            from vmscope.kvm.run_watchdog import RunWatchdog

            self._watchdog = RunWatchdog(KICK_SIGNAL)
        return self._watchdog

    def _note_blocked_step(self, v: Vcpu, rip: int) -> None:
        """Say (at -v) where a step on a protected page blocked, and how."""
        self.blocked_steps += 1
        try:
            state = {abi.KVM_MP_STATE_HALTED: "halted"}.get(v.mp_state(), "running")
            now = v.regs()
            where = f"rip {now.rip:#x}, rflags {now.rflags:#x}, {state}"
        except OSError as e:
            where = f"state unreadable: {e}"
        log.info("vCPU %d: a step at %#x on a protected page did not return in %.2f s (%s); "
                 "the other vCPUs run, the step is retried", v.index, rip, STEP_RUN_LIMIT, where)

    def _run_rep_string(self, v: Vcpu, rip: int) -> bool:
        """A ``rep stos``/``rep movs`` on a protected code page: run it whole
        (:mod:`vmscope.kvm.x86.rep_string`) rather than one iteration per step
        (Linux's clear_bss sits beside start_kernel). Translations come from
        KVM_TRANSLATE each time, not the per-stop cache: the guest runs."""
        from vmscope.kvm.x86 import rep_string

        try:
            code = self.read_memory(rip, 15, v.index + 1)
        except TargetError:
            return False
        s = v.sregs()
        long_mode = bool(s.efer & (1 << 10)) and bool(s.cs.l)
        if not long_mode and not s.cs.db:
            return False  # 16-bit code: not ours to do

        def phys_range(vaddr: int, n: int) -> list[tuple[int, int]] | None:
            pieces: list[tuple[int, int]] = []
            protected = self.m.slots.protected
            cur, end = vaddr, vaddr + n
            while cur < end:
                try:
                    phys = v.translate(cur & ~(PAGE - 1))
                except OSError:
                    return None
                if phys is None or not self.mem.contains(phys, PAGE) or phys // PAGE in protected:
                    return None
                take = min(end, (cur & ~(PAGE - 1)) + PAGE) - cur
                pieces.append((phys | (cur & (PAGE - 1)), take))
                cur += take
            return pieces

        def write_phys(phys: int, data: bytes) -> None:
            self.mem.view[phys : phys + len(data)] = data

        r = v.regs()
        regs = {"rip": r.rip, "rax": r.rax, "rcx": r.rcx, "rdi": r.rdi, "rsi": r.rsi, "eflags": r.rflags}
        out = rep_string.emulate(regs, code, long_mode, phys_range, self.mem.read, write_phys)
        if out is None:
            return False
        r.rip, r.rcx, r.rdi, r.rsi = out["rip"], out["rcx"], out["rdi"], out["rsi"]
        v.set_regs(r)
        return True

    def _decoded_read_hit(self, v: Vcpu, rip: int) -> StopEvent | None:
        """Does the instruction at rip read a read/access-watched range?"""
        if not any(w.kind != "write" and w.dr_slot is None for w in self.watches):
            return None
        try:
            code = self.read_memory(rip, 15, v.index + 1)
        except TargetError:
            return None
        regs = _LazyRegisters(self, v)  # this vCPU's own thread: no stop needed
        for addr, size in memory_reads(code, rip, regs, long_mode=bool(v.sregs().cs.l)):
            pieces, bad = self._pieces(addr, size, v.index + 1)
            for start, n in pieces:
                with self._lock:
                    ev = self._watch_hit(start, n, is_write=False)
                if ev is not None:
                    return ev
        return None
