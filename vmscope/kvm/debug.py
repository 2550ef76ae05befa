"""``KvmTarget``: the GDB stub's view of a :class:`~vmscope.kvm.vm.KvmMachine`.

Threads are vCPUs (tid = index + 1); all-stop: a stop of one vCPU parks
them all (see :mod:`vmscope.kvm.vm`). While one vCPU single-steps, the
others stay parked (as QEMU's and kvmtool's stubs do), whatever the
``vCont`` asked of them; so ``stepi`` never lets another vCPU move.

How each debug feature maps onto KVM, and the quirks of this machine's
software KVM (PVM) it copes with:

- Software breakpoints patch 0xCC into guest RAM (through the memfd) with
  ``KVM_GUESTDBG_USE_SW_BP``. Hardware KVM reports an INT3 as
  ``KVM_EXIT_DEBUG`` (#BP, rip at the 0xCC); PVM reports it as an emulation
  failure (``KVM_EXIT_INTERNAL_ERROR`` suberror 1) with rip at the 0xCC.
  Both paths land in :meth:`KvmTarget._int3`: ours -> ``swbreak`` stop; the
  guest's own -> #BP injected through ``KVM_SET_VCPU_EVENTS`` (after an
  emulation failure rip is first moved past the INT3, since nothing in KVM
  recorded the instruction length). Reads hide our 0xCC bytes.
- Hardware breakpoints use DR0-DR3. RFLAGS.RF is ignored on PVM, so a vCPU
  resumed at an enabled hardware breakpoint first steps one instruction
  with the breakpoints off.
- Watchpoints: debug registers where they fire (hardware KVM, aligned
  1/2/4/8-byte write or access watches, while slots last); on PVM data
  breakpoints never fire for emulated ring-0 stores, so watchpoints are
  backed by page protection: the watched page is mapped read-only (write
  watches) or removed from the memory slots (read/access watches). Guest
  accesses to it then exit as MMIO; the VMM performs the access on the
  memfd, lets KVM finish the instruction (``immediate_exit`` re-entry),
  and reports the stop after it, with the new value in memory, as GDB's
  ``watch`` needs. There is no 4-slot limit. Limits: code must not execute
  from a read/access-watched page, and the page tables must not share it.
  Force a mechanism with ``VMSCOPE_KVM_WATCH=pages`` or ``=debugregs``.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from vmscope.arch.x86_64 import X86_64
from vmscope.gdbserver.target import (
    SIGINT,
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
    TargetFiles,
    ThreadNames,
    WatchKind,
    Watchpoints,
)
from vmscope.kvm import abi
from vmscope.kvm.linux_support import MONITOR_HELP as LINUX_MONITOR_HELP
from vmscope.kvm.linux_support import LinuxSupport
from vmscope.kvm.paging import PAGE, Translator
from vmscope.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from vmscope.kvm.vm import KvmMachine

log = logging.getLogger(__name__)

INT3 = 0xCC
BP_VECTOR, DB_VECTOR, UD_VECTOR = 3, 1, 6
DR6_BS = 1 << 14
RFLAGS_TF = 1 << 8
# instructions one vCPU single-steps on a protected page per exclusive turn
PAGE_STEP_BATCH = 256
# port exits one stepped instruction may take (string I/O) before we call the step lost
MAX_IO_EXITS_PER_STEP = 64
# seconds one stepped instruction may block in KVM_RUN with the others parked
STEP_RUN_LIMIT = 0.25
DR7_RW = {"exec": 0b00, "write": 0b01, "access": 0b11}
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
WATCH_STOP_KIND = {"write": "watch", "read": "rwatch", "access": "awatch"}
MSR_KERNEL_GS_BASE = 0xC0000102

GPRS = ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip").split()
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
FPU_NAMES = frozenset(
    [f"st{i}" for i in range(8)] + [f"xmm{i}" for i in range(16)]
    + "fctrl fstat ftag fiseg fioff foseg fooff fop mxcsr".split()
)
SREG_NAMES = frozenset(SEGS + ("fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"))


class _LazyRegisters(Mapping):
    """Register values by name, each group read from KVM on first access
    (and then cached by the vCPU until it runs again)."""

    def __init__(self, target: "KvmTarget", v: Vcpu):
        self._t, self._v = target, v
        self._values: dict[str, int] = {}
        self._names = target.arch.index

    def _group(self, name: str) -> dict[str, int]:
        if name in FPU_NAMES:
            return self._t._fpu_values(self._v)
        if name in SREG_NAMES:
            return self._t._sreg_values(self._v)
        if name == "k_gs_base":
            return {"k_gs_base": self._t._msr(self._v, MSR_KERNEL_GS_BASE)}
        return self._t._gpr_values(self._v)

    def __getitem__(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._values:
            self._values.update(self._group(name))
        return self._values[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def software_kvm() -> bool:
    """True on PVM-style software KVM (no VMX/SVM), where DR data
    watchpoints do not fire for emulated ring-0 accesses."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "vmx" not in flags and "svm" not in flags
    except OSError:
        pass
    return False


