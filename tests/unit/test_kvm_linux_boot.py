"""The bzImage loader and the ACPI tables, on synthetic images (no KVM)."""

from __future__ import annotations

import struct

import pytest

from tests.kvm_support import bzimage
from vmscope.kvm.boot import acpi, linux
from vmscope.kvm.boot.common import load_kernel
from vmscope.devices.ram import GuestRam
from vmscope.machine import ImageError


@pytest.fixture
def mem():
    m = GuestRam(0, 64 << 20)
    yield m
    m.close()


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_header_fields_parsed():
    h = linux.parse_header(bzimage(version=0x020F, setup_sects=0))
    assert (h.version_text, h.setup_sects, h.setup_size) == ("2.15", 4, 2560)
    assert h.relocatable and h.xloadflags & linux.XLF_KERNEL_64
    assert h.header_end == 0x268


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:0x100], r"too short for a Linux bzImage"),
    (lambda b: b[:0x202] + b"XXXX" + b[0x206:], r"not a Linux bzImage \(no 'HdrS' signature at 0x202\)"),
    (lambda b: b[:0x1FE] + b"\0\0" + b[0x200:], r"boot_flag is 0x0000, expected 0xaa55"),
])
def test_not_a_bzimage(mutate, message):
    with pytest.raises(ImageError, match=message):
        linux.parse_header(mutate(bzimage()), "img")


def test_old_protocol_is_refused_with_its_version():
    with pytest.raises(ImageError, match=r"img: Linux boot protocol 2\.11 is too old; vmscope boots bzImages with protocol 2\.12"):
        linux.parse_header(bzimage(version=0x020B), "img")


def test_zimage_and_32_bit_kernels_are_refused():
    with pytest.raises(ImageError, match=r"a zImage \(loadflags.LOADED_HIGH clear\)"):
        linux.parse_header(bzimage(loadflags=0))
    with pytest.raises(ImageError, match=r"a 32-bit kernel \(xloadflags.XLF_KERNEL_64 clear\)"):
        linux.parse_header(bzimage(xloadflags=0))


def test_truncated_after_setup():
    with pytest.raises(ImageError, match=r"truncated: setup_sects=4"):
        linux.parse_header(bzimage(kernel=b""), "img")


def test_load_writes_kernel_boot_params_cmdline_and_initrd(tmp_path, mem):
    kernel = bytes(range(256)) * 16
    path = write(tmp_path, "bzImage", bzimage(kernel=kernel))
    initrd = write(tmp_path, "initrd", b"INITRD" * 1000)
    plan = load_kernel(path, mem, "console=ttyS0 quiet", initrd)
    assert (plan.mode, plan.entry, plan.start_info) == ("linux32", 0x100000, linux.BOOT_PARAMS_ADDR)
    assert mem.read(0x100000, len(kernel)) == kernel
    bp = mem.read(linux.BOOT_PARAMS_ADDR, 4096)
    assert bp[0x202:0x206] == b"HdrS"
    assert bp[0x210] == 0xFF and bp[0x211] & 0x81 == 0x81
    cmd_ptr, = struct.unpack_from("<I", bp, 0x228)
    assert mem.read(cmd_ptr, 20) == b"console=ttyS0 quiet\0"
    rd_addr, rd_size = struct.unpack_from("<II", bp, 0x218)
    assert rd_size == 6000 and rd_addr % 4096 == 0 and rd_addr + rd_size <= mem.size
    assert mem.read(rd_addr, 6) == b"INITRD"
    n = bp[0x1E8]
    e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, mem.size - 0x100000, 1)]


def test_empty_command_line_gets_the_serial_console_default(tmp_path, mem):
    load_kernel(write(tmp_path, "bzImage", bzimage()), mem, "")
    assert mem.read(0x20000, len(linux.DEFAULT_CMDLINE) + 1) == linux.DEFAULT_CMDLINE.encode() + b"\0"


def test_too_little_memory_and_too_long_command_line(tmp_path, mem):
    with pytest.raises(ImageError, match=r"needs 256 MiB above 1 MiB to decompress; guest RAM is 64 MiB: give the VM more memory \(--mem\)"):
        load_kernel(write(tmp_path, "big", bzimage(init_size=256 << 20)), mem)
    with pytest.raises(ImageError, match=r"command line is 3000 bytes; this kernel takes at most 2048"):
        load_kernel(write(tmp_path, "k", bzimage()), mem, "x" * 3000)


def test_acpi_tables_checksum_and_list_one_lapic_per_cpu(mem):
    rsdp_addr = acpi.write_tables(mem, 3)
    rsdp = mem.read(rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_addr, = struct.unpack_from("<Q", rsdp, 24)

    def tbl(addr):
        sig, length = struct.unpack_from("<4sI", mem.read(addr, 8))
        raw = mem.read(addr, length)
        assert sum(raw) % 256 == 0, sig
        return sig, raw

    sig, xsdt = tbl(xsdt_addr)
    tables = dict(tbl(a) for a in struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36))
    assert set(tables) == {b"FACP", b"APIC"}
    madt = tables[b"APIC"]
    lapics, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 0:
            lapics.append(madt[off + 3])
        off += length
    assert lapics == [0, 1, 2]
    fadt = tables[b"FACP"]
    dsdt_addr, = struct.unpack_from("<Q", fadt, 140)
    sig, dsdt = tbl(dsdt_addr)
    assert sig == b"DSDT" and b"_S5_" in dsdt
    assert struct.unpack_from("<I", fadt, 64) == (acpi.PM1A_CNT_PORT,)


