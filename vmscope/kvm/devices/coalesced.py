"""Coalesced port writes: the console's output without one exit per byte.

Why: Linux's serial console sends each character as two port accesses,
a read of the line status register, then a write of the character; each is
a VM exit into Python. KVM can queue writes to chosen ports in a ring it
shares with user space (``KVM_REGISTER_COALESCED_MMIO`` with ``pio``, as
QEMU does for some devices) instead of exiting: the character writes then
cost nothing until the next exit, which drains the ring in order before it
is handled. Measured in the nested lab: about 160 us per exit, so half of
every printed line.

Writes can sit in the ring when no exit follows (a guest that prints and
halts, or the tty driver waiting for a transmit interrupt that the device
only raises once it sees the write), so a drain thread also empties it
every few milliseconds (every 50 ms while a debugger holds the machine
stopped); and the device only asks for coalescing while its
transmit interrupt is off (the console path), see
:class:`vmscope.kvm.devices.uart_irq.InterruptingSerial`.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from typing import Callable

from vmscope.kvm import abi
from vmscope.kvm.abi import ioctl

PAGE = mmap.PAGESIZE
ENTRY = struct.Struct("<QII8s")  # phys_addr (the port), len, pio, data
RING_HEADER = 8  # u32 first, u32 last
DRAIN_PERIOD = 0.005
#: how often the ring of a machine the debugger stopped is looked at. Nothing
#: is queued while no vCPU runs, and a resume does not wake the drain thread:
#: each wake-up takes the interpreter lock, and at every 5 ms it took it from
#: the vCPU thread serving a stepping gdb (8 alternating runs of 3,000 stepi:
#: mean 1,810 -> 1,856/s, slowest 1,496 -> 1,711/s; docs/performance.md).
STOPPED_DRAIN_PERIOD = 0.05


class KvmCoalescedMmioZone(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint32), ("pio", ctypes.c_uint32)]


KVM_REGISTER_COALESCED_MMIO = abi._iow(0x67, KvmCoalescedMmioZone)
KVM_UNREGISTER_COALESCED_MMIO = abi._iow(0x68, KvmCoalescedMmioZone)
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_COALESCED_PIO = 162


class CoalescedPorts:
    """The ring and the zones of one VM. ``handler(port, size, value)``
    replays each queued write, in guest order. ``pio``: the zones are I/O
    ports (x86's COM1); False: MMIO addresses (the arm64 machine's UART,
    the same ring and the same device model). ``machine_stopped()``: the
    run control's word that a debugger holds every vCPU (the drain thread
    then looks every STOPPED_DRAIN_PERIOD)."""

    def __init__(self, kvm_fd: int, vm_fd: int, vcpu_fd: int, mmap_size: int,
                 handler: Callable[[int, int, int], None], pio: bool = True,
                 machine_stopped: Callable[[], bool] = lambda: False):
        offset = ioctl(kvm_fd, abi.KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO, "KVM_CHECK_EXTENSION")
        if offset <= 0 or (pio and ioctl(kvm_fd, abi.KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_PIO,
                                         "KVM_CHECK_EXTENSION") <= 0):
            raise OSError("this KVM does not coalesce port writes")
        if (offset + 1) * PAGE > mmap_size:
            raise OSError("the coalescing ring is not in the vCPU mapping")
        self.vm_fd = vm_fd
        self.handler = handler
        self.pio = int(pio)
        self._map = mmap.mmap(vcpu_fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = offset * PAGE
        self._max = (PAGE - RING_HEADER) // ENTRY.size
        self.lock = threading.RLock()
        self.zones: set[tuple[int, int]] = set()
        self.active = False  # any zone registered: exits must drain first
        self.replayed = 0  # writes that came through the ring, not an exit
        self.machine_stopped = machine_stopped  # the run control's: a debugger stopped every vCPU
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_zone(self, port: int, size: int, on: bool) -> None:
        """Queue (or stop queueing) writes to ``port``..+``size``; what is
        queued is replayed before the zone goes."""
        with self.lock:
            if on == ((port, size) in self.zones):
                return
            if not on:
                self.drain()
            zone = KvmCoalescedMmioZone(addr=port, size=size, pio=self.pio)
            request = KVM_REGISTER_COALESCED_MMIO if on else KVM_UNREGISTER_COALESCED_MMIO
            ioctl(self.vm_fd, request, zone, "KVM_(UN)REGISTER_COALESCED_MMIO")
            (self.zones.add if on else self.zones.discard)((port, size))
            self.active = bool(self.zones)
            if self.active and self._thread is None:
                self._thread = threading.Thread(target=self._drain_loop, name="coalesced-drain", daemon=True)
                self._thread.start()

    def drain(self) -> int:
        """Replay every queued write; how many there were."""
        with self.lock:
            m, base = self._map, self._base
            first, last = struct.unpack_from("<II", m, base)
            n = 0
            while first != last:
                port, length, _pio, data = ENTRY.unpack_from(m, base + RING_HEADER + first * ENTRY.size)
                length = min(length, 8)
                self.handler(port, length, int.from_bytes(data[:length], "little"))
                first = (first + 1) % self._max
                struct.pack_into("<I", m, base, first)
                n += 1
            self.replayed += n
            return n

    def _drain_loop(self) -> None:
        while not self._stop.wait(STOPPED_DRAIN_PERIOD if self.machine_stopped() else DRAIN_PERIOD):
            if self.active:
                try:
                    self.drain()
                except (ValueError, OSError):  # the mapping went away: the VM is closing
                    return

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            try:
                self.drain()
            except (ValueError, OSError):
                pass
            self.active = False
            try:
                self._map.close()
            except (BufferError, ValueError):
                pass
