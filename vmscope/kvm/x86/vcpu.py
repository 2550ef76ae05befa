"""One vCPU: its KVM fd, its shared ``kvm_run`` page and cached state.

State is read once per debug stop and cached (``KVM_GET_SREGS`` alone costs
about 64 µs here); writes go through to KVM at once and update the cache.
The cache is dropped whenever the vCPU runs. Only the owning thread calls
``KVM_RUN``; other ioctls may come from the stub's thread while the vCPU is
parked (KVM serialises vCPU ioctls with a per-vCPU mutex).
"""

from __future__ import annotations

import ctypes
import errno
import mmap

from vmscope.kvm import abi
from vmscope.kvm.abi import ioctl
from vmscope.kvm.vcpu import KvmVcpu

# KVM_CAP_SYNC_REGS: KVM copies the registers into the kvm_run page at every
# exit (kvm_valid_regs, kvm_dirty_regs, then struct kvm_sync_regs after the
# 256-byte exit union), so a debug stop reads them without KVM_GET_REGS
# (17 us) or KVM_GET_SREGS (64 us): see docs/performance.md.
KVM_CAP_SYNC_REGS = 74
KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS = 1, 2
_VALID_REGS_OFFSET = ctypes.sizeof(abi.KvmRun)  # 288
_SYNC_REGS_OFFSET = _VALID_REGS_OFFSET + 16
_SYNC_SREGS_OFFSET = _SYNC_REGS_OFFSET + ctypes.sizeof(abi.KvmRegs)


