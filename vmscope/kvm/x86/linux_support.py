"""What the KVM debug target knows about Linux guests: kernel symbols for GDB.

Why: a kernel engineer debugging a stock distribution kernel has no
vmlinux and, with KASLR, no fixed addresses. The kernel's own kallsyms has
every symbol at its relocated address. This mixin

- decodes kallsyms from guest RAM (through the kernel's page tables once it
  runs, or from physical memory where the decompressed kernel was caught
  before it set up its own page tables),
- serves it to GDB as an ELF symbol file on a ``target:`` path
  (``add-symbol-file target:/vmscope/kallsyms.elf``), and
- arms a stop at the decompressed kernel's entry (``monitor kernel-entry``),
  so ``hbreak start_kernel`` can be set before the kernel's C code runs.

Until the kernel has built its own page tables, no vCPU maps the kernel's
virtual addresses; the image is contiguous in physical memory, so the
translation of ``_text``..``_end`` is known from where it was caught.
"""

from __future__ import annotations

import logging
import sys
import time
from signal import SIGTRAP

from vmscope.gdbserver.target import StopEvent, TargetError
from vmscope.kvm import abi
from vmscope.kvm.kernel_symbols import (  # noqa: F401  (KALLSYMS_FILE, KernelImage: re-exported)
    KALLSYMS_FILE,
    MAX_IMAGE,
    KernelImage,
    SymbolBuild,
    image_from,
)
from vmscope.kvm.x86.kernel_entry import KernelEntryTrap, KernelEntryUnavailable

log = logging.getLogger(__name__)

#: how often a vCPU thread looks whether the kernel runs yet (one KVM_GET_REGS)
KERNEL_WATCH_PERIOD = 0.25
KERNEL_HALF = 1 << 63

MONITOR_HELP = (
    "  kernel-entry     stop where the decompressed Linux kernel starts (before start_kernel)\n"
    "  symbols          decode the kernel's kallsyms; gdb: add-symbol-file target:" + KALLSYMS_FILE + "\n"
)

NO_KERNEL_YET = (
    "no decompressed Linux kernel in memory yet (at the first instruction it is still compressed); "
    "run `monitor kernel-entry`, then `continue`"
)