# --- the PC devices a Linux guest talks to (no KVM: a recording IRQ line) ------------------------

class RecordingLine:
    """The level and the rising edges a UART asked of its line (what the
    real IrqLine sends to KVM, without a VM)."""

    def __init__(self):
        self.level = False
        self.edges = 0

    @property
    def raised(self) -> int:  # IrqLine's name for the count
        return self.edges

    def set(self, level: bool) -> None:
        if level and not self.level:
            self.edges += 1
        self.level = level


def test_serial_raises_irq_for_received_bytes_until_read():
    from vmscope.kvm.devices.uart_irq import InterruptingSerial

    out, line = [], RecordingLine()
    uart = InterruptingSerial(out.append, line)
    uart.write(0x3F9, 1, 0x01)  # IER: received-data interrupt
    assert not line.level
    uart.feed(b"ab")
    assert line.level and line.edges == 1
    assert uart.read(0x3FA, 1) & 0x0F == 0x04  # IIR: received data
    assert uart.read(0x3F8, 1) == ord("a") and line.level
    assert uart.read(0x3F8, 1) == ord("b") and not line.level
    assert uart.read(0x3FA, 1) & 0x0F == 0x01  # nothing pending


def test_serial_transmit_interrupt_and_console_tail():
    from vmscope.kvm.devices.uart_irq import InterruptingSerial

    out, line = [], RecordingLine()
    uart = InterruptingSerial(lambda b: out.append(b), line)
    uart.write(0x3F9, 1, 0x02)  # enabling THRE with an empty transmitter interrupts at once
    assert line.level
    assert uart.read(0x3FA, 1) & 0x0F == 0x02 and not line.level  # reading IIR clears THRE
    for ch in b"Kernel panic - not syncing: x\nlast":
        uart.write(0x3F8, 1, ch)
    assert line.level and line.edges == 2
    assert b"".join(out) == b"Kernel panic - not syncing: x\nlast"
    assert uart.console_tail() == ["Kernel panic - not syncing: x", "last"]


def test_serial_state_line_shows_a_transmit_interrupt_waiting_for_the_guest():
    """What `kill -USR1` prints of the UART: a tty whose output stalled is
    told apart from one the guest never asked to send (THRE pending on a
    high line that the guest has not acknowledged)."""
    from vmscope.kvm.devices.uart_irq import InterruptingSerial

    line = RecordingLine()
    uart = InterruptingSerial(lambda b: None, line)
    assert uart.state() == ("UART 0x3f8: IER=0x00 LCR=0x00 MCR=0x00, THRE not pending, 0 bytes to read, "
                            "IRQ line low (0 rising edges)")
    uart.write(0x3F9, 1, 0x02)
    uart.feed(b"x")
    assert uart.state() == ("UART 0x3f8: IER=0x02 LCR=0x00 MCR=0x00, THRE pending, 1 bytes to read, "
                            "IRQ line high (1 rising edges)")


def test_rtc_reads_host_time_in_bcd_and_never_shows_update_in_progress():
    from vmscope.kvm.devices.rtc import CmosRtc

    t = 1_700_000_000  # 2023-11-14 22:13:20 UTC, a Tuesday
    rtc = CmosRtc(clock=lambda: t)

    def reg(n):
        rtc.write(0x70, 1, 0x80 | n)  # bit 7 (NMI mask) is not part of the index
        return rtc.read(0x71, 1)

    assert [reg(r) for r in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)] == [0x20, 0x13, 0x22, 0x14, 0x11, 0x23, 0x20]
    assert reg(0x06) == 3  # Tuesday (Sunday = 1)
    assert reg(0x0A) & 0x80 == 0 and reg(0x0D) == 0x80
    rtc.write(0x70, 1, 0x40)
    rtc.write(0x71, 1, 0x5A)
    assert reg(0x40) == 0x5A


def test_reset_ports_end_with_0_or_report_a_panic():
    from vmscope.kvm.devices.acpi_pm import ResetPorts
    from vmscope.kvm.devices.i8042 import I8042

    class Machine:
        def __init__(self, tail):
            self.ended = None
            self.serial = type("S", (), {"console_tail": lambda _self: tail})()

        def end(self, status, report):
            self.ended = (status, report)

    m = Machine(["Run /init as init process"])
    ResetPorts(m).write(0xCF9, 1, 0x06)
    assert m.ended == (0, None)
    m = Machine(["x", "Kernel panic - not syncing: Attempted to kill init!", "---[ end Kernel panic"])
    I8042(ResetPorts(m), data_port=False).write(0x64, 1, 0xFE)
    status, report = m.ended
    assert status == 1 and "keyboard controller reset" in report and "Attempted to kill init" in report


def test_exit_storm_is_one_port_in_a_row_per_vcpu():
    from vmscope.kvm.devices.storm import ExitStormDetector

    d = ExitStormDetector(vcpus=2, limit=5)
    for _ in range(100):  # serial output: THR writes and LSR reads alternate
        assert d.io(0, 0x3F8, True) is None
        assert d.io(0, 0x3FD, False) is None
    for _ in range(4):
        assert d.io(1, 0x64, False) is None
        assert d.io(0, 0x64, False) is None  # another vCPU's run is its own
    assert d.io(1, 0x64, False) == "exit storm: 5 reads of port 0x64 in a row and nothing else"
