"""COM1 with its interrupt line (IRQ 4), for guests that drive the UART by
interrupts, as Linux's 8250 driver does once the port is open: without the
interrupt a shell never reads a key and output stalls after the FIFO fills.

Two interrupt sources, as on a 16550: received data (IER bit 0) and
transmitter-holding-register empty (IER bit 1). Transmission is instant, so
THRE becomes pending on every THR write and whenever the guest enables the
THRE interrupt; reading IIR while THRE is the reported source clears it.
The line's level follows ``pending & enabled``; a new rising edge is a new
interrupt. The interrupt state (THRE pending, the line's level) changes
under one leaf lock: two vCPUs (one in the interrupt handler reading IIR,
one printing) and the console input thread use the port at once, and an
IIR read that cleared a THRE set by the other vCPU's write in between
would lose that interrupt for good. Leaf: nothing else is taken under it
but the line's own lock. The register access itself stays outside it,
since a write may replay into KVM's coalesced ring, whose drain thread
comes back into this device (a lock held across both would invert).
"""

from __future__ import annotations

import collections
import threading

from vmscope.devices.uart16550 import COM1, IER, IIR_FCR, LCR_DLAB, LSR_DR, RBR_THR, Serial16550

IER_RDI, IER_THRI = 0x01, 0x02
IIR_NONE, IIR_THRI, IIR_RDI = 0x01, 0x02, 0x04
CONSOLE_TAIL_LINES = 40


class InterruptingSerial(Serial16550):
    def __init__(self, out, line, base: int = COM1):
        super().__init__(self._record, base)
        self._sink = out if callable(out) else (lambda b, o=out: (o.write(b), o.flush()))
        self.line = line
        self._thre_pending = False
        self._irq_lock = threading.Lock()  # THRE pending + line level (a leaf lock)
        self._partial = bytearray()
        #: the last console lines, for fault reports
        self.tail: collections.deque[str] = collections.deque(maxlen=CONSOLE_TAIL_LINES)

    def _record(self, data: bytes) -> None:
        self._sink(data)
        for b in data:
            if b == 0x0A:
                self.tail.append(self._partial.decode("utf-8", "replace").rstrip("\r"))
                self._partial.clear()
            elif len(self._partial) < 400:
                self._partial.append(b)

    def console_tail(self) -> list[str]:
        lines = list(self.tail)
        if self._partial:
            lines.append(self._partial.decode("utf-8", "replace"))
        return lines

    def state(self) -> str:
        """The interrupt state in one line, for a hung guest's report
        (:meth:`vmscope.kvm.runcontrol.RunControl.state_report`): a tty
        whose output stalled waits for a transmit interrupt."""
        return (f"UART {self.base:#x}: IER={self.ier:#04x} LCR={self.lcr:#04x} MCR={self.mcr:#04x}, "
                f"THRE {'pending' if self._thre_pending else 'not pending'}, {len(self._rx)} bytes to read, "
                f"IRQ line {'high' if self.line.level else 'low'} ({self.line.raised} rising edges)")

    def _iir(self) -> int:
        with self._lock:
            has_rx = bool(self._rx)
        if self.ier & IER_RDI and has_rx:
            return IIR_RDI
        if self.ier & IER_THRI and self._thre_pending:
            return IIR_THRI
        return IIR_NONE

    def _update(self) -> None:
        with self._irq_lock:
            self.line.set(self._iir() != IIR_NONE)

    def feed(self, data: bytes) -> None:
        super().feed(data)
        self._update()

    def read(self, port: int, size: int) -> int:
        reg = port - self.base
        if reg == IIR_FCR:
            with self._irq_lock:  # report and clear THRE, with no write slipping in between
                iir = self._iir()
                if iir == IIR_THRI:
                    self._thre_pending = False
                self.line.set(self._iir() != IIR_NONE)
            return iir | (0xC0 if self.fcr & 1 else 0)
        value = super().read(port, size)
        if reg == RBR_THR and not self.lcr & LCR_DLAB:
            self._update()
        return value

    def write(self, port: int, size: int, value: int) -> None:
        reg = port - self.base
        dlab = self.lcr & LCR_DLAB
        thri_before = self.ier & IER_THRI
        super().write(port, size, value)
        with self._irq_lock:
            if not dlab:
                if reg == RBR_THR:
                    self._thre_pending = True
                elif reg == IER and self.ier & IER_THRI and not thri_before:
                    self._thre_pending = True
            self.line.set(self._iir() != IIR_NONE)

    def _polled(self) -> bool:
        """Character writes are queued in KVM only while the guest polls the
        line status (transmit interrupt off, as Linux's console does): a
        driver that waits for the transmit interrupt must see each write
        at once, or it would wait for the drain thread."""
        return super()._polled() and not self.ier & IER_THRI

__all__ = ["InterruptingSerial", "LSR_DR"]
