"""Inspect a core file as if it were the live guest.

:class:`CoreInspector` offers what ``vmscope inspect``'s commands use from
a live :class:`~vmscope.client.session.Inspector` (``kernel()``,
``registers()``, ``phys``, ``memory_path``), so ``ps``, ``lsmod`` and
``dmesg`` print the same over a dump as over the guest it came from.
"""

from __future__ import annotations

from typing import Callable

from vmscope.dump.elfcore import CoreFile
from vmscope.vmi.errors import VmiError
from vmscope.vmi.paging.base import TranslationCache


class CoreInspector:
    def __init__(self, path: str, *, progress: Callable[[str, int, int], None] | None = None,
                 system_map: str | None = None, disk_cache: bool = True) -> None:
        self.core = CoreFile.open(path)
        self.client = None
        self.qmp = None
        self.phys = self.core.memory
        self.memory_path = "core-file"
        self.cache = TranslationCache()
        self.progress, self.system_map, self.disk_cache = progress, system_map, disk_cache
        self._kernel = None

    def registers(self) -> dict[str, int]:
        """vCPU 0's registers as the dump recorded them."""
        return dict(self.core.cpus[0]) if self.core.cpus else {}

    def kernel(self):
        if self._kernel is None:
            if self.core.arch != "x86_64":
                raise VmiError(f"offline inspection of {self.core.arch} cores is not supported yet")
            regs = self.registers()
            if not regs.get("cr3"):
                raise VmiError(f"{self.core.path}: the core records no CR3 (no QEMU CPU-state note): "
                               "cannot find the kernel's page tables")
            from vmscope.vmi.linux.kernel import LinuxKernel

            self._kernel = LinuxKernel(self.phys, regs["cr3"], regs.get("cr4", 0), cache=self.cache,
                                       progress=self.progress, system_map=self.system_map,
                                       disk_cache=self.disk_cache)
        return self._kernel

    def close(self) -> None:
        pass

    def __enter__(self) -> "CoreInspector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
