"""The few ACPI tables a stock x86 Linux needs from a firmware-less VMM.

- **MADT**: one local APIC per vCPU and the in-kernel IOAPIC. No override
  for IRQ 0: KVM's in-kernel PIT raises GSI 0, which KVM's default routing
  sends to IOAPIC pin 0 (not pin 2 as on PC firmware). Debian's
  kernel is built without ``CONFIG_X86_MPPARSE``, so without a MADT it
  sees one CPU whatever ``--cpus`` says.
- **FADT** + **DSDT** + **FACS**: the power-management ports (PM1a event
  block at 0x600, control at 0x604) and a DSDT whose only object is
  ``\\_S5_``: Linux registers ACPI power-off only if the S5 sleep type is
  defined, and ``poweroff`` then writes SLP_TYP|SLP_EN to 0x604, which ends
  the VMM with status 0. The FADT's reset register (0xCF9, value 6) makes
  ``reboot`` take one port write too.

Everything goes in the legacy BIOS area at 0xE0000, which the e820 map marks
reserved and which Linux scans for the RSDP (the boot_params field
``acpi_rsdp_addr`` points at it as well). Tables are built with ``struct``:
fixed layouts from the ACPI 6 specification, checksums so that every table's
bytes sum to zero.
"""

from __future__ import annotations

import struct

from vmscope.devices.ram import GuestRam

ACPI_BASE = 0xE0000
ACPI_AREA_END = 0x100000
OEM_ID = b"VMSCPE"
OEM_TABLE_ID = b"VMSCOPE "
CREATOR_ID = b"VMSC"

LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
IOAPIC_ID = 0
SCI_IRQ = 9
PM1A_EVT_PORT = 0x600
PM1A_CNT_PORT = 0x604
RESET_PORT = 0xCF9
RESET_VALUE = 0x06
S5_SLEEP_TYPE = 5

FADT_WBINVD = 1 << 0
FADT_RESET_REG_SUP = 1 << 10
GAS_SYSTEM_IO = 1


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with a zero in the checksum slot) sum to 0."""
    return (-sum(data)) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header, then ``body``."""
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    raw = bytearray(header + body)
    raw[9] = checksum(raw)
    return bytes(raw)


def gas(port: int, width_bits: int) -> bytes:
    """A Generic Address Structure for an I/O port."""
    access = {8: 1, 16: 2, 32: 3}[width_bits]
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, access, port)


def madt(cpus: int) -> bytes:
    body = bytearray(struct.pack("<II", LAPIC_ADDR, 1))  # flags: PCAT_COMPAT (the 8259s exist)
    for i in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, IOAPIC_ID, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, SCI_IRQ, SCI_IRQ, 0x000D)  # SCI: level, active high
    return table(b"APIC", 5, bytes(body))


def dsdt() -> bytes:
    """AML for ``Name (_S5, Package () { 5, 5, 0, 0 })``."""
    package = bytes([0x04, 0x0A, S5_SLEEP_TYPE, 0x0A, S5_SLEEP_TYPE, 0x00, 0x00])
    aml = b"\x08_S5_\x12" + bytes([len(package) + 1]) + package
    return table(b"DSDT", 2, aml)


def facs() -> bytes:
    raw = bytearray(64)
    struct.pack_into("<4sI", raw, 0, b"FACS", 64)
    raw[32] = 2  # version
    return bytes(raw)


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(36, "<II", facs_addr, dsdt_addr)
    put(46, "<H", SCI_IRQ)
    put(56, "<I", PM1A_EVT_PORT)
    put(64, "<I", PM1A_CNT_PORT)
    put(88, "<BB", 4, 2)  # PM1_EVT_LEN, PM1_CNT_LEN
    put(96, "<HH", 101, 1001)  # C2/C3 latencies above the limits: no deep C-states
    put(112, "<I", FADT_WBINVD | FADT_RESET_REG_SUP)
    body[116 - 36 : 128 - 36] = gas(RESET_PORT, 8)
    put(128, "<B", RESET_VALUE)
    put(132, "<QQ", facs_addr, dsdt_addr)
    return table(b"FACP", 6, bytes(body))


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    raw = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, 36, xsdt_addr, 0, b"\0\0\0"))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def write_tables(mem: GuestRam, cpus: int) -> int:
    """Lay the tables out from :data:`ACPI_BASE`; returns the RSDP address."""
    if not 1 <= cpus <= 254:
        raise ValueError(f"ACPI tables for {cpus} vCPUs: xAPIC ids go up to 254")
    blobs: dict[str, bytes] = {}
    addrs: dict[str, int] = {}
    cursor = ACPI_BASE + 64  # the RSDP goes first, on a 16-byte boundary

    def place(name: str, blob: bytes) -> int:
        nonlocal cursor
        addrs[name] = cursor
        blobs[name] = blob
        cursor = (cursor + len(blob) + 63) & ~63
        return addrs[name]

    place("facs", facs())
    place("dsdt", dsdt())
    place("fadt", fadt(addrs["dsdt"], addrs["facs"]))
    place("madt", madt(cpus))
    entries = [addrs["fadt"], addrs["madt"]]
    place("rsdt", table(b"RSDT", 1, struct.pack(f"<{len(entries)}I", *entries)))
    place("xsdt", table(b"XSDT", 1, struct.pack(f"<{len(entries)}Q", *entries)))
    if cursor > ACPI_AREA_END:
        raise ValueError("ACPI tables overflow the BIOS area")
    for name, blob in blobs.items():
        mem.write(addrs[name], blob)
    mem.write(ACPI_BASE, rsdp(addrs["rsdt"], addrs["xsdt"]))
    return ACPI_BASE
