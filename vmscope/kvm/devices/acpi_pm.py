"""ACPI fixed hardware ports and the PC reset ports.

- PM1a event block (0x600: status, 0x602: enable): reads 0 (no fixed
  events), writes ignored. The control block at 0x604 (SLP_EN: power off) is
  the VMM's own (``vmscope.kvm.x86.exits``).
- 0xCF9 (the reset control register; the FADT's reset register) and the
  PCI configuration ports around it (0xCF8-0xCFF read all ones: no PCI).

A guest reboot ends the VMM with status 0, as ``poweroff`` does, unless
the console shows a kernel panic just before (``panic=-1`` reboots): then
the status is 1 and the report carries the last console lines.
"""

from __future__ import annotations

RESET_CONTROL = 0xCF9
RESET_CPU = 0x04
PANIC_MARKER = "Kernel panic - not syncing"


class AcpiPmEvents:
    """PM1a status (write 1 to clear; nothing ever sets a bit) and enable
    (kept: ACPICA reads an enable bit back to check that it took)."""

    def __init__(self, base: int = 0x600):
        self.base = base
        self.enable = 0

    def read(self, port: int, size: int) -> int:
        raw = (self.enable << 16).to_bytes(4, "little")
        off = port - self.base
        return int.from_bytes(raw[off : off + size], "little")

    def write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        raw = bytearray((self.enable << 16).to_bytes(4, "little"))
        raw[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[: 4 - off]
        self.enable = int.from_bytes(raw[2:4], "little")


class ResetPorts:
    def __init__(self, machine):
        self.machine = machine

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        if port == RESET_CONTROL and size == 1 and value & RESET_CPU:
            self.reset(f"reset control register ({RESET_CONTROL:#x} <- {value:#04x})")

    def reset(self, how: str) -> None:
        end_after_reset(self.machine, how)


def end_after_reset(machine, how: str) -> None:
    """A guest reboot: end ``machine`` with status 0, or 1 with the console
    lines when a kernel panic precedes it (shared by the x86 reset ports
    and arm64's PSCI SYSTEM_RESET)."""
    serial = getattr(machine, "serial", None)
    tail = serial.console_tail() if hasattr(serial, "console_tail") else []
    panic = next((i for i, line in enumerate(tail) if PANIC_MARKER in line), None)
    if panic is None:
        machine.end(0, None)
        return
    shown = "\n  ".join(tail[max(0, panic - 20):])
    machine.end(1, f"guest kernel panicked (then rebooted by {how}); last console lines:\n  {shown}")
