"""The arm64 Linux boot protocol: an ``Image`` straight into RAM, no firmware.

What a boot loader does (Documentation/arch/arm64/booting.rst), and no more:

- check the 64-byte image header: the magic ``ARM\\x64`` at 0x38, a
  little-endian kernel (flags bit 0), the page size it was built for, and
  ``image_size`` (the whole footprint with BSS, which must fit in RAM);
- accept the image gzip-compressed too (distributions ship ``vmlinuz``
  that way; there is no decompressor in an arm64 Image, the loader
  inflates it);
- place it at a 2 MiB-aligned base plus ``text_offset`` (0x80000 for an
  old kernel whose ``image_size`` is 0);
- place the initrd above the kernel and the device tree at the top of RAM
  (8-byte aligned, at most 2 MiB; page-aligned here);
- enter at the image's first byte with x0 = the device tree's address,
  x1-x3 = 0, EL1h, DAIF masked, MMU and D-cache off: the state
  ``KVM_ARM_VCPU_INIT`` leaves a vCPU in.

Errors name the field that is wrong (``ImageError``), as the x86 loader's do.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from vmscope.machine import ImageError, kernel_file_errors

MAGIC = b"ARM\x64"
MAGIC_OFFSET = 0x38
HEADER_SIZE = 64
ALIGN_2M = 2 << 20
OLD_TEXT_OFFSET = 0x80000  # image_size == 0: a kernel before 3.17
FDT_MAX = 2 << 20
PAGE = 4096

FLAG_BE = 1 << 0
PAGE_SIZE_FIELD = {1: "4K", 2: "16K", 3: "64K"}  # flags bits 1-2; 0 = unspecified
FLAG_PHYS_ANYWHERE = 1 << 3


@dataclass(frozen=True)
class ImageHeader:
    text_offset: int
    image_size: int  # the kernel's footprint in memory, BSS included
    flags: int

    @property
    def page_size(self) -> str | None:
        return PAGE_SIZE_FIELD.get((self.flags >> 1) & 3)


@dataclass
class LinuxLayout:
    """Where the loader put everything (guest-physical addresses)."""

    entry: int  # = kernel base
    kernel_end: int  # base + image_size
    fdt_addr: int
    fdt_max: int  # bytes reserved for the device tree at fdt_addr
    initrd: tuple[int, int] | None  # (start, end)


def read_image(path: Path) -> bytes:
    """The raw Image bytes of ``path``, inflated when it is gzip'd."""
    path = Path(path)
    with kernel_file_errors(path):
        data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageError(f"{path}: a gzip file that does not inflate ({e})") from None
    return data


def parse_header(data: bytes, path: str | Path = "image", file_size: int | None = None) -> ImageHeader:
    """Check that ``data`` (the Image, or its start when ``file_size`` gives
    the whole size) is an arm64 Image this loader can boot; the error names
    the field that is wrong."""
    size = len(data) if file_size is None else file_size
    if len(data) < HEADER_SIZE:
        raise ImageError(f"{path}: {len(data)} bytes is too short for an arm64 Image (the header is 64 bytes)")
    if data[MAGIC_OFFSET:MAGIC_OFFSET + 4] != MAGIC:
        hint = " (an x86 bzImage: use --arch x86_64)" if data[0x202:0x206] == b"HdrS" else ""
        raise ImageError(f"{path}: not an arm64 Linux Image (magic at 0x38 is "
                         f"{data[MAGIC_OFFSET:MAGIC_OFFSET + 4]!r}, expected b'ARM\\x64'){hint}")
    text_offset, image_size, flags = struct.unpack_from("<QQQ", data, 8)
    if flags & FLAG_BE:
        raise ImageError(f"{path}: header flags {flags:#x}: a big-endian kernel (bit 0); vmscope boots little-endian ones")
    if image_size == 0:
        text_offset = OLD_TEXT_OFFSET
    elif image_size < size - 4096:
        raise ImageError(f"{path}: header image_size {image_size:#x} is smaller than the file ({size:#x} bytes)")
    if text_offset % PAGE or text_offset >= ALIGN_2M:
        raise ImageError(f"{path}: header text_offset {text_offset:#x} is not a page-aligned offset below 2 MiB")
    return ImageHeader(text_offset, image_size or size + (16 << 20), flags)


def load_image(path: Path, ram, initrd: Path | None = None) -> LinuxLayout:
    """Put the Image and the initrd into ``ram`` (a
    :class:`vmscope.devices.ram.GuestRam` whose base is 2 MiB aligned) and
    reserve the device tree's place; the device tree itself is written by
    the caller at ``fdt_addr``."""
    path = Path(path)
    raw = _raw_size(path)
    if raw is None:  # gzip'd: inflate in memory
        data = read_image(path)
        hdr, size = parse_header(data, path), len(data)
    else:
        data, size = None, raw
        with open(path, "rb") as f:
            hdr = parse_header(f.read(HEADER_SIZE), path, file_size=size)
    if ram.base % ALIGN_2M:
        raise ValueError(f"RAM base {ram.base:#x} is not 2 MiB aligned")
    base = ram.base + hdr.text_offset
    kernel_end = base + hdr.image_size
    fdt_addr = (ram.end - FDT_MAX) & ~(PAGE - 1)
    if kernel_end + (32 << 20) > fdt_addr:
        raise ImageError(f"{path}: the kernel needs {hdr.image_size >> 20} MiB (header image_size) plus room "
                         f"to run; guest RAM is {ram.size >> 20} MiB: give the VM more memory (--mem)")
    if data is not None:
        ram.write(base, data)
    else:
        _read_into(path, ram, base, size)
    placed = None
    if initrd is not None:
        try:
            length = Path(initrd).stat().st_size
        except OSError as e:
            raise ImageError(f"{initrd}: cannot read initrd: {e.strerror}") from None
        # just below the device tree, page aligned: far from the kernel,
        # which grows into memory after image_size as it boots
        start = (fdt_addr - length) & ~(PAGE - 1)
        if start < kernel_end + (16 << 20):
            raise ImageError(f"{initrd}: initrd of {length >> 20} MiB does not fit above the kernel in "
                             f"{ram.size >> 20} MiB of guest RAM (--mem)")
        _read_into(Path(initrd), ram, start, length)
        placed = (start, start + length)
    return LinuxLayout(entry=base, kernel_end=kernel_end, fdt_addr=fdt_addr, fdt_max=ram.end - fdt_addr,
                       initrd=placed)


def _raw_size(path: Path) -> int | None:
    """The file's size when it is not gzip'd, None when it is."""
    with kernel_file_errors(path), open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return None
        return os.fstat(f.fileno()).st_size


def _read_into(path: Path, ram, addr: int, length: int) -> None:
    """Read the file straight into guest RAM (no intermediate copy: in the
    nested lab, where L1 runs under TCG, each copy of a 30 MiB kernel costs
    seconds)."""
    off = addr - ram.base
    view = ram.view[off:off + length]
    try:
        with open(path, "rb") as f:
            got = f.readinto(view)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        view.release()
    if got != length:
        raise ImageError(f"{path}: read {got} of {length} bytes")


def is_arm64_image(head: bytes) -> bool:
    """Does this file start like an arm64 Image, or a gzip (which only
    inflating tells)?"""
    return head[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC or head[:2] == b"\x1f\x8b"
