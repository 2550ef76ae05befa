"""QEMU helper parsing (flat memory tree with a PCI hole, ``info
registers``) and the register layout parser, on QEMU's own output text."""

from __future__ import annotations

import os

from vmscope.client.helpers.qemu import merge_ranges, parse_flatview, parse_x86_info_registers, RamRange
from vmscope.client.tdesc import layout_from_arch, parse_target_xml
from vmscope.vmi.memory import map_file_regions

FLATVIEW_4G = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): mem
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): mem @00000000000c0000
  00000000000e0000-00000000000fffff (prio 1, rom): mem @00000000000e0000
  0000000000100000-00000000bfffffff (prio 0, ram): mem @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): mem @00000000c0000000

FlatView #2
 AS "cpu-smm-0", root: memory
  0000000000000000-00000000000c2fff (prio 0, ram): other
"""


def test_flatview_maps_ram_above_the_pci_hole_to_its_file_offset():
    ranges = merge_ranges([r for r in parse_flatview(FLATVIEW_4G) if r.region == "mem"])
    assert ranges == [RamRange(0, 0xA0000, "mem", 0),
                      RamRange(0xC0000, 0xBFF40000, "mem", 0xC0000),
                      RamRange(0x1_0000_0000, 0x4000_0000, "mem", 0xC000_0000)]


def test_regions_read_through_a_sparse_ram_file(tmp_path):
    """GPA 4 GiB + x is file offset 3 GiB + x: not offset == address."""
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(0x1_0000_0000)
        f.seek(0xC000_1234)
        f.write(b"above-the-hole")
        f.seek(0x1234)
        f.write(b"low")
    ranges = merge_ranges([r for r in parse_flatview(FLATVIEW_4G) if r.region == "mem"])
    mem = map_file_regions(str(path), [(r.gpa, r.size, r.offset) for r in ranges])
    assert mem.read(0x1_0000_1234, 14) == b"above-the-hole"
    assert mem.read(0x1234, 3) == b"low"
    buf = bytearray(14)
    assert mem.readinto(0x1_0000_1234, buf) == 14 and bytes(buf) == b"above-the-hole"
    os.unlink(path)


INFO_REGISTERS = """CPU#0
RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000000 RDX=4000000000000000
RIP=ffffffffa4c17a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]
GS =0000 ffff8a289f400000 00000000 00000000
TR =0040 fffffe0000003000 00004087 00008900 DPL=0 TSS64-avl
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=0000000010976820 CR3=0000000002660000 CR4=000006b0
DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000
DR6=00000000ffff0ff0 DR7=0000000000000400
EFER=0000000000000d01
"""


def test_info_registers_gives_the_system_registers_gdb_lacks():
    regs = parse_x86_info_registers(INFO_REGISTERS)
    assert regs["cr3"] == 0x2660000 and regs["efer"] == 0xD01 and regs["cr0"] == 0x80050033
    assert regs["gdtr_base"] == 0xFFFFFE0000001000 and regs["idtr_limit"] == 0xFFF
    assert regs["gs_base"] == 0xFFFF8A289F400000 and regs["tr_base"] == 0xFFFFFE0000003000


def test_target_xml_with_includes_and_regnums():
    docs = {
        "target.xml": b'<target><architecture>aarch64</architecture><xi:include href="core.xml"/>'
                      b'<xi:include href="sys.xml"/></target>',
        "core.xml": b'<feature name="org.gnu.gdb.aarch64.core"><reg name="x0" bitsize="64"/>'
                    b'<reg name="pc" bitsize="64" type="code_ptr"/><reg name="cpsr" bitsize="32"/></feature>',
        "sys.xml": b'<feature name="org.qemu.gdb.aarch64.sysregs"><reg name="TCR_EL1" bitsize="64" regnum="90"/>'
                   b'<reg name="TTBR1_EL1" bitsize="64"/></feature>',
    }
    layout = parse_target_xml(lambda annex: docs[annex])
    assert layout.arch == "aarch64"
    assert [(r.name, r.regnum) for r in layout.registers] == [("x0", 0), ("pc", 1), ("cpsr", 2),
                                                              ("TCR_EL1", 90), ("TTBR1_EL1", 91)]
    raw = (1).to_bytes(8, "little") + (0x4000).to_bytes(8, "little") + (0x3C5).to_bytes(4, "little")
    assert layout.decode_g(raw) == {"x0": 1, "pc": 0x4000, "cpsr": 0x3C5}


def test_fallback_layout_from_the_arch_table():
    from vmscope.arch.x86_64 import X86_64

    layout = layout_from_arch(X86_64)
    assert layout["rip"].regnum == X86_64.index["rip"] and "cr3" in layout


def test_qmp_that_never_greets_times_out_clearly():
    """QEMU keeps a second QMP client waiting for its greeting; we must
    give up with an error that says why, not hang."""
    import socket
    import time

    import pytest

    from vmscope.client.helpers.qemu import QemuMonitor, QmpError

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts (in the backlog) but never says anything
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(QmpError, match="did not greet"):
            QemuMonitor(f"127.0.0.1:{port}", timeout=1)
        assert time.monotonic() - start < 30  # bounded, not a hang (loose on purpose)
