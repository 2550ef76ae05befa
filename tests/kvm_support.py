"""Helpers for the KVM tests that run the micro-VMM in this process, and the
synthetic guest images they (and the loader tests) boot.

Shared by tests in tests/unit and tests/lab, so they live here and not in any
one test module. Nothing here imports pexpect: these tests also run inside
the nested lab, which carries no pexpect.
"""

from __future__ import annotations

import os
import re
import struct
import threading

import pytest

from tests.support import require_kvm
from vmscope.machine import MachineConfig, MachineUnavailable

# 32-bit guests, hand-assembled (see each comment).
CLI_HLT = bytes.fromhex("faf4")  # cli; hlt
EXIT_42 = bytes.fromhex("b02ae6f4f4")  # mov $42,%al; out %al,$0xf4; hlt
UD2 = bytes.fromhex("0f0b")  # ud2 with no IDT: #UD -> ... -> triple fault
# loop: wait for LSR.DR, read a byte, 'q' -> out 0 to port 0xf4, else echo byte+1
ECHO_PLUS_ONE = bytes.fromhex("66bafd03eca80174f766baf803ec3c717405fec0eeebe9b000e6f4")
LOAD = 0x100000  # where the synthetic ELFs load (physical = virtual)


class SerialSink:
    """A thread-safe serial_out that tests can wait on."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._cond = threading.Condition()

    def write(self, b: bytes) -> int:
        with self._cond:
            self.data += b
            self._cond.notify_all()
        return len(b)

    def flush(self) -> None:
        pass

    def wait_for(self, pattern: bytes, deadline: float = 120.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: re.search(pattern, bytes(self.data)) is not None, deadline)


def make_machine(**config):
    """A KvmMachine, or skip/fail per VMSCOPE_REQUIRE_KVM when KVM is unusable."""
    require_kvm()
    from vmscope.kvm.x86.machine import KvmMachine

    try:
        return KvmMachine(MachineConfig(**config))
    except MachineUnavailable as e:
        if os.environ.get("VMSCOPE_REQUIRE_KVM") == "1":
            pytest.fail(f"VMSCOPE_REQUIRE_KVM=1 but KVM is unusable: {e}")
        pytest.skip(str(e))


def stopped_bzimage_guest(tmp_path, code: bytes, name: str = "guest.bzImage"):
    """A 1-vCPU machine on a synthetic bzImage whose 32-bit code is ``code``
    at 0x100000 (so the VMM builds the Linux platform: in-kernel PIC,
    IOAPIC and LAPIC, kvmclock), started paused: (machine, debug target)
    at its first instruction. The caller shuts the machine down."""
    image = tmp_path / name
    image.write_bytes(bzimage(kernel=code))
    m = make_machine(kernel=image, cpus=1, serial_out=SerialSink())
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
    except BaseException:
        m.shutdown()
        raise
    return m, t


def tiny_guest(tmp_path, code: bytes, name: str = "tiny.elf"):
    path = tmp_path / name
    path.write_bytes(make_pvh_elf(code))
    return path


def _note(name: str, ntype: int, desc: bytes) -> bytes:
    raw = name.encode() + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)
    return struct.pack("<III", len(raw), len(desc), ntype) + pad(raw) + pad(desc)


def make_pvh_elf(code: bytes, *, load: int = LOAD, entry: int | None = None, pvh_note: bool = True,
                 all_cpus: bool = False, machine: int = 62, extra_memsz: int = 0) -> bytes:
    """A minimal ELF64 executable: one PT_LOAD with ``code`` at ``load``
    (physical = virtual) and a PT_NOTE with the PVH entry note."""
    entry = load if entry is None else entry
    notes = b""
    if pvh_note:
        notes += _note("Xen", 18, struct.pack("<Q", entry))
    if all_cpus:
        notes += _note("vmscope", 1, b"")
    phnum = 2 if notes else 1
    code_off = 0x1000
    note_off = code_off + len(code)
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
        2, machine, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0,
    )
    load_ph = struct.pack("<IIQQQQQQ", 1, 5, code_off, load, load, len(code), len(code) + extra_memsz, 0x1000)
    note_ph = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4) if notes else b""
    head = ehdr + load_ph + note_ph
    return head + bytes(code_off - len(head)) + code + notes


def bzimage(version: int = 0x020F, setup_sects: int = 4, loadflags: int = 0x01, xloadflags: int = 0x03,
            kernel: bytes = b"\x90" * 4096, init_size: int = 0x10000, cmdline_size: int = 2048) -> bytes:
    img = bytearray(((setup_sects or 4) + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x200:0x202] = bytes([0xEB, 0x66])  # jmp over the header: it ends at 0x268
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = loadflags
    struct.pack_into("<I", img, 0x214, 0x100000)
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    img[0x234] = 1
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, cmdline_size)
    struct.pack_into("<I", img, 0x260, init_size)
    return bytes(img) + kernel