class LinuxSupport:
    """Mixin for :class:`vmscope.kvm.x86.target.KvmTarget` (needs ``self.m``,
    ``self.mem``, ``self._lock``, ``self.attached``)."""

    _entry_trap: KernelEntryTrap | None = None
    _kernel_image: KernelImage | None = None
    _symbol_file: bytes | None = None
    _entry_stop_pending = False
    _symbol_build: SymbolBuild | None = None
    _kernel_watch_next = 0.0

    # --- symbols made in the background as soon as the kernel runs ------------------------

    @property
    def watching_for_kernel(self) -> bool:
        """Whether vCPU exits should look for a running kernel: a debugger
        has attached to a Linux guest whose symbols are not known yet."""
        return (self.attached and self._symbol_build is None and self._kernel_image is None
                and self.m.plan.mode.startswith("linux"))

    def on_exit_watch(self, v) -> None:
        """In a vCPU thread, at an exit, while :attr:`watching_for_kernel`:
        once the vCPU runs kernel code at its virtual address, the
        decompressor has placed and relocated the kernel, so its kallsyms
        are final: start building the symbol file. Costs one KVM_GET_REGS
        per vCPU every :data:`KERNEL_WATCH_PERIOD` until then."""
        now = time.monotonic()
        if now < self._kernel_watch_next:
            return
        self._kernel_watch_next = now + KERNEL_WATCH_PERIOD
        if v.regs().rip < KERNEL_HALF:
            return
        self._start_symbol_build(v)

    def _start_symbol_build(self, v) -> bool:
        loc = self._walk_kernel(v)
        if loc is None:
            return False
        with self._lock:
            if self._symbol_build is None:
                self._symbol_build = SymbolBuild(self.mem.read, loc)
        return True

    def _placement(self):
        """Where the VMM put the kernel (direct boot: vmscope.kvm.boot.vmlinux), or None."""
        plan = getattr(self.m, "plan", None)
        return getattr(plan, "kernel", None)

    def start_known_kernel_symbols(self) -> bool:
        """With a directly booted kernel the VMM placed and relocated it, so
        its kallsyms are final before its first instruction: start the
        symbol build at once (at the debugger's first stop), and
        ``add-symbol-file target:/vmscope/kallsyms.elf`` works there."""
        loc = self._placement()
        if loc is None:
            return False
        with self._lock:
            if self._symbol_build is None and self._kernel_image is None:
                self._symbol_build = SymbolBuild(self.mem.read, loc)
        return True

    # --- the kernel-entry stop ---------------------------------------------------------------

    def arm_kernel_entry(self) -> str:
        if self.m.stopped and self._kernel_paging_on():
            return ("kernel-entry: the kernel already runs on its own page tables, so its entry is behind us; "
                    f"its symbols are there now: add-symbol-file target:{KALLSYMS_FILE}\n")
        if self._entry_trap is None:
            self._entry_trap = KernelEntryTrap(self.m.vm_fd)
        try:
            self._entry_trap.arm()
        except KernelEntryUnavailable as e:
            return f"kernel-entry: {e.strerror}\n"
        return ("kernel-entry: armed; `continue` runs the decompressor and stops where the kernel starts, "
                f"before start_kernel. Then: add-symbol-file target:{KALLSYMS_FILE}\n")

    def disarm_kernel_entry(self) -> None:
        if self._entry_trap is not None and self._entry_trap.armed:
            self._entry_trap.disarm()

    def on_msr_exit(self, v) -> None:
        """A guest MSR access our filter deflected (KVM_EXIT_X86_RDMSR/WRMSR)."""
        trap = self._entry_trap
        if v.run.exit_reason == abi.KVM_EXIT_X86_WRMSR and trap is not None and trap.armed:
            if trap.on_wrmsr(v) is not None:
                self._kernel_image = self._symbol_file = self._symbol_build = None
                self._entry_stop_pending = True
                self.m.request_stop(StopEvent("signal", tid=v.index + 1, signal=SIGTRAP))
            return
        v.run.exit.msr.error = 1  # not ours: the #GP the guest would get without a filter

    def prepare_stop(self) -> None:
        """Called in the stub's thread with the stop in hand, every vCPU
        parked. After the kernel-entry stop: decode kallsyms and build the
        symbol file now, before the stop is reported. GDB waits for a stop
        without a time limit, but gives a monitor reply or a file read 2 s
        (``remotetimeout``); and not in the vCPU thread, where reading the
        other vCPUs' registers would wait for their KVM_RUN to return (an AP
        waiting for its SIPI never does)."""
        if not self._entry_stop_pending:
            if self.watching_for_kernel and self.start_known_kernel_symbols():
                return
            if self.watching_for_kernel:  # attached while the kernel already ran: start the build now
                for slot in self.m.vcpus:
                    if slot.online and slot.vcpu.regs().rip >= KERNEL_HALF and self._start_symbol_build(slot.vcpu):
                        break
            return
        self._entry_stop_pending = False
        try:
            self.symbol_file()
        except (TargetError, ValueError) as e:
            print(f"vmscope: kernel entry caught, but no symbols: {e}", file=sys.stderr, flush=True)

    # --- kernel symbols ------------------------------------------------------------------------

    def kernel_image(self) -> KernelImage:
        """The guest kernel's symbols and where its image is; decoded once
        (taken from the background build when one ran). Raises TargetError
        saying what is missing."""
        if self._kernel_image is None:
            build = self._symbol_build
            if build is not None and build.wait() and build.image is not None:
                self._kernel_image, self._symbol_file = build.image, build.symbol_file
            else:
                self._kernel_image = self._find_kernel_image()
        return self._kernel_image

    def _find_kernel_image(self) -> KernelImage:
        from vmscope.vmi.errors import VmiError

        loc = self._placement()
        if loc is not None:  # placed by the VMM: decode from physical memory
            from vmscope.vmi.linux.kallsyms import scan_for_kallsyms
            from vmscope.vmi.linux.symcache import BUILD_CACHE

            try:
                syms = scan_for_kallsyms(self.mem.read, loc.phys_text, loc.phys_text + (loc.end - loc.text),
                                         cache=BUILD_CACHE)
            except (VmiError, IndexError) as e:
                raise TargetError(f"no kallsyms in the kernel placed at physical {loc.phys_text:#x}: {e}") from None
            return self._image_from(syms, loc.phys_text, loc.text)
        trap = self._entry_trap
        if trap is not None and trap.caught is not None and not self._kernel_paging_on():
            from vmscope.vmi.linux.kallsyms import scan_for_kallsyms
            from vmscope.vmi.linux.symcache import BUILD_CACHE

            start = trap.caught.phys_text
            try:
                syms = scan_for_kallsyms(self.mem.read, start, min(self.mem.size, start + MAX_IMAGE),
                                         cache=BUILD_CACHE)
            except (VmiError, IndexError) as e:
                raise TargetError(f"no kallsyms in the kernel caught at physical {start:#x}: {e}") from None
            return self._image_from(syms, start)
        return self._image_through_page_tables()

    def _kernel_paging_on(self) -> bool:
        """Whether some vCPU's page tables map the kernel half already."""
        for slot in self.m.vcpus:
            if slot.online and slot.vcpu.sregs().cr3 and self._walk_kernel(slot.vcpu) is not None:
                return True
        return False

    def _walk_kernel(self, v):
        from vmscope.vmi.errors import VmiError
        from vmscope.vmi.linux.kaslr import find_kernel_image
        from vmscope.vmi.memory import BytesMemory

        s = v.sregs()
        if not s.efer & (1 << 10):  # not in long mode
            return None
        try:
            return find_kernel_image(BytesMemory(self.mem.view), s.cr3, s.cr4)
        except VmiError:
            return None

    def _image_through_page_tables(self) -> KernelImage:
        from vmscope.vmi.address_space import AddressSpace
        from vmscope.vmi.errors import VmiError
        from vmscope.vmi.linux.kallsyms import scan_for_kallsyms
        from vmscope.vmi.linux.symcache import BUILD_CACHE
        from vmscope.vmi.memory import BytesMemory
        from vmscope.vmi.paging.x86_64 import X86_64Paging

        for slot in self.m.vcpus:
            if not slot.online:
                continue
            loc = self._walk_kernel(slot.vcpu)
            if loc is None:
                continue
            cr4 = slot.vcpu.sregs().cr4
            boot = AddressSpace(X86_64Paging(BytesMemory(self.mem.view), loc.root, cr4=cr4))
            try:
                syms = scan_for_kallsyms(lambda pos, n: boot.read_partial(pos, n)[0], loc.text, loc.end,
                                         cache=BUILD_CACHE)
            except VmiError as e:
                raise TargetError(f"no kallsyms in the kernel image at {loc.text:#x}: {e}") from None
            return self._image_from(syms, loc.phys_text, loc.text)
        raise TargetError(NO_KERNEL_YET)

    _image_from = staticmethod(image_from)

    def kernel_image_page(self, vpage: int) -> int | None:
        """Physical page of a kernel-image address while no vCPU maps it
        yet (stopped at the kernel's entry): the image is contiguous. A
        kernel the VMM placed is known from its first instruction."""
        loc = self._placement()
        if loc is not None and vpage >= KERNEL_HALF:
            return loc.phys_text + (vpage - loc.text) if loc.text <= vpage < loc.end else None
        trap = self._entry_trap
        if vpage < KERNEL_HALF or trap is None or trap.caught is None:
            return None
        try:
            img = self.kernel_image()
        except TargetError:
            return None
        if img.text <= vpage < img.end:
            return img.phys_text + (vpage - img.text)
        return None

    def symbol_file(self) -> bytes:
        from vmscope.vmi.linux.symcache import BUILD_CACHE

        if self._symbol_file is None:
            self._symbol_file = BUILD_CACHE.symbol_file(self.kernel_image().symbols, "x86_64")
        return self._symbol_file

    def file_contents(self, path: str) -> bytes:
        if path != KALLSYMS_FILE:
            raise FileNotFoundError(path)
        if not self.m.stopped:
            raise TargetError("the guest is running; interrupt it first")
        return self.symbol_file()

    def resolve_address(self, text: str) -> int:
        """A number (0x.. for hex), or a kernel symbol with an optional
        ``+offset``, from kallsyms. ValueError says what is wrong."""
        try:
            return int(text, 0)
        except ValueError:
            pass
        name, _, off = text.partition("+")
        try:
            offset = int(off, 0) if off else 0
        except ValueError:
            raise ValueError(f"{text!r}: bad offset {off!r}") from None
        try:
            syms = self.kernel_image().symbols
        except TargetError:
            raise ValueError(f"{text!r} is not a number (use 0x... for hex), and no kernel symbols are known") from None
        if name not in syms:
            raise ValueError(f"{name!r} is neither a number nor a kernel symbol")
        return syms[name] + offset

    # --- monitor ---------------------------------------------------------------------------------

    def linux_monitor(self, cmd: str, args: list[str]) -> str | None:
        """Text for the Linux monitor commands, None for other commands."""
        if cmd == "kernel-entry":
            return self.arm_kernel_entry()
        if cmd == "symbols":
            if not self.m.stopped:
                return "symbols: the guest is running; interrupt it first (Ctrl-C)\n"
            try:
                img = self.kernel_image()
            except TargetError as e:
                return f"symbols: {e}\n"
            return (f"{len(img.symbols)} kernel symbols from kallsyms: _text {img.text:#x} "
                    f"(KASLR slide {img.slide:#x}), physical {img.phys_text:#x}\n"
                    f"in gdb: add-symbol-file target:{KALLSYMS_FILE}\n")
        return None
