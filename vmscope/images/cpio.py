"""Writing and reading cpio "newc" archives, the format Linux unpacks as an initramfs.

Written here in a few lines instead of shelling out to ``cpio`` because the
archive must hold entries the builder does not have on disk (device nodes,
files owned by root, generated scripts) and must be reproducible: entries are
written in sorted order with the inode numbers, owners and times we choose.
The reader exists so tests (and users) can check what an image contains.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import stat
from typing import BinaryIO, Iterable, Iterator

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    """One archive member: ``name`` is relative (no leading slash), ``mode``
    includes the file-type bits, ``data`` is the content (the link target for
    a symlink)."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(entry: CpioEntry, ino: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino, entry.mode, entry.uid, entry.gid, 1, entry.mtime, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )
    head = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return head + name + _pad4(_HEADER_LEN + len(name))


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO) -> None:
    """Write ``entries`` in the order given, then the trailer."""
    ino = 1
    for entry in entries:
        out.write(_header(entry, ino))
        out.write(entry.data)
        out.write(_pad4(len(entry.data)))
        ino += 1
    out.write(_header(CpioEntry(TRAILER, 0), 0))
    # Pad the archive to 512 bytes like GNU cpio; the kernel skips the zeros.
    pos = out.tell() if out.seekable() else None
    if pos is not None:
        out.write(b"\0" * (-pos % 512))


class CpioFormatError(ValueError):
    """The bytes are not a newc cpio archive (or are truncated)."""


def read_cpio(data: bytes) -> Iterator[CpioEntry]:
    """Yield the members of a newc archive (gzip-compressed or not), in order.

    Concatenated archives are read one after the other, as the kernel does.
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    pos = 0
    while pos < len(data):
        if data[pos:pos + 4] == b"\0\0\0\0":  # padding between archives
            pos += 4
            continue
        magic = data[pos:pos + 6]
        if magic != NEWC_MAGIC:
            raise CpioFormatError(f"bad cpio magic {magic!r} at offset {pos}")
        try:
            fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise CpioFormatError(f"bad cpio header at offset {pos}") from exc
        _ino, mode, uid, gid, _nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _chk = fields
        name_start = pos + _HEADER_LEN
        name = data[name_start:name_start + namesize - 1].decode()
        body = name_start + namesize
        body += -body % 4
        if body + size > len(data):
            raise CpioFormatError(f"cpio member {name!r} is truncated")
        content = data[body:body + size]
        pos = body + size
        pos += -pos % 4
        if name == TRAILER:
            continue
        yield CpioEntry(name, mode, content, uid, gid, mtime, rmaj, rmin)


def cpio_bytes(entries: Iterable[CpioEntry]) -> bytes:
    """Convenience: the archive as bytes."""
    buf = io.BytesIO()
    write_cpio(entries, buf)
    return buf.getvalue()
