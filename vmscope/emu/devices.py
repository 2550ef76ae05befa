"""The two UARTs the demo guests print through.

Only what a polling driver needs: transmit, "transmitter empty" status and a
receive buffer fed from the console (``feed``, from the console thread); no
interrupts. Output goes to a binary stream, flushed per line so serial lines
reach a pipe promptly.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import BinaryIO


class RxBuffer:
    """Bytes typed at the console, waiting for the guest to read them."""

    def __init__(self) -> None:
        self._bytes: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._bytes.extend(data)

    def __bool__(self) -> bool:
        return bool(self._bytes)

    def pop(self) -> int:
        with self._lock:
            return self._bytes.popleft() if self._bytes else 0


class SerialSink:
    """Collects transmitted bytes and writes them out line by line."""

    def __init__(self, out: BinaryIO | None) -> None:
        self.out = out if out is not None else sys.stdout.buffer
        self._lock = threading.Lock()

    def put(self, byte: int) -> None:
        with self._lock:
            try:
                self.out.write(bytes((byte,)))
                if byte == 0x0A:
                    self.out.flush()
            except (OSError, ValueError):
                pass  # a closed console must not stop the guest


class Uart16550:
    """COM1-style 16550 at an I/O port base (0x3f8): THR, LSR, LCR.DLAB."""

    LSR_THRE_TEMT = 0x60

    def __init__(self, sink: SerialSink, base: int = 0x3F8) -> None:
        self.sink = sink
        self.base = base
        self.regs = bytearray(8)
        self.rx = RxBuffer()
        self.feed = self.rx.feed

    def handles(self, port: int) -> bool:
        return self.base <= port < self.base + 8

    def read(self, port: int) -> int:
        off = port - self.base
        if off == 5:
            return self.LSR_THRE_TEMT | (1 if self.rx else 0)  # bit 0: data ready
        if off == 2:
            return 0x01  # IIR: no interrupt pending
        if off in (0, 1) and self.regs[3] & 0x80:
            return 0  # divisor latch
        if off == 0:
            return self.rx.pop()  # RBR
        return self.regs[off] if off in (1, 3, 4, 7) else 0

    def write(self, port: int, value: int) -> None:
        off = port - self.base
        if off == 0 and not self.regs[3] & 0x80:
            self.sink.put(value & 0xFF)
        else:
            self.regs[off] = value & 0xFF


class Pl011:
    """ARM PL011 at an MMIO base (0x09000000 on QEMU's virt): DR and FR."""

    FR_TXFE = 0x80  # transmit FIFO empty
    FR_RXFE = 0x10  # receive FIFO empty
    SIZE = 0x1000

    def __init__(self, sink: SerialSink, base: int = 0x0900_0000) -> None:
        self.sink = sink
        self.base = base
        self.regs: dict[int, int] = {}
        self.rx = RxBuffer()
        self.feed = self.rx.feed

    def read(self, offset: int) -> int:
        if offset == 0x18:
            return self.FR_TXFE | (0 if self.rx else self.FR_RXFE)
        if offset == 0x00:
            return self.rx.pop()
        if 0xFE0 <= offset < 0x1000:  # PeriphID/CellID: an r1p5 PL011
            ids = [0x11, 0x10, 0x34, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
            return ids[(offset - 0xFE0) // 4]
        return self.regs.get(offset, 0)

    def write(self, offset: int, value: int) -> None:
        if offset == 0x00:
            self.sink.put(value & 0xFF)
        else:
            self.regs[offset] = value
