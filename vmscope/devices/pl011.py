"""The ARM PL011 UART of QEMU's virt board (MMIO at 0x09000000), for the
emulated aarch64 CPU and arm64 KVM alike.

Only what a polling driver needs: transmit, "transmit FIFO empty" status,
a receive buffer fed from the console (``feed``) and the peripheral ID
registers Linux's amba-pl011 probe reads; no interrupts.
"""

from __future__ import annotations

import collections
import threading
from typing import BinaryIO, Callable

from vmscope.devices.console import SerialSink

PL011_BASE = 0x0900_0000


class Pl011:
    """DR and FR of an r1p5 PL011; other registers keep what is written."""

    FR_TXFE = 0x80  # transmit FIFO empty
    FR_RXFE = 0x10  # receive FIFO empty
    SIZE = 0x1000

    def __init__(self, out: BinaryIO | Callable[[bytes], object] | None, base: int = PL011_BASE) -> None:
        self.base = base
        self._write_out = out if callable(out) else SerialSink(out)
        self.regs: dict[int, int] = {}
        self._rx: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        """Bytes typed on the console, for the guest to read."""
        with self._lock:
            self._rx.extend(data)

    def read(self, offset: int) -> int:
        if offset == 0x18:
            return self.FR_TXFE | (0 if self._rx else self.FR_RXFE)
        if offset == 0x00:
            with self._lock:
                return self._rx.popleft() if self._rx else 0
        if 0xFE0 <= offset < 0x1000:  # PeriphID/CellID: an r1p5 PL011
            ids = [0x11, 0x10, 0x34, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
            return ids[(offset - 0xFE0) // 4]
        return self.regs.get(offset, 0)

    def write(self, offset: int, value: int) -> None:
        if offset == 0x00:
            self._write_out(bytes((value & 0xFF,)))
        else:
            self.regs[offset] = value
