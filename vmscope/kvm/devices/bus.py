"""The port-I/O bus: port ranges -> devices.

Ports nobody claims read as all ones and swallow writes, which is what a PC
does for an empty port; guests probing for hardware (Linux pokes dozens of
legacy ports) then carry on instead of crashing the VMM.
"""

from __future__ import annotations

import bisect
from typing import Protocol


class PortDevice(Protocol):
    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


class PortBus:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, PortDevice]] = []
        #: ports that no device claimed, with how often they were touched
        self.unclaimed: dict[int, int] = {}

    def register(self, base: int, count: int, device: PortDevice) -> None:
        for start, n, _ in self._ranges:
            if base < start + n and start < base + count:
                raise ValueError(f"ports {base:#x}+{count} overlap an existing device at {start:#x}+{n}")
        i = bisect.bisect(self._starts, base)
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, count, device))

    def _find(self, port: int) -> PortDevice | None:
        i = bisect.bisect(self._starts, port) - 1
        if i >= 0:
            base, count, dev = self._ranges[i]
            if port < base + count:
                return dev
        self.unclaimed[port] = self.unclaimed.get(port, 0) + 1
        return None

    def read(self, port: int, size: int) -> int:
        dev = self._find(port)
        return dev.read(port, size) if dev else (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        dev = self._find(port)
        if dev:
            dev.write(port, size, value)
