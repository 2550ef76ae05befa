"""ELF cores as QEMU's ``dump-guest-memory`` writes them, both ways.

Layout (QEMU's ``dump.c``, ELF64, little-endian, ``ET_CORE``): the ELF
header, then one ``PT_NOTE`` program header followed by a ``PT_LOAD`` per
RAM region (``p_paddr`` = guest-physical address, ``p_vaddr`` = 0: a
physical dump), then the notes, then the RAM contents in region order.
The notes are, per vCPU, an ``NT_PRSTATUS`` note named ``CORE`` (the Linux
``elf_prstatus`` with ``pr_pid`` = vCPU number + 1), then per vCPU a note
named ``QEMU`` (x86_64: ``QEMUCPUState``, which also carries CR0-CR4 and the
segment bases), then the guest's ``VMCOREINFO`` note. crash and drgn find
the kernel by the VMCOREINFO note (KERNELOFFSET, swapper_pg_dir, ...); our
reader finds the page-table root in the QEMU note.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Sequence

from vmscope.vmi.memory import Region, RegionMemory

EM_X86_64, EM_AARCH64 = 62, 183
ET_CORE, PT_LOAD, PT_NOTE = 4, 1, 4
NT_PRSTATUS = 1
ELF_HEADER_SIZE, PHDR_SIZE = 64, 56
PRSTATUS_REGS_AT = 112  # pr_reg in struct elf_prstatus (x86_64 and arm64 alike)
PRSTATUS_PID_AT = 32

# user_regs_struct (x86_64): the order of pr_reg
X86_PRSTATUS_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
                     "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
                     "ds", "es", "fs", "gs")
ARM64_PRSTATUS_REGS = tuple(f"x{i}" for i in range(31)) + ("sp", "pc", "cpsr")
PRSTATUS_SIZE = {"x86_64": PRSTATUS_REGS_AT + 8 * len(X86_PRSTATUS_REGS) + 8,  # 336
                 "aarch64": PRSTATUS_REGS_AT + 8 * len(ARM64_PRSTATUS_REGS) + 8}  # 392

# QEMUCPUState (target/i386/arch_dump.c), version 1
QEMU_STATE_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                   "r14", "r15", "rip", "eflags")
QEMU_STATE_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_SEGMENT = struct.Struct("<IIIIQ")  # selector, limit, flags, pad, base
QEMU_STATE_SIZE = 8 + 8 * len(QEMU_STATE_GPRS) + _SEGMENT.size * len(QEMU_STATE_SEGMENTS) + 8 * 5  # 432

MACHINES = {"x86_64": EM_X86_64, "aarch64": EM_AARCH64}
ARCH_OF = {v: k for k, v in MACHINES.items()}


class CoreError(ValueError):
    """A file that is not a usable ELF core; the message says which part."""


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name_z), len(desc), ntype) + pad(name_z) + pad(desc)


def prstatus_note(arch: str, index: int, regs: dict[str, int]) -> bytes:
    names = X86_PRSTATUS_REGS if arch == "x86_64" else ARM64_PRSTATUS_REGS
    desc = bytearray(PRSTATUS_SIZE[arch])
    struct.pack_into("<I", desc, PRSTATUS_PID_AT, index + 1)
    struct.pack_into(f"<{len(names)}Q", desc, PRSTATUS_REGS_AT, *(regs.get(n, 0) & (2**64 - 1) for n in names))
    return _note(b"CORE", NT_PRSTATUS, bytes(desc))


def qemu_cpu_note(regs: dict[str, int]) -> bytes:
    """QEMU's x86 CPU-state note. Only what a gdbstub tells us is filled:
    selectors, the FS/GS bases and CR0-CR4; limits and flags stay 0."""
    desc = bytearray(struct.pack("<II", 1, QEMU_STATE_SIZE))
    desc += struct.pack(f"<{len(QEMU_STATE_GPRS)}Q", *(regs.get(n, 0) & (2**64 - 1) for n in QEMU_STATE_GPRS))
    for seg in QEMU_STATE_SEGMENTS:
        base = regs.get(f"{seg}_base", 0)
        desc += _SEGMENT.pack(regs.get(seg, 0) & 0xFFFF, 0, 0, 0, base & (2**64 - 1))
    desc += struct.pack("<5Q", *(regs.get(f"cr{i}", 0) & (2**64 - 1) for i in range(5)))
    return _note(b"QEMU", 0, bytes(desc))


@dataclass
class DumpPlan:
    """What goes into a core: the RAM regions, each vCPU's registers, and
    the guest kernel's VMCOREINFO text (None for a guest without one)."""

    arch: str
    regions: Sequence[tuple[int, int]]  # (guest-physical address, size)
    cpus: Sequence[dict[str, int]]
    vmcoreinfo: bytes | None = None

    def notes(self) -> bytes:
        out = b"".join(prstatus_note(self.arch, i, r) for i, r in enumerate(self.cpus))
        if self.arch == "x86_64":
            out += b"".join(qemu_cpu_note(r) for r in self.cpus)
        if self.vmcoreinfo:
            out += _note(b"VMCOREINFO", 0, self.vmcoreinfo)
        return out

    @property
    def ram_bytes(self) -> int:
        return sum(size for _, size in self.regions)