class Vcpu(KvmVcpu):
    def __init__(self, vm_fd: int, index: int, mmap_size: int):
        self.index = index
        self.fd = ioctl(vm_fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        self._run_map = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = abi.KvmRun.from_buffer(self._run_map)
        self._regs: abi.KvmRegs | None = None
        self._sregs: abi.KvmSregs | None = None
        self._fpu: abi.KvmFpu | None = None
        self._debug: tuple | None = None
        self.thread_id: int | None = None  # native id of the owning thread, for kicks
        self._sync = 0  # KVM_SYNC_X86_* groups KVM refreshes in kvm_run at every exit
        self._synced = False  # True once a KVM_RUN filled them
        self._clock_ctrl = True  # KVM_KVMCLOCK_CTRL works (guest_paused)
        try:
            caps = ioctl(vm_fd, abi.KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS, "KVM_CHECK_EXTENSION")
        except OSError:
            caps = 0
        wanted = max(caps, 0) & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)
        if wanted and mmap_size >= _SYNC_SREGS_OFFSET + ctypes.sizeof(abi.KvmSregs):
            ctypes.c_uint64.from_buffer(self._run_map, _VALID_REGS_OFFSET).value = wanted
            self._sync = wanted

    # --- cached state --------------------------------------------------------

    def invalidate(self) -> None:
        self._regs = self._sregs = self._fpu = None
        self._synced = False  # until the KVM_RUN about to come returns

    def exited(self) -> None:
        self._synced = True

    def regs(self) -> abi.KvmRegs:
        if self._regs is None:
            if self._synced and self._sync & KVM_SYNC_X86_REGS:
                self._regs = abi.KvmRegs.from_buffer_copy(self._run_map, _SYNC_REGS_OFFSET)
            else:
                r = abi.KvmRegs()
                ioctl(self.fd, abi.KVM_GET_REGS, r, "KVM_GET_REGS")
                self._regs = r
        return self._regs

    def set_regs(self, regs: abi.KvmRegs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")
        self._regs = regs

    def sregs(self) -> abi.KvmSregs:
        if self._sregs is None and self._synced and self._sync & KVM_SYNC_X86_SREGS:
            self._sregs = abi.KvmSregs.from_buffer_copy(self._run_map, _SYNC_SREGS_OFFSET)
        if self._sregs is None:
            s = abi.KvmSregs()
            ioctl(self.fd, abi.KVM_GET_SREGS, s, "KVM_GET_SREGS")
            self._sregs = s
        return self._sregs

    def sregs_at_hand(self) -> bool:
        """True when :meth:`sregs` costs no ioctl (cached, or synced by KVM
        at the last exit)."""
        return self._sregs is not None or (self._synced and bool(self._sync & KVM_SYNC_X86_SREGS))

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
        self._sregs = sregs

    def fpu(self) -> abi.KvmFpu:
        if self._fpu is None:
            f = abi.KvmFpu()
            ioctl(self.fd, abi.KVM_GET_FPU, f, "KVM_GET_FPU")
            self._fpu = f
        return self._fpu

    def set_fpu(self, fpu: abi.KvmFpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")
        self._fpu = fpu

    # --- other state ---------------------------------------------------------

    def translate(self, vaddr: int) -> int | None:
        """Guest-physical address of ``vaddr`` per KVM, or None if unmapped."""
        t = abi.KvmTranslation(linear_address=vaddr)
        ioctl(self.fd, abi.KVM_TRANSLATE, t, "KVM_TRANSLATE")
        return t.physical_address if t.valid else None

    def set_guest_debug(self, control: int, debugreg: tuple[int, ...] = (0,) * 8, force: bool = False) -> None:
        """KVM_SET_GUEST_DEBUG, skipped when nothing changed (it costs an
        ioctl per resume otherwise). ``force`` re-arms a single step: KVM
        keeps TF only while rip is where it was at this call, so an
        instruction KVM emulates (an MMIO write) drops the step after it."""
        key = (control, tuple(debugreg))
        if key == self._debug and not force:
            return
        dbg = abi.KvmGuestDebug(control=control)
        for i, v in enumerate(debugreg):
            dbg.debugreg[i] = v
        ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")
        self._debug = key

    @property
    def debug_state(self) -> tuple:
        """(control, debugreg) as last set, to restore after a nested step."""
        return self._debug or (0, (0,) * 8)

    def events(self) -> abi.KvmVcpuEvents:
        ev = abi.KvmVcpuEvents()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def inject_exception(self, vector: int) -> None:
        ev = self.events()
        ev.exception.injected = 1
        ev.exception.nr = vector
        ev.exception.has_error_code = 0
        ev.exception.pending = 0
        ev.flags = 0
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def drop_exception(self, vector: int) -> bool:
        """Forget a queued exception ``vector`` (KVM queues #UD along with
        an emulation-failure exit; once the VMM has dealt with the failure,
        delivering it would crash the guest). True if one was dropped."""
        ev = self.events()
        if (ev.exception.injected or ev.exception.pending) and ev.exception.nr == vector:
            ev.exception.injected = ev.exception.pending = 0
            ev.exception_has_payload = 0
            ev.flags = 0
            ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")
            return True
        return False

    def mp_state(self) -> int:
        st = abi.KvmMpState()
        ioctl(self.fd, abi.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.KvmMpState(state), "KVM_SET_MP_STATE")

    def set_cpuid(self, entries: ctypes.Array) -> None:
        struct = abi.cpuid2_struct(len(entries))()
        struct.nent = len(entries)
        ctypes.memmove(struct.entries, entries, ctypes.sizeof(entries))
        ioctl(self.fd, abi.KVM_SET_CPUID2, struct, "KVM_SET_CPUID2")

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = abi.msrs_struct(len(values))()
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        n = ioctl(self.fd, abi.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if n != len(values):
            bad = list(values)[n]
            raise OSError(f"KVM_SET_MSRS: KVM refused MSR {bad:#x}")

    # --- running -------------------------------------------------------------

    def complete_pending_exit(self) -> None:
        """Let KVM finish the instruction behind the exit just served (an
        MSR or port access) without running further: KVM_RUN with
        ``immediate_exit`` completes pending operations, then returns."""
        self.run.immediate_exit = 1
        try:
            self.enter()
        finally:
            self.run.immediate_exit = 0

    def guest_paused(self) -> None:
        """``KVM_KVMCLOCK_CTRL``: the guest's kvmclock page gets the
        PVCLOCK_GUEST_STOPPED flag at its next entry, which Linux's
        soft-lockup watchdog and RCU stall detector check (and clear) before
        reporting a stall. Called while the vCPU is parked (KVM: "any time
        after pausing the vcpu, but before it is resumed").
        EINVAL means the guest has not registered a kvmclock (a bare-metal
        guest, or Linux before its clock set-up): nothing to tell; a KVM
        without the ioctl is not asked again."""
        if not self._clock_ctrl:
            return
        try:
            ioctl(self.fd, abi.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")
        except OSError as e:
            if e.errno != errno.EINVAL:
                self._clock_ctrl = False

    def summary(self) -> str:
        """One line with the registers that explain why a guest died."""
        try:
            r, s = self.regs(), self.sregs()
        except OSError as e:
            return f"vCPU {self.index}: registers unreadable ({e})"
        return (
            f"vCPU {self.index}: rip={r.rip:#x} rsp={r.rsp:#x} rflags={r.rflags:#x} "
            f"rax={r.rax:#x} rbx={r.rbx:#x} rcx={r.rcx:#x} rdx={r.rdx:#x} "
            f"cs={s.cs.selector:#x} cr0={s.cr0:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x}"
        )

