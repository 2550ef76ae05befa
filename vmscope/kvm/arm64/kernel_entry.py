"""``monitor kernel-entry`` on arm64: stop where the kernel first runs at
its (KASLR-randomized) virtual address, with its symbols ready.

Why: to break on ``start_kernel`` a debugger needs its address, and with
KASLR the kernel picks it only while it boots (``kaslr_early_init``, from
the device tree's ``kaslr-seed``), then relocates itself in place. Until
then the Image in RAM holds kallsyms with the relocated base still zero
(arm64 links with ``--no-apply-dynamic-relocs``), which is enough to know
each symbol's *offset*, hence its physical address, but not its virtual one.

So the stop is made at the one instruction that leaves the identity map:
``__primary_switch`` ends with ``ldr x8, =__primary_switched; ...;
br x8``, run at VA == PA after ``__relocate_kernel`` has slid every
address. vmscope finds that ``br x8`` from the Image's own kallsyms (a
background thread started by the monitor command, joined before the
vCPUs run) and capstone, puts a hardware breakpoint on its physical
address, and when it fires takes the branch itself (pc = x8) and reports
the stop there: the first instruction of ``__primary_switched``, before
``start_kernel``. kallsyms are relocated by then, so the symbol file is
built before the stop is reported. (x86 catches its kernel's entry with
an MSR filter instead: :mod:`vmscope.kvm.x86.kernel_entry`.)
"""

from __future__ import annotations

import logging
import threading

from vmscope.gdbserver.target import SIGTRAP, StopEvent
from vmscope.kvm.arm64 import abi
from vmscope.kvm.kernel_symbols import KALLSYMS_FILE

log = logging.getLogger(__name__)
KERNEL_HALF = 1 << 63
#: arm64's ``.head.text`` (the Image header and EFI stub): ``_stext`` follows it
HEAD_TEXT_SIZE = 0x10000
BR_X8 = 0xD61F0100
LDR_X8_LITERAL_MASK, LDR_X8_LITERAL = 0xFF00001F, 0x58000008
MAX_SWITCH_INSNS = 64

MONITOR_HELP = "  kernel-entry     stop where the kernel first runs at its KASLR address (before start_kernel)\n"


class KernelEntryUnavailable(Exception):
    """This kernel's boot path is not the one the stop is made on."""


def find_identity_exit(read, phys_text: int, phys_end: int) -> int:
    """Physical address of the ``br x8`` that ends ``__primary_switch`` in
    a not yet booted Image at ``phys_text``..``phys_end``."""
    from vmscope.vmi.errors import VmiError
    from vmscope.vmi.linux.kallsyms import scan_for_kallsyms
    from vmscope.vmi.linux.symcache import BUILD_CACHE

    try:
        syms = scan_for_kallsyms(read, phys_text, phys_end, cache=BUILD_CACHE)
    except (VmiError, ValueError, IndexError) as e:
        raise KernelEntryUnavailable(f"no kallsyms in the kernel image at physical {phys_text:#x}: {e}") from None
    switch = syms.get("__primary_switch")
    if switch is None:
        raise KernelEntryUnavailable("the kernel has no __primary_switch (not an arm64 Linux 5.x/6.x boot path)")
    if "_text" in syms:
        phys = phys_text + switch.address - syms["_text"]
    elif "_stext" in syms:
        phys = phys_text + HEAD_TEXT_SIZE + switch.address - syms["_stext"]
    else:
        raise KernelEntryUnavailable("kallsyms has neither _text nor _stext: cannot place __primary_switch")
    code = read(phys, 4 * MAX_SWITCH_INSNS)
    words = [int.from_bytes(code[i : i + 4], "little") for i in range(0, len(code), 4)]
    for i, word in enumerate(words):
        if word == BR_X8 and any(w & LDR_X8_LITERAL_MASK == LDR_X8_LITERAL for w in words[max(0, i - 3) : i]):
            return phys + 4 * i
    raise KernelEntryUnavailable("__primary_switch does not end in `ldr x8, =__primary_switched; br x8` "
                                 "in this kernel: no place to stop at its entry")


class Arm64KernelEntry:
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget` (needs the
    symbol build of :class:`~vmscope.kvm.arm64.linux_symbols.Arm64LinuxSymbols`)."""

    _entry_finder: threading.Thread | None = None
    _entry_result: int | str | None = None  # physical address of the br x8, or why not
    _entry_stop_pending = False

    @property
    def entry_break(self) -> int | None:
        """The armed breakpoint's address (identity-mapped, = physical);
        waits for the finder the first time (the vCPUs are about to run)."""
        finder = self._entry_finder
        if finder is None:
            return None
        finder.join()
        if isinstance(self._entry_result, str):  # found out after `monitor kernel-entry` answered
            log.warning("kernel-entry: %s; the kernel boots on without that stop", self._entry_result)
            self.disarm_kernel_entry()
            return None
        return self._entry_result

    def arm_kernel_entry(self) -> str:
        linux = self.m.linux
        if linux is None:
            return "kernel-entry: not a Linux guest\n"
        if self._symbol_build is not None or any(s.vcpu.pc >= KERNEL_HALF for s in self.m.vcpus):
            return ("kernel-entry: the kernel already runs at its virtual address, so its entry is behind us; "
                    f"its symbols are there now: add-symbol-file target:{KALLSYMS_FILE}\n")
        if self._entry_finder is None:
            layout = linux.layout

            def find() -> None:
                try:
                    self._entry_result = find_identity_exit(self.ram.read, layout.entry, layout.kernel_end)
                except KernelEntryUnavailable as e:
                    self._entry_result = str(e)

            self._entry_finder = threading.Thread(target=find, name="kernel-entry", daemon=True)
            self._entry_finder.start()
        self._entry_finder.join(1.5)  # GDB gives a monitor reply 2 s
        if isinstance(self._entry_result, str):
            reason, self._entry_finder = self._entry_result, None
            return f"kernel-entry: {reason}\n"
        return ("kernel-entry: armed; `continue` runs the kernel's early boot and stops where it first runs at "
                f"its KASLR address, before start_kernel. Then: add-symbol-file target:{KALLSYMS_FILE}\n")

    def disarm_kernel_entry(self) -> None:
        self._entry_finder = None
        self._entry_result = None

    def on_entry_break(self, v) -> bool:
        """At a hardware-breakpoint exit: True when it is the armed entry
        (the branch is taken here and the stop requested)."""
        if self._entry_finder is None or v.pc != self.entry_break:
            return False
        self.disarm_kernel_entry()
        v.set_core(abi.CORE_PC, v.core(abi.CORE_X0 + 8 * 8))  # br x8, taken by hand
        self._apply_debug(v, step=False)
        self._start_symbol_build(v)
        self._entry_stop_pending = True
        self.m.request_stop(StopEvent("signal", tid=v.index + 1, signal=SIGTRAP))
        return True

    def finish_entry_stop(self) -> None:
        """In the stub's thread before the kernel-entry stop is reported:
        the symbol file is ready when GDB gets the stop (a file read has
        only GDB's 2 s; waiting for a stop has no limit)."""
        if self._entry_stop_pending:
            self._entry_stop_pending = False
            build = self._symbol_build
            if build is not None:
                build.wait()
