"""Page-protection breakpoints and watchpoints of the x86 KVM debug target:
the watched page is mapped read-only (write watches) or pulled out of the
memory slots (read/access watches, execution breakpoints), so guest
accesses exit as MMIO; the VMM performs the access on the memfd, lets KVM
finish the instruction, and reports the stop after it.
"""

from __future__ import annotations

from vmscope.gdbserver.target import SIGTRAP, StopEvent, TargetError
from vmscope.kvm import abi
from vmscope.gdbserver.toolkit import WATCH_STOP_KIND
from vmscope.kvm.x86.translate import PAGE
from vmscope.kvm.x86.vcpu import Vcpu


class X86PageProtection:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`."""

    def _add_exec_page_breakpoint(self, addr: int, kind: str) -> None:
        """Pull the breakpoint's code page out of the memory slots: every
        instruction fetch there exits; the one at ``addr`` is the hit."""
        with self._lock:
            if addr in self._exec_pages:
                self._exec_kind[addr] = kind
                return
            phys = self._phys_page(addr & ~(PAGE - 1), 1)
            if phys is None:
                raise TargetError(f"cannot set a breakpoint at {addr:#x}: address not mapped")
            self._exec_pages[addr] = phys | (addr & (PAGE - 1))
            self._exec_kind[addr] = kind
            self._protection_changed()

    def _remove_exec_page_breakpoint(self, addr: int) -> None:
        with self._lock:
            self._exec_kind.pop(addr, None)
            if self._exec_pages.pop(addr, None) is None:
                return
            self._protection_changed()

    def _protection_changed(self) -> None:
        """The memory slots must follow the watchpoint and exec-page tables.
        While the machine is stopped that waits for the next resume: gdb
        removes every watchpoint at each stop and inserts it again before
        it resumes, and each change rebuilt the slots (4 ioctls, about 5 ms
        per hit together on this KVM; docs/performance.md). Rebuilding at
        resume finds the same protection and changes nothing. Caller holds
        ``_lock``."""
        if self.m.stopped and not self.m.ending:
            self._protection_dirty = True
            return
        with self.m.quiesced():
            self._apply_protection()

    def _apply_protection(self) -> None:
        """Memory slots for the page-backed watchpoints: read-only pages for
        write watches, absent pages for read/access watches."""
        protected: dict[int, str] = {page // PAGE: "absent" for page in self._exec_pages.values()}
        for w in self.watches:
            if w.dr_slot is not None:
                continue
            mode = "readonly" if w.kind == "write" else "absent"
            for start, n in w.phys:
                for page in range(start // PAGE, (start + n - 1) // PAGE + 1):
                    if protected.get(page) != "absent":
                        protected[page] = mode
        self._absent_pages = frozenset(p for p, mode in protected.items() if mode == "absent")
        self.m.slots.set_protection(protected)

    def _watch_hit(self, phys: int, length: int, is_write: bool) -> StopEvent | None:
        """The watchpoint an access of guest-physical ``phys``+``length`` trips."""
        for w in self.watches:
            if w.dr_slot is not None:
                continue
            if is_write and w.kind == "read" or not is_write and w.kind == "write":
                continue
            voff = 0
            for start, n in w.phys:
                lo, hi = max(start, phys), min(start + n, phys + length)
                if lo < hi:
                    return StopEvent(WATCH_STOP_KIND[w.kind], addr=w.addr + voff + (lo - start))
                voff += n
        return None

    def on_mmio(self, v: Vcpu) -> None:
        """An access to a page with no (writable) memory slot: a page-backed
        watchpoint's page, or a hole where no device lives."""
        hit = self._complete_mmio(v)
        tid = v.index + 1
        if self._write_claimed.pop(v.index, False):
            return  # a watched write of this instruction already claimed (or deferred) the stop
        if hit is not None:
            ev = StopEvent(hit.kind, tid=tid, addr=hit.addr)
            self.m.request_stop(ev, keep_if_busy=lambda e: self._pending.__setitem__(v.index, e))
        elif self._stepping == v.index and self.attached:
            # The instruction is done, and KVM drops the single-step trap
            # after an emulated MMIO write: report the step ourselves.
            self.m.request_stop(StopEvent("signal", tid=tid, signal=SIGTRAP))

    def _complete_mmio(self, v: Vcpu) -> StopEvent | None:
        """Serve the MMIO exit ``v`` took, then let KVM finish the
        instruction (an RMW instruction reads, then writes: more MMIO)
        without running further, by re-entering with immediate_exit."""
        hit = self._service_mmio(v)
        v.run.immediate_exit = 1
        try:
            while v.enter():
                if v.run.exit_reason != abi.KVM_EXIT_MMIO:
                    self.m.handle_exit_of(v)
                    break
                hit = self._service_mmio(v) or hit
        finally:
            v.run.immediate_exit = 0
        return hit

    def _service_mmio(self, v: Vcpu) -> StopEvent | None:
        mmio = v.run.exit.mmio
        phys, n, is_write = mmio.phys_addr, min(mmio.len, 8), bool(mmio.is_write)
        in_ram = self.mem.contains(phys, n)
        if is_write and in_ram and self.attached:
            with self._lock:
                hit = self._watch_hit(phys, n, True)
            if hit is not None:
                self._watched_write(v, phys, bytes(mmio.data[:n]), hit)
                return None  # the stop is claimed (or deferred) already
        if is_write:
            if in_ram:
                self.mem.view[phys : phys + n] = bytes(mmio.data[:n])
        else:
            data = self.mem.read(phys, n) if in_ram else b"\xff" * n
            for i, b in enumerate(data):
                mmio.data[i] = b
        if not in_ram:
            return None
        with self._lock:
            return self._watch_hit(phys, n, is_write)

    def _watched_write(self, v: Vcpu, phys: int, data: bytes, hit: StopEvent) -> None:
        """A write that trips a watchpoint: claim the stop first, then write.
        If another vCPU's stop came first, hold the write back with the hit
        (both are released on the next resume), else two vCPUs' writes would
        both land before GDB reads the "new" value (old 53, new 55)."""
        ev = StopEvent(hit.kind, tid=v.index + 1, addr=hit.addr)

        def defer(e: StopEvent) -> None:
            self._pending[v.index] = e
            self._deferred_writes.setdefault(v.index, []).append((phys, data))

        self._write_claimed[v.index] = True
        if self.m.request_stop(ev, keep_if_busy=defer):
            self.mem.view[phys : phys + len(data)] = data

    def _apply_deferred_writes(self, idx: int | None = None) -> None:
        for i in ([idx] if idx is not None else list(self._deferred_writes)):
            for phys, data in self._deferred_writes.pop(i, []):
                self.mem.view[phys : phys + len(data)] = data
