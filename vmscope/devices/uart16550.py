"""A 16550A UART as the guest sees it at COM1 (0x3f8..0x3ff), for every back end.

The KVM VMM puts it on its port bus, the emulated CPU calls it from
Unicorn's ``in``/``out`` hooks. Enough of the chip for polled I/O: transmit writes go straight to the output
stream (the transmitter is always empty, so LSR always shows THRE|TEMT);
received bytes wait in a queue and show as LSR.DR. The divisor latch,
scratch and control registers keep what the guest writes so probing code
(Linux's 8250 driver checks the scratch register and the loopback bit) sees
a real chip. Interrupts are the KVM VMM's business
(``vmscope.kvm.devices.uart_irq`` adds the IRQ line).
"""

from __future__ import annotations

import collections
import threading
from typing import BinaryIO, Callable

from vmscope.devices.console import SerialSink

COM1 = 0x3F8

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
LCR_DLAB = 0x80
MCR_LOOP = 0x10


class Serial16550:
    """``out`` takes the transmitted bytes: a callable, or a binary stream
    (written and flushed through :class:`SerialSink`; None is stdout)."""

    def __init__(self, out: BinaryIO | Callable[[bytes], object] | None, base: int = COM1):
        self.base = base
        self._write_out = out if callable(out) else SerialSink(out)
        self._rx: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.dll, self.dlm = 0x0C, 0  # 9600 baud, as after reset
        self.fcr = 0
        self._coalescer = None

    # --- host side -------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes typed on the console, for the guest to read."""
        with self._lock:
            self._rx.extend(data)

    # --- guest side ------------------------------------------------------

    def handles(self, port: int) -> bool:
        return self.base <= port < self.base + 8

    def read(self, port: int, size: int = 1) -> int:
        reg = port - self.base
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                return self.dll
            with self._lock:
                return self._rx.popleft() if self._rx else 0
        if reg == IER:
            return self.dlm if dlab else self.ier
        if reg == IIR_FCR:
            return 0xC1 if self.fcr & 1 else 0x01  # no interrupt pending
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            with self._lock:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if reg == MSR:
            if self.mcr & MCR_LOOP:  # loopback: outputs appear on inputs
                m = self.mcr
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            return 0xB0  # CTS, DSR, DCD
        return self.scr

    def write(self, port: int, size: int, value: int) -> None:
        reg = port - self.base
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self.feed(bytes([value]))
            else:
                self._write_out(bytes([value]))
        elif reg == IER:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif reg == IIR_FCR:
            self.fcr = value
            if value & 0x02:
                with self._lock:
                    self._rx.clear()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value
        if reg != RBR_THR and self._coalescer is not None:
            self._update_coalescing()

    # --- coalesced output (vmscope.kvm.devices.coalesced) ------------------------------

    def use_coalescing(self, coalescer) -> None:
        """Let KVM queue character writes while :meth:`_polled` holds."""
        self._coalescer = coalescer
        self._update_coalescing()

    def _polled(self) -> bool:
        return not self.lcr & LCR_DLAB and not self.mcr & MCR_LOOP

    def _update_coalescing(self) -> None:
        try:
            self._coalescer.set_zone(self.base + RBR_THR, 1, self._polled())
        except OSError:
            self._coalescer = None  # KVM refused: every write exits, as without it

