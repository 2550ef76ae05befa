"""What the arm64 KVM debug target knows about a Linux guest: its kernel
symbols, for GDB (``add-symbol-file target:/vmscope/kallsyms.elf``) and
``monitor symbols``.

Unlike x86, nothing has to be caught: the arm64 kernel never moves itself
in physical memory (vmscope's loader put it there, :mod:`.image`); with
KASLR it only picks a random virtual base and applies its relocations in
place (``__relocate_kernel``, run from the identity map). So once any vCPU
runs at a kernel-half address (``pc`` >= 2^63), kallsyms in the physical
image hold their final, randomized addresses: the symbol file is built
then, in a background thread (:class:`vmscope.kvm.kernel_symbols.SymbolBuild`,
shared with x86), or at the latest at the first stop after that. Where
``_text`` lies virtually (Debian's arm64 kallsyms start at ``_stext``)
comes from a TTBR1 walk down from a kernel text address to the start of
the mapping (``_stext``), whose physical offset from where the loader put
``_text`` gives the slide (:func:`vmscope.vmi.linux.kaslr.find_arm64_kernel_image`;
the Image header itself may be gone by then: the kernel does not reserve it).
"""

from __future__ import annotations

import time

from vmscope.gdbserver.target import TargetError
from vmscope.kvm.kernel_symbols import KALLSYMS_FILE, KernelImage, SymbolBuild

KERNEL_HALF = 1 << 63
#: how often a vCPU thread looks whether the kernel runs at its virtual address
KERNEL_WATCH_PERIOD = 0.25
#: longest wait for the background build inside a GDB request (GDB gives a
#: reply 2 s: its remotetimeout)
FILE_WAIT = 1.5

MONITOR_HELP = "  symbols          kernel symbols from kallsyms; gdb: add-symbol-file target:" + KALLSYMS_FILE + "\n"


class Arm64LinuxSymbols:
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget` (needs
    ``self.m``, ``self.ram``, ``self._lock``, ``self.attached``)."""

    _symbol_build: SymbolBuild | None = None
    _kernel_watch_next = 0.0

    @property
    def watching_for_kernel(self) -> bool:
        """Whether exits should look for a running kernel: a debugger is
        attached to a Linux guest whose symbols are not being built yet."""
        return self.attached and self.m.linux is not None and self._symbol_build is None

    def on_exit_watch(self, v) -> None:
        """In a vCPU thread at an exit: one ONE_REG read per
        :data:`KERNEL_WATCH_PERIOD` until the kernel runs at its virtual address."""
        now = time.monotonic()
        if now < self._kernel_watch_next:
            return
        self._kernel_watch_next = now + KERNEL_WATCH_PERIOD
        if v.pc >= KERNEL_HALF:
            self._start_symbol_build(v)

    def _start_symbol_build(self, v) -> bool:
        """Locate the image through ``v``'s TTBR1 (from its vector base or
        its pc) and start the build; False when neither leads to it."""
        from vmscope.vmi.address_space import AddressSpace
        from vmscope.vmi.errors import VmiError
        from vmscope.vmi.linux.kaslr import find_arm64_kernel_image
        from vmscope.vmi.paging import Aarch64Paging

        try:
            walker = Aarch64Paging(self.ram, v.sys("TTBR0_EL1"), v.sys("TTBR1_EL1"), v.sys("TCR_EL1"))
        except ValueError:
            return False
        for address in (v.sys("VBAR_EL1"), v.pc):
            if address < KERNEL_HALF:
                continue
            try:
                layout = self.m.linux.layout
                loc = find_arm64_kernel_image(AddressSpace(walker), address, walker,
                                              loaded=(layout.entry, layout.kernel_end - layout.entry))
            except VmiError:
                continue
            with self._lock:
                if self._symbol_build is None:
                    self._symbol_build = SymbolBuild(self.ram.read, loc, "aarch64")
            return True
        return False

    def prepare_stop(self) -> None:
        """In the stub's thread, every vCPU parked: a debugger that attached
        after the kernel started gets its symbols built from here; the
        kernel-entry stop waits for them (:mod:`.kernel_entry`)."""
        self.finish_entry_stop()
        if self.watching_for_kernel:
            for slot in self.m.vcpus:
                if slot.vcpu.pc >= KERNEL_HALF and self._start_symbol_build(slot.vcpu):
                    break

    def kernel_image(self, timeout: float | None = FILE_WAIT) -> KernelImage:
        build = self._symbol_build
        if build is None:
            if self.m.linux is None:
                raise TargetError("not a Linux guest: no kernel symbols")
            raise TargetError("the kernel has not run at its virtual address yet (KASLR not applied): "
                              "run `monitor kernel-entry`, then `continue`; or continue until it has run, "
                              "then ask again")
        if not build.wait(timeout):
            raise TargetError("kernel symbols are still being decoded; ask again shortly")
        if build.image is None:
            raise TargetError(build.error or "no kernel symbols")
        return build.image

    def file_contents(self, path: str) -> bytes:
        if path != KALLSYMS_FILE:
            raise FileNotFoundError(path)
        self.kernel_image()
        return self._symbol_build.symbol_file

    def linux_monitor(self, cmd: str, args: list[str]) -> str | None:
        if cmd == "kernel-entry":
            return self.arm_kernel_entry()
        if cmd != "symbols":
            return None
        try:
            img = self.kernel_image()
        except TargetError as e:
            return f"symbols: {e}\n"
        return (f"{len(img.symbols)} kernel symbols from kallsyms: _text {img.text:#x}, "
                f"physical {img.phys_text:#x}\nin gdb: add-symbol-file target:{KALLSYMS_FILE}\n")