@dataclass
class Watch:
    addr: int
    length: int
    kind: WatchKind
    phys: list[tuple[int, int]]  # (guest-physical start, length) pieces
    dr_slot: int | None = None  # debug register, or None: page protection


@dataclass
class SwBreak:
    phys: int
    orig: int


class KvmTarget(
    LinuxSupport, Target, SwBreakpoints, HwBreakpoints, Watchpoints, MonitorCommands,
    AddressTranslation, PhysicalMemory, ThreadNames, TargetFiles,
):
    arch = X86_64

    def __init__(self, machine: "KvmMachine"):
        self.m = machine
        self.mem = machine.mem
        self.notifier = StopNotifier()
        self.translator = Translator(machine.mem)
        self._lock = threading.RLock()  # breakpoint tables (vCPU threads read them)
        self._absent_pages: frozenset[int] = frozenset()
        self.sw: dict[int, SwBreak] = {}
        self.hw: dict[int, int] = {}  # exec address -> DR slot
        self.watches: list[Watch] = []
        self.attached = False
        self._stepping: int | None = None  # vCPU index that single-steps
        self._step_over: set[int] = set()  # vCPUs stepping off a hw breakpoint
        self._pending: dict[int, StopEvent] = {}  # unreported watch hits by vCPU
        # Watched writes of vCPUs that lost the race against another stop:
        # held back (the guest thinks they are done) until that vCPU's own
        # hit is reported, so GDB sees each write's old and new value.
        self._deferred_writes: dict[int, list[tuple[int, bytes]]] = {}
        self._write_claimed: dict[int, bool] = {}  # vCPU index -> its MMIO write claimed the stop
        self._msr_cache: dict[int, int] = {}
        self._watchdog = None  # a RunWatchdog, made on the first protected-page step
        self.blocked_steps = 0  # protected-page steps that hit the watchdog's limit
        # Which debug mechanisms this KVM serves is measured by a probe VM
        # (vmscope.kvm.probe), on first use: a VM that nobody debugs does not
        # pay for it at start-up (0.3 s in the nested lab).
        self._watch_mode = os.environ.get("VMSCOPE_KVM_WATCH", "auto")
        if self._watch_mode not in ("auto", "pages", "debugregs"):
            raise ValueError(f"VMSCOPE_KVM_WATCH must be auto, pages or debugregs, not {self._watch_mode!r}")
        self._bp_mode = os.environ.get("VMSCOPE_KVM_BREAKPOINTS", "auto")
        if self._bp_mode not in ("auto", "pages", "native"):
            raise ValueError(f"VMSCOPE_KVM_BREAKPOINTS must be auto, pages or native, not {self._bp_mode!r}")
        self._mechanisms: tuple[bool, bool, bool] | None = None
        self._caps = None
        self._exec_pages: dict[int, int] = {}  # page-backed exec breakpoint -> guest-physical
        self._exec_kind: dict[int, str] = {}  # ... -> "swbreak" | "hwbreak"
        self._skip_exec: dict[int, int] = {}  # vCPU index -> breakpoint it resumes on

    # --- debug mechanisms (probed on first use) ------------------------------------------

    def _resolve_mechanisms(self) -> tuple[bool, bool, bool]:
        """(dr_watch, sw_pages, hw_pages) for this host's KVM."""
        if self._mechanisms is None:
            caps = None
            if "auto" in (self._watch_mode, self._bp_mode):
                from vmscope.kvm.probe import probe

                try:
                    caps = probe()
                except OSError:
                    caps = None
            if self._watch_mode == "auto":
                dr_watch = caps.dr_write_watch if caps else not software_kvm()
            else:
                dr_watch = self._watch_mode == "debugregs"
            # Where KVM does not see INT3 or debug-register hits (KVM nested
            # under QEMU's TCG SVM), execution breakpoints use page protection.
            bp = self._bp_mode
            sw_pages = bp == "pages" or (bp == "auto" and caps is not None and caps.int3 == "guest")
            hw_pages = bp == "pages" or (bp == "auto" and caps is not None and not caps.dr_exec)
            self._caps = caps
            self._mechanisms = (dr_watch, sw_pages, hw_pages)
        return self._mechanisms

    @property
    def dr_watch(self) -> bool:
        return self._resolve_mechanisms()[0]

    @property
    def sw_pages(self) -> bool:
        return self._resolve_mechanisms()[1]

    @property
    def hw_pages(self) -> bool:
        return self._resolve_mechanisms()[2]

    @property
    def caps(self):
        self._resolve_mechanisms()
        return self._caps

    # --- threads -------------------------------------------------------------------

    def _vcpu(self, tid: int) -> Vcpu:
        if tid <= 0:  # 0/-1: any thread
            tid = 1
        if tid > len(self.m.vcpus):
            raise TargetError(f"no thread {tid}: the VM has {len(self.m.vcpus)} vCPUs (threads 1..{len(self.m.vcpus)})", errno.ESRCH)
        return self.m.vcpus[tid - 1].vcpu

    def _require_stopped(self) -> None:
        if not self.m.stopped:
            raise TargetError("the guest is running; stop it first", errno.EBUSY)

    def threads(self) -> list[int]:
        return [i + 1 for i in range(len(self.m.vcpus))]

    def thread_name(self, tid: int) -> str:
        slot = self.m.vcpus[tid - 1]
        return f"vCPU {tid - 1}" + ("" if slot.online else " (waiting for SIPI)")

    # --- registers -------------------------------------------------------------------

    def read_registers(self, tid: int) -> Mapping[str, int]:
        """A mapping that fetches each group (GPRs, control/segment state,
        FPU/SSE, MSRs) on first use: a stop reply needs only rip/rsp/rbp,
        so stepping costs one KVM_GET_REGS, not four ioctls."""
        self._require_stopped()  # a vCPU ioctl would block until KVM_RUN returns
        return _LazyRegisters(self, self._vcpu(tid))

    def _gpr_values(self, v: Vcpu) -> dict[str, int]:
        r = v.regs()
        out = {name: getattr(r, name) for name in GPRS}
        out["eflags"] = r.rflags
        return out

    def _sreg_values(self, v: Vcpu) -> dict[str, int]:
        s = v.sregs()
        out = {name: getattr(s, name).selector for name in SEGS}
        out["fs_base"], out["gs_base"] = s.fs.base, s.gs.base
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
            out[name] = getattr(s, name)
        return out

    def _fpu_values(self, v: Vcpu) -> dict[str, int]:
        f = v.fpu()
        out = {}
        for i in range(8):
            out[f"st{i}"] = int.from_bytes(bytes(f.fpr[i])[:10], "little")
        out["fctrl"], out["fstat"] = f.fcw, f.fsw
        out["ftag"] = _full_tag_word(f.ftwx)
        out["fioff"], out["fooff"], out["fop"] = f.last_ip & 0xFFFFFFFF, f.last_dp & 0xFFFFFFFF, f.last_opcode
        out["fiseg"] = out["foseg"] = 0  # FXSAVE in 64-bit mode keeps no selectors
        for i in range(16):
            out[f"xmm{i}"] = int.from_bytes(bytes(f.xmm[i]), "little")
        out["mxcsr"] = f.mxcsr
        return out

    def _msr(self, v: Vcpu, index: int) -> int:
        key = (v.index << 32) | index
        if key not in self._msr_cache:
            msrs = abi.msrs_struct(1)()
            msrs.nmsrs = 1
            msrs.entries[0].index = index
            try:
                n = abi.ioctl(v.fd, abi.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
            except OSError:
                n = 0
            self._msr_cache[key] = msrs.entries[0].data if n == 1 else 0
        return self._msr_cache[key]

    def write_registers(self, tid: int, values: Mapping[str, int]) -> None:
        self._require_stopped()
        v = self._vcpu(tid)
        names = set(values)
        unknown = names - set(self.arch.index)
        if unknown:
            raise TargetError(f"no such register(s): {', '.join(sorted(unknown))}", errno.EINVAL)
        if names & (set(GPRS) | {"eflags"}):
            r = v.regs()
            for name in names & set(GPRS):
                setattr(r, name, values[name] & (2**64 - 1))
            if "eflags" in names:
                r.rflags = values["eflags"] & 0xFFFFFFFF
            v.set_regs(r)
        if names & SREG_NAMES:
            s = v.sregs()
            for name in names & set(SEGS):
                getattr(s, name).selector = values[name] & 0xFFFF
            if "fs_base" in names:
                s.fs.base = values["fs_base"]
            if "gs_base" in names:
                s.gs.base = values["gs_base"]
            for name in names & {"cr0", "cr2", "cr3", "cr4", "cr8", "efer"}:
                setattr(s, name, values[name])
            v.set_sregs(s)
            self.translator.clear()
        if names & FPU_NAMES:
            f = v.fpu()
            for i in range(8):
                if f"st{i}" in names:
                    raw = values[f"st{i}"].to_bytes(10, "little") + bytes(6)
                    for j, b in enumerate(raw):
                        f.fpr[i][j] = b
            for i in range(16):
                if f"xmm{i}" in names:
                    for j, b in enumerate(values[f"xmm{i}"].to_bytes(16, "little")):
                        f.xmm[i][j] = b
            if "fctrl" in names:
                f.fcw = values["fctrl"] & 0xFFFF
            if "fstat" in names:
                f.fsw = values["fstat"] & 0xFFFF
            if "ftag" in names:
                f.ftwx = _abridged_tag_word(values["ftag"])
            if "fop" in names:
                f.last_opcode = values["fop"] & 0xFFFF
            if "fioff" in names:
                f.last_ip = values["fioff"]
            if "fooff" in names:
                f.last_dp = values["fooff"]
            if "mxcsr" in names:
                f.mxcsr = values["mxcsr"] & 0xFFFFFFFF
            v.set_fpu(f)

    # --- memory ----------------------------------------------------------------------

    def translate(self, addr: int, tid: int) -> int:
        phys = self._phys_page(addr & ~(PAGE - 1), tid)
        if phys is None:
            raise TargetError(f"virtual address {addr:#x} is not mapped (thread {tid})")
        return phys | (addr & (PAGE - 1))

    def _phys_page(self, vpage: int, tid: int) -> int | None:
        """The selected vCPU's translation, then any other vCPU's. The image
        of a kernel caught at its entry comes first: the decompressor's page
        tables (still loaded then) do not map it, or map it wrongly."""
        image = self.kernel_image_page(vpage)
        if image is not None:
            return image
        first = self._vcpu(tid)
        phys = self.translator.page(first, vpage)
        if phys is None:
            for slot in self.m.vcpus:
                if slot.vcpu is not first and slot.online:
                    phys = self.translator.page(slot.vcpu, vpage)
                    if phys is not None:
                        break
        if phys is not None and not self.mem.contains(phys, PAGE):
            return None
        return phys

    def _pieces(self, addr: int, length: int, tid: int) -> tuple[list[tuple[int, int]], int | None]:
        """Physical (start, length) pieces of a virtual range, stopping at
        the first unmapped page (whose address is returned too)."""
        pieces: list[tuple[int, int]] = []
        cur, end = addr, addr + length
        while cur < end:
            vpage = cur & ~(PAGE - 1)
            n = min(end, vpage + PAGE) - cur
            phys = self._phys_page(vpage, tid)
            if phys is None:
                return pieces, cur
            start = phys | (cur & (PAGE - 1))
            if pieces and pieces[-1][0] + pieces[-1][1] == start:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
            else:
                pieces.append((start, n))
            cur += n
        return pieces, None

    def read_memory(self, addr: int, length: int, tid: int) -> bytes:
        if length <= 0:
            return b""
        if addr < 0 or addr + length > 2**64:
            raise TargetError(f"address {addr:#x}+{length} is outside the 64-bit address space", errno.EINVAL)
        pieces, bad = self._pieces(addr, length, tid)
        if not pieces:
            raise TargetError(f"cannot read {addr:#x}: address not mapped")
        data = bytearray()
        view = self.mem.view
        for start, n in pieces:
            data += view[start : start + n]
        with self._lock:
            if self.sw:
                for vaddr, bp in self.sw.items():
                    if addr <= vaddr < addr + len(data):
                        data[vaddr - addr] = bp.orig
        return bytes(data)

    def write_memory(self, addr: int, data: bytes, tid: int) -> None:
        if not data:
            return
        pieces, bad = self._pieces(addr, len(data), tid)
        if bad is not None:
            raise TargetError(f"cannot write {addr:#x}+{len(data)}: address {bad:#x} not mapped")
        buf = bytearray(data)
        with self._lock:
            for vaddr, bp in self.sw.items():  # keep our 0xCC, remember the new byte
                if addr <= vaddr < addr + len(buf):
                    bp.orig = buf[vaddr - addr]
                    buf[vaddr - addr] = INT3
            off = 0
            for start, n in pieces:
                self.mem.view[start : start + n] = buf[off : off + n]
                off += n

    def read_physical(self, addr: int, length: int) -> bytes:
        if not self.mem.contains(addr, 1):
            raise TargetError(f"guest-physical address {addr:#x} is outside RAM (0..{self.mem.size:#x})")
        return self.mem.read(addr, min(length, self.mem.size - addr))

    def write_physical(self, addr: int, data: bytes) -> None:
        if not self.mem.contains(addr, len(data)):
            raise TargetError(f"guest-physical range {addr:#x}+{len(data)} is outside RAM (0..{self.mem.size:#x})")
        self.mem.write(addr, data)

    # --- software breakpoints -------------------------------------------------------------

    def add_sw_breakpoint(self, addr: int, kind: int) -> None:
        if self.sw_pages:
            return self._add_exec_page_breakpoint(addr, "swbreak")
        with self._lock:
            if addr in self.sw:
                return
            phys = self._phys_page(addr & ~(PAGE - 1), 1)
            if phys is None:
                raise TargetError(f"cannot set a breakpoint at {addr:#x}: address not mapped")
            phys |= addr & (PAGE - 1)
            orig = self.mem.view[phys]
            self.sw[addr] = SwBreak(phys, orig)
            self.mem.view[phys] = INT3

    def remove_sw_breakpoint(self, addr: int, kind: int) -> None:
        if self.sw_pages:
            return self._remove_exec_page_breakpoint(addr)
        with self._lock:
            bp = self.sw.pop(addr, None)
            if bp is None:
                return
            if self.mem.view[bp.phys] == INT3:
                self.mem.view[bp.phys] = bp.orig

    # --- execution breakpoints by page protection (no INT3/DR intercept) ----------------

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
            with self.m.quiesced():
                self._apply_protection()

    def _remove_exec_page_breakpoint(self, addr: int) -> None:
        with self._lock:
            self._exec_kind.pop(addr, None)
            if self._exec_pages.pop(addr, None) is None:
                return
            with self.m.quiesced():
                self._apply_protection()

    # --- debug registers: hardware breakpoints and DR watchpoints ---------------------------

    def _dr_slots_used(self) -> set[int]:
        return set(self.hw.values()) | {w.dr_slot for w in self.watches if w.dr_slot is not None}

    def _free_dr_slot(self) -> int | None:
        used = self._dr_slots_used()
        return next((i for i in range(4) if i not in used), None)

    def add_hw_breakpoint(self, addr: int, kind: int) -> None:
        if self.hw_pages:
            return self._add_exec_page_breakpoint(addr, "hwbreak")
        with self._lock:
            if addr in self.hw:
                return
            slot = self._free_dr_slot()
            if slot is None:
                raise TargetError("all 4 debug registers are in use (hardware breakpoints and watchpoints)", errno.ENOSPC)
            self.hw[addr] = slot

    def remove_hw_breakpoint(self, addr: int, kind: int) -> None:
        if self.hw_pages:
            return self._remove_exec_page_breakpoint(addr)
        with self._lock:
            self.hw.pop(addr, None)

    def _debugregs(self, with_exec: bool = True) -> tuple[int, ...]:
        dr = [0] * 8
        dr7 = 0
        if with_exec:
            for addr, slot in self.hw.items():
                dr[slot] = addr
                dr7 |= 1 << (slot * 2)
        for w in self.watches:
            if w.dr_slot is not None:
                dr[w.dr_slot] = w.addr
                dr7 |= (1 << (w.dr_slot * 2)) | (DR7_RW[w.kind] << (16 + 4 * w.dr_slot)) | (DR7_LEN[w.length] << (18 + 4 * w.dr_slot))
        dr[7] = dr7
        return tuple(dr)

    # --- watchpoints ------------------------------------------------------------------------

    def add_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        if kind not in WATCH_STOP_KIND:
            raise TargetError(f"unknown watchpoint kind {kind!r}", errno.EINVAL)
        if length <= 0:
            raise TargetError(f"watchpoint length must be positive, got {length}", errno.EINVAL)
        with self._lock:
            if any(w.addr == addr and w.length == length and w.kind == kind for w in self.watches):
                return
            pieces, bad = self._pieces(addr, length, 1)
            if bad is not None:
                raise TargetError(f"cannot watch {addr:#x}+{length}: address {bad:#x} not mapped")
            w = Watch(addr, length, kind, pieces)
            if self.dr_watch and kind != "read" and length in DR7_LEN and addr % length == 0:
                w.dr_slot = self._free_dr_slot()
            self.watches.append(w)
            with self.m.quiesced():
                self._apply_protection()

    def remove_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        with self._lock:
            self.watches = [w for w in self.watches if not (w.addr == addr and w.length == length and w.kind == kind)]
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

    # --- exits from vCPU threads --------------------------------------------------------------

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

    def on_internal_error(self, v: Vcpu) -> bool:
        """An emulation failure; True when it was an INT3 we dealt with."""
        run = v.run
        if run.exit.internal.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
            return False
        rip = v.regs().rip
        ef = run.exit.emulation_failure
        insn_is_int3 = run.exit.internal.ndata >= 2 and ef.flags & 1 and ef.insn_size >= 1 and ef.insn_bytes[0] == INT3
        try:
            current = self.read_memory_raw(rip, v)
        except TargetError:
            current = None
        if not insn_is_int3 and current != INT3:
            return self._fetch_from_watched_page(v, rip)
        self._int3(v, rip, current, after_emulation_failure=True)
        return True

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
            from vmscope.kvm.vm import KICK_SIGNAL

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
        (:mod:`vmscope.kvm.rep_string`) rather than one iteration per step
        (Linux's clear_bss sits beside start_kernel). Translations come from
        KVM_TRANSLATE each time, not the per-stop cache: the guest runs."""
        from vmscope.kvm import rep_string

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

    def read_memory_raw(self, vaddr: int, v: Vcpu) -> int:
        phys = self._phys_page(vaddr & ~(PAGE - 1), v.index + 1)
        if phys is None:
            raise TargetError(f"{vaddr:#x} not mapped")
        return self.mem.view[phys | (vaddr & (PAGE - 1))]

    def _int3(self, v: Vcpu, rip: int, current: int | None, after_emulation_failure: bool) -> None:
        with self._lock:
            ours = rip in self.sw
        if ours:
            self.m.request_stop(StopEvent("swbreak", tid=v.index + 1, signal=SIGTRAP))
            return
        if current != INT3:
            return  # our breakpoint, removed meanwhile: just run the original instruction
        # The guest's own INT3: deliver #BP to the guest.
        if after_emulation_failure:
            r = v.regs()
            r.rip = rip + 1
            v.set_regs(r)
        v.inject_exception(BP_VECTOR)

    def on_debug_exit(self, v: Vcpu) -> None:
        dbg = v.run.exit.debug
        tid = v.index + 1
        if dbg.exception == BP_VECTOR:
            rip = v.regs().rip
            try:
                current = self.read_memory_raw(rip, v)
            except TargetError:
                current = None
            self._int3(v, rip, current, after_emulation_failure=False)
            return
        dr6 = dbg.dr6
        if v.index in self._step_over and dr6 & DR6_BS:
            # Stepped off a hardware breakpoint: put the breakpoints back, go on.
            self._step_over.discard(v.index)
            self._apply_debug(v, step=False)
            return
        with self._lock:
            for slot in range(4):
                if not dr6 & (1 << slot):
                    continue
                for addr, s in self.hw.items():
                    if s == slot:
                        self.m.request_stop(StopEvent("hwbreak", tid=tid))
                        return
                for w in self.watches:
                    if w.dr_slot == slot:
                        ev = StopEvent(WATCH_STOP_KIND[w.kind], tid=tid, addr=w.addr)
                        self.m.request_stop(ev, keep_if_busy=lambda e: self._pending.__setitem__(v.index, e))
                        return
        # A single step, or a #DB we cannot place: report a plain SIGTRAP.
        self.m.request_stop(StopEvent("signal", tid=tid, signal=SIGTRAP))

    def post_stop(self, event: StopEvent) -> None:
        self.notifier.post(event)

    def guest_ended(self, status: int) -> None:
        self.notifier.post(StopEvent("exited", code=status))

    # --- run control ---------------------------------------------------------------------------

    def _apply_debug(self, v: Vcpu, step: bool) -> None:
        """Debug state for a vCPU about to run. A vCPU sitting on an enabled
        hardware breakpoint first steps with the exec breakpoints off
        (RFLAGS.RF is ignored on PVM)."""
        if not self.attached:
            v.set_guest_debug(0)
            return
        control = abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_SW_BP
        with self._lock:
            on_hw_bp = bool(self.hw) and v.regs().rip in self.hw
            regs = self._debugregs(with_exec=not on_hw_bp)
        if regs[7]:
            control |= abi.KVM_GUESTDBG_USE_HW_BP
        if step or on_hw_bp:
            control |= abi.KVM_GUESTDBG_SINGLESTEP | self._step_irq_block()
        if on_hw_bp and not step:
            self._step_over.add(v.index)
        v.set_guest_debug(control, regs)

    def resume(self, actions: ResumeActions) -> None:
        self.attached = True
        if self._post_pending():
            return
        self.translator.clear()
        self._msr_cache.clear()
        self._step_over.clear()
        self._skip_exec.clear()
        if self._exec_pages:
            for slot in self.m.vcpus:
                if slot.online:
                    rip = slot.vcpu.regs().rip
                    if rip in self._exec_pages:
                        self._skip_exec[slot.vcpu.index] = rip
        stepping = [t for t in actions.stepping if 1 <= t <= len(self.m.vcpus)]
        run: dict[int, bool] = {}
        if stepping:
            idx = stepping[0] - 1
            self._stepping = idx
            self._apply_debug(self.m.vcpus[idx].vcpu, step=True)
            run[idx] = True
        else:
            self._stepping = None
            for slot in self.m.vcpus:
                action = actions.action_for(slot.vcpu.index + 1)
                if action is not None and action.kind == "continue" and slot.online:
                    self._apply_debug(slot.vcpu, step=False)
                    run[slot.vcpu.index] = True
        self.m.run_vcpus(run)

    def _post_pending(self) -> bool:
        """Report a watch hit that lost the race against another stop."""
        if not self._pending:
            return False
        idx, ev = self._pending.popitem()
        self._apply_deferred_writes(idx)
        self.notifier.post(ev)
        return True

    def interrupt(self) -> None:
        self.m.request_stop(StopEvent("signal", tid=1, signal=SIGINT))

    def stop_fd(self) -> int:
        return self.notifier.fd

    def take_stop(self) -> StopEvent | None:
        event = self.notifier.take()
        if event is not None:
            self.prepare_stop()
        return event

    def is_running(self) -> bool:
        return not self.m.stopped and not self.m.ending

    def initial_stop(self) -> StopEvent:
        self.attached = True
        return StopEvent("signal", tid=1, signal=SIGTRAP)

    def stop(self, timeout: float = 10.0) -> StopEvent | None:
        """Stop a running guest and wait for the stop (for tests and
        helpers that do not use the stub)."""
        import select

        self.interrupt()
        ready, _, _ = select.select([self.notifier.fd], [], [], timeout)
        return self.take_stop() if ready else None

    def detach(self) -> None:
        """Drop every breakpoint, watchpoint and debug flag, then let all
        vCPUs run. Works on a running guest too (a vanished client): the
        vCPUs are parked for the clean-up, since vCPU ioctls would block
        until KVM_RUN returns."""
        with self.m.quiesced():
            with self._lock:
                for addr in list(self.sw):
                    self.remove_sw_breakpoint(addr, 1)
                self.hw.clear()
                self.watches.clear()
                self._exec_pages.clear()
                self._exec_kind.clear()
                self._apply_protection()
            self.attached = False
            self.disarm_kernel_entry()
            self._pending.clear()
            self._apply_deferred_writes()
            self._stepping = None
            for slot in self.m.vcpus:
                slot.vcpu.set_guest_debug(0)
        self.resume_all_undebugged()

    def resume_all_undebugged(self) -> None:
        self.translator.clear()
        self.m.run_vcpus({s.vcpu.index: True for s in self.m.vcpus if s.online})

    def kill(self) -> None:
        self.m.end(0, None)

    # --- monitor ---------------------------------------------------------------------------------

    def monitor(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
            return (
                "vmscope KVM monitor commands:\n"
                "  help             this text\n"
                "  cpus             mode, rip and cr3 of every vCPU\n"
                "  translate ADDR   guest-virtual ADDR (a number, or a kernel symbol[+off]) -> guest-physical\n"
                "  regs             control registers and EFER of every vCPU\n"
                "  memory           guest RAM's memfd (pid, fd) for vmscope inspect\n"
                + LINUX_MONITOR_HELP +
                f"watchpoints: {'debug registers, then ' if self.dr_watch else ''}page protection\n"
            )
        cmd, args = words[0], words[1:]
        if cmd == "memory":  # guest RAM's memfd, for vmscope inspect on this host (vmscope.client.helpers.vmscope)
            mem = self.m.mem
            return f"ram gpa=0x0 size={mem.size:#x} pid={os.getpid()} fd={mem.fd} offset=0x0\n"
        if cmd in ("cpus", "translate", "regs") and not self.m.stopped:
            return f"{cmd}: the guest is running; interrupt it first (Ctrl-C)\n"
        if cmd == "cpus":
            lines = []
            for slot in self.m.vcpus:
                v = slot.vcpu
                if not slot.online:
                    lines.append(f"vCPU {v.index}: waiting for SIPI")
                    continue
                r, s = v.regs(), v.sregs()
                lines.append(f"vCPU {v.index}: {_cpu_mode(s)} rip={r.rip:#x} cr3={s.cr3:#x}")
            return "\n".join(lines) + "\n"
        if cmd == "translate":
            if len(args) != 1:
                return "usage: translate ADDR\n"
            try:
                addr = self.resolve_address(args[0])
            except ValueError as e:
                return f"translate: {e}\n"
            try:
                return f"{addr:#x} -> {self.translate(addr, 1):#x}\n"
            except TargetError as e:
                return f"translate: {e}\n"
        if cmd == "regs":
            lines = []
            for slot in self.m.vcpus:
                s = slot.vcpu.sregs()
                lines.append(
                    f"vCPU {slot.vcpu.index}: cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} "
                    f"cr4={s.cr4:#x} cr8={s.cr8:#x} efer={s.efer:#x}"
                )
            return "\n".join(lines) + "\n"
        linux = self.linux_monitor(cmd, args)
        if linux is not None:
            return linux
        return f"unknown monitor command {cmd!r}; try 'monitor help'\n"


_REG32 = {"e" + n[1:]: n for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip")}


def memory_reads(code: bytes, rip: int, regs: Mapping[str, int], long_mode: bool = True) -> list[tuple[int, int]]:
    """(address, size) of the explicit memory operands the instruction at
    ``rip`` reads, per capstone. Implicit stack accesses are not listed."""
    import capstone
    from capstone import x86 as cs_x86

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if long_mode else capstone.CS_MODE_32)
    md.detail = True
    insn = next(md.disasm(code, rip, 1), None)
    if insn is None:
        return []

    def reg(reg_id: int) -> int:
        if reg_id == 0:
            return 0
        name = insn.reg_name(reg_id)
        if name == "rip":
            return rip + insn.size
        if name in regs:
            return regs[name]
        if name in _REG32:
            return regs.get(_REG32[name], 0) & 0xFFFFFFFF
        if name.endswith("d") and name[:-1] in regs:  # r8d..r15d
            return regs[name[:-1]] & 0xFFFFFFFF
        return 0

    out = []
    for op in insn.operands:
        if op.type == cs_x86.X86_OP_MEM and op.access & capstone.CS_AC_READ:
            m = op.mem
            addr = (reg(m.base) + reg(m.index) * m.scale + m.disp) & (2**64 - 1)
            out.append((addr, op.size or 1))
    return out


def _cpu_mode(s: abi.KvmSregs) -> str:
    if s.efer & (1 << 10):
        return "long" if s.cs.l else "compat"
    if s.cr0 & 1:
        return "protected" + ("+paging" if s.cr0 & (1 << 31) else "")
    return "real"


def _full_tag_word(ftwx: int) -> int:
    """FXSAVE's abridged tag byte -> the x87 tag word GDB shows (valid or
    empty; the finer zero/special tags need the register values)."""
    tag = 0
    for i in range(8):
        tag |= (0b00 if ftwx & (1 << i) else 0b11) << (2 * i)
    return tag


def _abridged_tag_word(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 0b11 != 0b11)
