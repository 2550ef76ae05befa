"""The aarch64 register table: GDB's core/fpu layout and a target.xml that
real gdb-multiarch accepts and picks the aarch64 architecture from."""

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from vmscope.arch.aarch64 import AARCH64


def test_core_is_the_268_byte_g_packet_gdb_expects():
    core = [r for r in AARCH64.registers if r.feature == "org.gnu.gdb.aarch64.core"]
    assert [r.name for r in core] == [f"x{i}" for i in range(31)] + ["sp", "pc", "cpsr"]
    assert sum(r.size for r in core) == 268
    assert AARCH64.index["v0"] == 34 and AARCH64.index["fpsr"] == 66 and AARCH64.index["fpcr"] == 67


def test_brk0_is_the_breakpoint():
    assert AARCH64.breakpoint == b"\x00\x00\x20\xd4"
    assert AARCH64.breakpoint_kind == 4


def test_g_round_trip_keeps_every_register():
    values = {r.name: (i * 0x0101010101010101) & ((1 << r.bitsize) - 1) for i, r in enumerate(AARCH64.registers)}
    values["v7"] = (1 << 128) - 3
    raw = AARCH64.encode_g(values)
    assert len(raw) == AARCH64.g_size
    assert AARCH64.decode_g(raw) == values


def test_target_xml_is_well_formed_and_declares_each_register_once():
    root = ET.fromstring(AARCH64.target_xml.split("\n", 2)[2])
    assert root.findtext("architecture") == "aarch64"
    names = [reg.get("name") for reg in root.iter("reg")]
    assert names == [r.name for r in AARCH64.registers]
    assert {"SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1", "VBAR_EL1", "ESR_EL1", "FAR_EL1", "CurrentEL"} <= set(names)


@pytest.mark.skipif(shutil.which("gdb-multiarch") is None, reason="gdb-multiarch not installed")
def test_gdb_multiarch_accepts_the_description(tmp_path):
    xml = tmp_path / "aarch64.xml"
    xml.write_text(AARCH64.target_xml)
    out = subprocess.run(
        ["gdb-multiarch", "-nx", "-batch", "-ex", f"set tdesc filename {xml}",
         "-ex", "show architecture", "-ex", "maint print registers"],
        capture_output=True, text=True, timeout=60,
    ).stdout
    assert '(currently "aarch64")' in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert rows["cpsr"][1] == "33" and rows["cpsr"][5] == "cpsr_flags"
    assert rows["v31"][5] == "aarch64v"
    assert rows["TTBR1_EL1"][4] == "8"
    # gdb adds its pseudo registers (q0, d0, w0...) after ours: the layout held
    assert "q0" in rows and "w0" in rows
