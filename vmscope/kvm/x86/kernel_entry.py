"""Stop a Linux guest where the decompressed kernel starts, before ``start_kernel``.

Why: with KASLR the bzImage's decompressor picks the kernel's physical and
virtual addresses at random *after* the debugger has attached, so at the
first instruction nothing knows where ``start_kernel`` will be, and
``hbreak start_kernel`` cannot be placed. Once the decompressor has copied
and relocated the kernel, its kallsyms tables (in ``.rodata``) are in memory
with the final addresses: stopping there is enough to get every symbol.

The tell: the decompressed kernel's ``startup_64`` sets the GS base
(``wrmsr`` to ``MSR_GS_BASE``, for the stack protector's canary) among its
first instructions, and the decompressor never does. KVM lets user space
deny a guest's access to chosen MSRs (``KVM_X86_SET_MSR_FILTER``) and get
an exit for it (``KVM_CAP_X86_USER_SPACE_MSR``), so the VMM arms a filter
on that one MSR, performs the write itself when it exits, and drops the
filter at once. The guest runs at full speed until then; debug registers
and INT3 are not involved, so it also works where those do not reach KVM
(KVM nested under QEMU's TCG).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from vmscope.kvm import abi
from vmscope.kvm.abi import ioctl

MSR_GS_BASE = 0xC000_0101
KERNEL_ALIGN = 0x20_0000  # CONFIG_PHYSICAL_ALIGN on x86_64: KASLR picks 2 MiB-aligned spots


class KernelEntryUnavailable(OSError):
    """This KVM cannot deflect MSR writes to user space (Linux < 5.10)."""


@dataclass(frozen=True)
class KernelEntry:
    """Where the decompressed kernel was caught: the physical address it runs
    at (identity-mapped by the decompressor's page tables) and the 2 MiB
    boundary below it, where ``_text`` sits."""

    vcpu: int
    rip: int

    @property
    def phys_text(self) -> int:
        return self.rip & ~(KERNEL_ALIGN - 1)


class KernelEntryTrap:
    """One-shot trap on the guest's first write to ``MSR_GS_BASE``."""

    def __init__(self, vm_fd: int):
        self.vm_fd = vm_fd
        self.armed = False
        self.caught: KernelEntry | None = None
        self._cap_enabled = False
        self._bitmap = (ctypes.c_uint8 * 1)(0)  # bit 0 clear: MSR_GS_BASE writes denied

    def arm(self) -> None:
        """Deflect the guest's next GS-base write to us. Raises
        :class:`KernelEntryUnavailable` when this KVM lacks MSR filters."""
        if not self._cap_enabled:
            cap = abi.KvmEnableCap(cap=abi.KVM_CAP_X86_USER_SPACE_MSR)
            cap.args[0] = abi.KVM_MSR_EXIT_REASON_FILTER
            try:
                ioctl(self.vm_fd, abi.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(X86_USER_SPACE_MSR)")
            except OSError as e:
                raise KernelEntryUnavailable(e.errno, f"this KVM cannot exit to user space on MSR writes: {e}") from None
            self._cap_enabled = True
        f = abi.KvmMsrFilter(flags=abi.KVM_MSR_FILTER_DEFAULT_ALLOW)
        f.ranges[0].flags = abi.KVM_MSR_FILTER_WRITE
        f.ranges[0].nmsrs = 1
        f.ranges[0].base = MSR_GS_BASE
        f.ranges[0].bitmap = ctypes.addressof(self._bitmap)
        try:
            ioctl(self.vm_fd, abi.KVM_X86_SET_MSR_FILTER, f, "KVM_X86_SET_MSR_FILTER")
        except OSError as e:
            raise KernelEntryUnavailable(e.errno, f"this KVM has no MSR filters: {e}") from None
        self.armed = True
        self.caught = None

    def disarm(self) -> None:
        if self.armed:
            ioctl(self.vm_fd, abi.KVM_X86_SET_MSR_FILTER, abi.KvmMsrFilter(flags=abi.KVM_MSR_FILTER_DEFAULT_ALLOW),
                  "KVM_X86_SET_MSR_FILTER")
            self.armed = False

    def on_wrmsr(self, vcpu) -> KernelEntry | None:
        """Serve a KVM_EXIT_X86_WRMSR: do the write the filter held back
        (KVM leaves it to user space), drop the filter, and let KVM finish
        the instruction without running on (``immediate_exit``). Returns
        where the kernel was caught, or None for an exit that is not ours."""
        exit_msr = vcpu.run.exit.msr
        if exit_msr.index != MSR_GS_BASE:
            exit_msr.error = 1  # not an MSR we filter: the guest gets the #GP it would have had
            return None
        vcpu.set_msrs({MSR_GS_BASE: exit_msr.data})
        exit_msr.error = 0
        self.disarm()
        vcpu.complete_pending_exit()
        self.caught = KernelEntry(vcpu.index, vcpu.regs().rip)
        return self.caught
