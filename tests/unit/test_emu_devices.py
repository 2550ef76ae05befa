"""The shared devices as the emulated target uses them: guest RAM, the UARTs, ELF loading."""

from __future__ import annotations

import io
import os

import pytest

from vmscope.devices.console import SerialSink
from vmscope.devices.elf import load_elf
from vmscope.devices.pl011 import Pl011
from vmscope.devices.ram import GuestRam
from vmscope.devices.uart16550 import Serial16550 as Uart16550
from vmscope.gdbserver.target import TargetError
from vmscope.guests import guest_elf, guest_symbols
from vmscope.machine import ImageError


def test_16550_prints_thr_writes_but_not_divisor_latch_writes():
    out = io.BytesIO()
    uart = Uart16550(SerialSink(out))
    uart.write(0x3FB, 1, 0x80)  # LCR.DLAB
    uart.write(0x3F8, 1, 0x01)  # divisor low, not a character
    uart.write(0x3FB, 1, 0x03)
    for ch in b"hi\n":
        assert uart.read(0x3FD) & 0x20  # THR empty: a polling driver may send
        uart.write(0x3F8, 1, ch)
    assert out.getvalue() == b"hi\n"
    assert uart.handles(0x3F8) and uart.handles(0x3FF) and not uart.handles(0x2F8)


def test_16550_receives_fed_bytes_in_order():
    uart = Uart16550(SerialSink(io.BytesIO()))
    assert not uart.read(0x3FD) & 1
    uart.feed(b"ok")
    got = []
    while uart.read(0x3FD) & 1:
        got.append(uart.read(0x3F8))
    assert bytes(got) == b"ok"


def test_pl011_prints_dr_writes_and_never_reports_a_full_fifo():
    out = io.BytesIO()
    uart = Pl011(SerialSink(out))
    assert not uart.read(0x18) & (1 << 5)  # FR.TXFF clear
    assert uart.read(0x18) & (1 << 4)  # FR.RXFE: nothing typed yet
    uart.feed(b"z")
    assert not uart.read(0x18) & (1 << 4) and uart.read(0x00) == ord("z")
    uart.write(0x30, 0x301)  # CR: ignored, kept
    for ch in b"ok\n":
        uart.write(0x00, ch)
    assert out.getvalue() == b"ok\n"
    assert uart.read(0x30) == 0x301
    assert [uart.read(0xFE0 + 4 * i) for i in range(4)] == [0x11, 0x10, 0x34, 0x00]


def test_serial_sink_survives_a_closed_console():
    out = io.BytesIO()
    sink = SerialSink(out)
    out.close()
    sink.put(ord("x"))  # no exception: the guest must keep running


def test_guest_ram_is_a_shareable_memfd_with_checked_bounds():
    ram = GuestRam(0x4000_0000, 1 << 20)
    try:
        ram.write(0x4000_0010, b"abc")
        assert ram.read(0x4000_0010, 3) == b"abc"
        with open(f"/proc/self/fd/{ram.fd}", "rb") as other:  # another mapping sees it
            other.seek(0x10)
            assert other.read(3) == b"abc"
        with pytest.raises(TargetError, match="outside RAM 0x40000000-0x40100000"):
            ram.read(0x3FFF_FFFF, 2)
        with pytest.raises(TargetError):
            ram.write(0x400F_FFFF, b"xy")
    finally:
        ram.close()
    with pytest.raises(ValueError, match="multiple of"):
        GuestRam(0, 1000)


def test_load_elf_places_segments_and_reads_symbols():
    ram = GuestRam(0x4000_0000, 16 << 20)
    try:
        image = load_elf(guest_elf("demo", "aarch64"), "aarch64", ram)
        symbols = guest_symbols("demo", "aarch64")
        assert image.entry == symbols["_start"]
        assert image.symbols["tick"] == symbols["tick"]
        assert ram.read(symbols["counter"], 8) == bytes(8)
        assert ram.read(image.entry, 4) != bytes(4)
    finally:
        ram.close()


def test_load_elf_names_a_segment_outside_ram():
    ram = GuestRam(0, 1 << 20)  # the arm64 demo links at 0x40080000
    try:
        with pytest.raises(ImageError, match=r"e_machine is EM_AARCH64"):
            load_elf(guest_elf("demo", "aarch64"), "x86_64", ram)
        with pytest.raises(ImageError, match=r"PT_LOAD at p_paddr 0x40080000 .* outside guest RAM 0x0-0x100000"):
            load_elf(guest_elf("demo", "aarch64"), "aarch64", ram)
    finally:
        ram.close()
