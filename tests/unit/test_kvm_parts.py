"""Pure pieces of vmscope.kvm: the 16550, the port bus, the console escape,
guest RAM bounds, the software page walk, the instruction decoder behind
page-backed read watchpoints, and the ioctl numbers. No /dev/kvm needed."""

from __future__ import annotations

import os

import pytest

from vmscope.kvm import abi
from vmscope.devices.console import ConsoleInput, EscapeFilter
from vmscope.kvm.x86.decode import memory_reads
from vmscope.kvm.x86.registers import _abridged_tag_word, _full_tag_word
from vmscope.kvm.devices.bus import PortBus
from vmscope.devices.uart16550 import COM1, Serial16550
from vmscope.devices.ram import GuestRam
from vmscope.kvm.x86.translate import software_walk, walk_leaf


def test_ioctl_numbers_match_linux_headers():
    # values from <linux/kvm.h> on x86_64
    assert abi.KVM_GET_REGS == 0x8090AE81
    assert abi.KVM_SET_SREGS == 0x4138AE84
    assert abi.KVM_TRANSLATE == 0xC018AE85
    assert abi.KVM_SET_GUEST_DEBUG == 0x4048AE9B
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_SET_VCPU_EVENTS == 0x4040AEA0
    assert abi.KVM_RUN == 0xAE80


class Sink(list):
    def __call__(self, b: bytes) -> None:
        self.append(b)


def test_serial_transmit_and_status():
    out = Sink()
    uart = Serial16550(out)
    for ch in b"hi":
        uart.write(COM1, 1, ch)
    assert b"".join(out) == b"hi"
    assert uart.read(COM1 + 5, 1) & 0x60 == 0x60  # THRE|TEMT: always ready
    assert uart.read(COM1 + 5, 1) & 1 == 0  # nothing received


def test_serial_receive_queue():
    uart = Serial16550(Sink())
    uart.feed(b"ab")
    assert uart.read(COM1 + 5, 1) & 1
    assert uart.read(COM1, 1) == ord("a")
    assert uart.read(COM1, 1) == ord("b")
    assert uart.read(COM1 + 5, 1) & 1 == 0


def test_serial_divisor_scratch_and_loopback():
    out = Sink()
    uart = Serial16550(out)
    uart.write(COM1 + 3, 1, 0x80)  # DLAB
    uart.write(COM1, 1, 0x01)
    uart.write(COM1 + 1, 1, 0x00)
    assert (uart.read(COM1, 1), uart.read(COM1 + 1, 1)) == (1, 0)
    uart.write(COM1 + 3, 1, 0x03)  # 8N1
    assert not out  # divisor writes are not output
    uart.write(COM1 + 7, 1, 0x5A)
    assert uart.read(COM1 + 7, 1) == 0x5A
    uart.write(COM1 + 4, 1, 0x10)  # loopback: what we send comes back
    uart.write(COM1, 1, 0x42)
    assert not out and uart.read(COM1, 1) == 0x42


def test_port_bus_routes_and_answers_empty_ports():
    bus = PortBus()
    uart = Serial16550(Sink())
    bus.register(COM1, 8, uart)
    uart.feed(b"z")
    assert bus.read(COM1, 1) == ord("z")
    assert bus.read(0x80, 1) == 0xFF and bus.read(0x80, 2) == 0xFFFF
    bus.write(0x80, 1, 0x12)  # swallowed
    assert bus.unclaimed[0x80] == 3
    with pytest.raises(ValueError, match="overlap"):
        bus.register(COM1 + 4, 2, uart)


def test_escape_filter():
    f = EscapeFilter()
    assert f.feed(b"ls\r") == b"ls\r"
    assert f.feed(b"\x01\x01") == b"\x01"  # Ctrl-A Ctrl-A sends one Ctrl-A
    assert f.feed(b"\x01c") == b"\x01c"  # unknown escape passes through
    assert not f.quit
    assert f.feed(b"ab\x01") == b"ab"
    assert f.feed(b"xjunk") == b"" and f.quit  # split across reads


def test_console_input_passes_piped_bytes_untouched():
    r, w = os.pipe()
    got = []
    import threading

    done = threading.Event()

    def deliver(b):
        got.append(b)
        if b"".join(got).endswith(b"end"):
            done.set()

    ci = ConsoleInput(r, deliver, on_quit=lambda: None)
    ci.start()
    os.write(w, b"\x01xend")  # not a tty: no escape handling
    assert done.wait(10)
    ci.stop()
    os.close(w)
    os.close(r)
    assert b"".join(got) == b"\x01xend"