def write_core(f: BinaryIO, plan: DumpPlan, read: Callable[[int, int], bytes], *, chunk: int = 1 << 20,
               progress: Callable[[int, int], None] | None = None) -> int:
    """Write the core for ``plan`` to ``f``, reading RAM with ``read(gpa, n)``
    in ``chunk``-sized pieces; ``progress(done, total)`` after each. Returns
    the file size."""
    if plan.arch not in MACHINES:
        raise CoreError(f"cannot write a core for {plan.arch!r} (x86_64 or aarch64)")
    notes = plan.notes()
    phnum = 1 + len(plan.regions)
    notes_at = ELF_HEADER_SIZE + PHDR_SIZE * phnum
    ram_at = notes_at + len(notes)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack("<HHIQQQIHHHHHH", ET_CORE, MACHINES[plan.arch], 1, 0, ELF_HEADER_SIZE, 0, 0,
                                 ELF_HEADER_SIZE, PHDR_SIZE, phnum, 0, 0, 0)
    phdrs = [struct.pack("<IIQQQQQQ", PT_NOTE, 0, notes_at, 0, 0, len(notes), len(notes), 0)]
    offset = ram_at
    for gpa, size in plan.regions:
        phdrs.append(struct.pack("<IIQQQQQQ", PT_LOAD, 0, offset, 0, gpa, size, size, 0))
        offset += size
    f.write(header + b"".join(phdrs) + notes)
    done, total = 0, plan.ram_bytes
    for gpa, size in plan.regions:
        pos = gpa
        while pos < gpa + size:
            n = min(chunk, gpa + size - pos)
            data = read(pos, n)
            if data.count(0) == n:  # never-touched RAM: a hole in the file, not n zero bytes on disk
                f.seek(n, os.SEEK_CUR)
            else:
                f.write(data)
            pos += n
            done += n
            if progress:
                progress(done, total)
    f.truncate(offset)  # the file ends where the RAM does, even after a final hole
    return offset


@dataclass
class CoreFile:
    """An ELF core read back: RAM as :class:`~vmscope.vmi.memory.RegionMemory`
    (mapped, not copied), each vCPU's registers, and VMCOREINFO."""

    path: str
    arch: str = ""
    memory: RegionMemory | None = None
    cpus: list[dict[str, int]] = field(default_factory=list)
    vmcoreinfo: bytes | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CoreFile":
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CoreError(f"{path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < ELF_HEADER_SIZE:
                raise CoreError(f"{path}: {size} bytes, too short for an ELF header")
            data = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
        finally:
            os.close(fd)
        core = cls(path)
        core._parse(data, size)
        return core

    def _parse(self, data, size: int) -> None:
        path = self.path
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise CoreError(f"{path}: not a 64-bit little-endian ELF file")
        e_type, e_machine = struct.unpack_from("<HH", data, 16)
        if e_type != ET_CORE:
            raise CoreError(f"{path}: ELF type {e_type}, not a core (4)")
        if e_machine not in ARCH_OF:
            raise CoreError(f"{path}: machine {e_machine} is neither x86_64 nor aarch64")
        self.arch = ARCH_OF[e_machine]
        phoff, = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        if phentsize != PHDR_SIZE or phoff + phnum * PHDR_SIZE > size:
            raise CoreError(f"{path}: program headers run past the end of the file (truncated?)")
        regions, prstatus, qemu = [], [], []
        for i in range(phnum):
            p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data,
                                                                                      phoff + i * PHDR_SIZE)
            if p_type == PT_LOAD and p_filesz:
                if p_offset + p_filesz > size:
                    raise CoreError(f"{path}: RAM at guest-physical {p_paddr:#x} (+{p_filesz:#x}) runs past the end "
                                    f"of the file ({size:#x} bytes): truncated")
                regions.append(Region(p_paddr, p_filesz, data, p_offset))
            elif p_type == PT_NOTE:
                if p_offset + p_filesz > size:
                    raise CoreError(f"{path}: the notes run past the end of the file (truncated)")
                for name, ntype, desc in _notes(bytes(data[p_offset : p_offset + p_filesz])):
                    if name == b"CORE" and ntype == NT_PRSTATUS:
                        prstatus.append(desc)
                    elif name == b"QEMU":
                        qemu.append(desc)
                    elif name == b"VMCOREINFO":
                        self.vmcoreinfo = desc.rstrip(b"\0")
        if not regions:
            raise CoreError(f"{path}: no RAM (PT_LOAD) in this core")
        self.memory = RegionMemory(regions)
        names = X86_PRSTATUS_REGS if self.arch == "x86_64" else ARM64_PRSTATUS_REGS
        for i, desc in enumerate(prstatus):
            regs = dict(zip(names, struct.unpack_from(f"<{len(names)}Q", desc, PRSTATUS_REGS_AT)))
            if i < len(qemu) and len(qemu[i]) >= QEMU_STATE_SIZE:
                regs.update(_qemu_state(qemu[i]))
            self.cpus.append(regs)


def _qemu_state(desc: bytes) -> dict[str, int]:
    out = {}
    pos = 8 + 8 * len(QEMU_STATE_GPRS)
    for seg in QEMU_STATE_SEGMENTS:
        _sel, _limit, _flags, _pad, base = _SEGMENT.unpack_from(desc, pos)
        if seg in ("fs", "gs", "gdt", "idt"):
            out[f"{seg}_base"] = base
        pos += _SEGMENT.size
    out.update({f"cr{i}": v for i, v in enumerate(struct.unpack_from("<5Q", desc, pos))})
    return out


def _notes(blob: bytes):
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name = blob[pos : pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        desc = blob[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        yield name, ntype, desc
