"""How the arm64 machine serves its vCPUs' exits: the PL011 by MMIO (or,
for a Linux guest, the platform's devices: :mod:`.platform`), debug exits
to the target, PSCI SYSTEM_OFF/RESET (KVM's system events) as the end with
status 0 (1 after a Linux panic), anything else as a report with the
console's last lines. The ``handle_exit`` hook of
:class:`vmscope.kvm.runcontrol.RunControl`, apart from the machine's
construction as on x86 (:mod:`vmscope.kvm.x86.exits`).
"""

from __future__ import annotations

from vmscope.devices.pl011 import Pl011
from vmscope.kvm import abi as kvm_abi
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.vcpu import Arm64Vcpu
from vmscope.kvm.devices.acpi_pm import end_after_reset
from vmscope.kvm.runcontrol import VcpuSlot

UART_BASE = 0x0900_0000


class Arm64Exits:
    """Needs ``self.target``, ``self.uart``, ``self.linux``, ``self.coalesced`` and RunControl's
    ``end`` and ``flush_console``."""

    def handle_exit(self, slot: VcpuSlot) -> None:
        v = slot.vcpu
        reason = v.run.exit_reason
        if self.target.watching_for_kernel:  # kernel symbols are built as soon as the kernel runs
            self.target.on_exit_watch(v)
        coalesced = self.coalesced
        if coalesced is not None and coalesced.active:
            # queued UART writes come first; an MMIO exit is served under
            # the ring's lock so the drain thread cannot reorder it
            with coalesced.lock:
                if coalesced.drain():
                    self.linux.storm.reset()
                if reason == kvm_abi.KVM_EXIT_MMIO:
                    self._mmio(v)
                    return
        if reason == kvm_abi.KVM_EXIT_MMIO:
            self._mmio(v)
        elif reason == kvm_abi.KVM_EXIT_DEBUG:
            self.target.on_debug_exit(v)
        elif reason == kvm_abi.KVM_EXIT_SYSTEM_EVENT:
            kind = v.run.exit.system_event.type
            if kind == abi.KVM_SYSTEM_EVENT_RESET and self.linux is not None:
                end_after_reset(self, "PSCI SYSTEM_RESET")  # status 1 after a panic
            elif kind in (abi.KVM_SYSTEM_EVENT_SHUTDOWN, abi.KVM_SYSTEM_EVENT_RESET):
                self.end(0, None)
            else:
                self._fatal(v, f"system event {kind}")
        elif reason == kvm_abi.KVM_EXIT_FAIL_ENTRY:
            self._fatal(v, "VM entry failed")
        else:
            self._fatal(v, f"unhandled exit {kvm_abi.EXIT_NAMES.get(reason, reason)}")

    def _mmio(self, v: Arm64Vcpu) -> None:
        """The PL011 (or the Linux platform's devices); elsewhere outside RAM
        reads as 0 and writes are dropped."""
        mmio = v.run.exit.mmio
        if self.linux is not None:
            storm = self.linux.mmio(v.index, mmio.phys_addr, mmio.data, min(mmio.len, 8), bool(mmio.is_write))
            if storm:
                self._fatal(v, f"{storm} (MMIO)")
            return
        n = min(mmio.len, 8)
        offset = mmio.phys_addr - UART_BASE
        in_uart = 0 <= offset < Pl011.SIZE
        if mmio.is_write:
            if in_uart:
                self.uart.write(offset, int.from_bytes(bytes(mmio.data[:n]), "little"))
        else:
            value = self.uart.read(offset) if in_uart else 0
            for i, b in enumerate(value.to_bytes(8, "little")[:n]):
                mmio.data[i] = b

    def _fatal(self, v: Arm64Vcpu, why: str) -> None:
        self.flush_console()
        report = f"guest stopped: {why}; {v.summary()}"
        tail = self.linux.console_tail() if self.linux is not None else []
        if tail:
            report += "\nlast console lines:\n  " + "\n  ".join(tail[-20:])
        self.end(1, report)