def test_guest_memory_bounds():
    mem = GuestRam(0, 1 << 20)
    try:
        mem.write(0xFFFF8, b"12345678")
        assert mem.read_u64(0xFFFF8) == int.from_bytes(b"12345678", "little")
        with pytest.raises(IndexError, match="outside RAM"):
            mem.read(0xFFFFC, 8)
        with pytest.raises(ValueError, match="multiple of 4096"):
            GuestRam(0, 1000)
    finally:
        mem.close()


def test_software_walk_4k_2m_and_1g_pages():
    mem = GuestRam(0, 4 << 20)
    try:
        pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
        w = lambda a, v: mem.write(a, v.to_bytes(8, "little"))
        w(pml4 + 8 * 1, pdpt | 3)  # 0x0000_0080_0000_0000
        w(pdpt + 8 * 0, pd | 3)
        w(pdpt + 8 * 1, 0x40000000 | 0x83)  # 1 GiB page
        w(pd + 8 * 0, pt | 3)
        w(pd + 8 * 1, 0x200000 | 0x83)  # 2 MiB page
        w(pt + 8 * 5, 0x123000 | 3)
        base = 1 << 39
        assert software_walk(mem, pml4, base + 5 * 4096 + 0x10) == 0x123010
        assert software_walk(mem, pml4, base + 0x200000 + 0x1234) == 0x201234
        assert software_walk(mem, pml4, base + (1 << 30) + 0x5678) == 0x40005678
        assert software_walk(mem, pml4, base + 6 * 4096) is None  # PTE not present
        assert software_walk(mem, pml4, 0) is None  # PML4E not present
        # the leaf walk says how far the mapping page reaches (long reads take it in one piece)
        assert walk_leaf(mem, pml4, base + 5 * 4096 + 0x10) == (0x123010, 4096 - 0x10)
        assert walk_leaf(mem, pml4, base + 0x200000 + 0x1234) == (0x201234, 0x200000 - 0x1234)
        assert walk_leaf(mem, pml4, base + (1 << 30) + 0x5678) == (0x40005678, (1 << 30) - 0x5678)
        assert walk_leaf(mem, pml4, base + 6 * 4096) is None
    finally:
        mem.close()


def test_memory_reads_decodes_explicit_operands():
    regs = {"rdi": 2, "rax": 0x5000, "rsp": 0x8000}
    # incq 0x1001f8(,%rdi,8)
    assert memory_reads(bytes.fromhex("48ff04fdf8011000"), 0x10011C, regs) == [(0x1001F8 + 16, 8)]
    # lock incq 0xc4(%rip): rip-relative, from the end of the instruction
    assert memory_reads(bytes.fromhex("f048ff05c4000000"), 0x100114, regs) == [(0x100114 + 8 + 0xC4, 8)]
    # mov %eax,(%rax): a store, no read
    assert memory_reads(bytes.fromhex("8900"), 0x1000, regs) == []
    # mov 0x10(%eax),%ecx in 32-bit code
    assert memory_reads(bytes.fromhex("8b4810"), 0x1000, regs, long_mode=False) == [(0x5010, 4)]


def test_x87_tag_word_round_trip():
    assert _full_tag_word(0) == 0xFFFF  # all empty
    assert _full_tag_word(0x01) == 0xFFFC
    assert _abridged_tag_word(_full_tag_word(0xA5)) == 0xA5


def test_console_on_a_terminal_raw_mode_and_ctrl_a_x():
    import termios
    import threading

    from vmscope.devices.console import raw_terminal

    master, slave = os.openpty()
    try:
        assert termios.tcgetattr(slave)[3] & termios.ICANON
        with raw_terminal(slave) as raw:
            assert raw and not termios.tcgetattr(slave)[3] & termios.ICANON
            got, quit_ = [], threading.Event()
            ci = ConsoleInput(slave, got.append, on_quit=quit_.set)
            ci.start()
            os.write(master, b"ok\x01\x01\x01x")
            assert quit_.wait(10)
            ci.stop()
            assert b"".join(got) == b"ok\x01"
        assert termios.tcgetattr(slave)[3] & termios.ICANON  # restored
    finally:
        os.close(master)
        os.close(slave)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with raw_terminal(null) as raw:
            assert raw is False  # not a terminal: left alone
    finally:
        os.close(null)
