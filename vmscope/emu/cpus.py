"""The emulated CPU of each architecture, by ``--arch`` name."""

from __future__ import annotations

from vmscope.emu.aarch64 import Arm64Cpu
from vmscope.emu.cpu import EmuCpu
from vmscope.emu.x86_64 import BOOT_AREA, X86Cpu, x86_write_boot_tables

CPU_CLASSES: dict[str, type[EmuCpu]] = {"x86_64": X86Cpu, "aarch64": Arm64Cpu}

__all__ = ["BOOT_AREA", "CPU_CLASSES", "Arm64Cpu", "EmuCpu", "X86Cpu", "x86_write_boot_tables"]
