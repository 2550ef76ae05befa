"""The kernel inside a bzImage, decompressed on the host and cached.

Why: a bzImage is a small decompressor with the real kernel (``vmlinux``,
an ELF, followed by its relocation table) compressed inside it. Under a
nested KVM the decompressor's run (decompress ~50 MB, copy, relocate, with
a page fault and exit at each new page) was 1.7 s of a 6.6 s boot. The host
decompresses once per bzImage build (LZ4 in C, 0.2 s here), keeps the
result in the cache, and the VMM loads the ELF's segments itself
(:mod:`vmscope.kvm.boot.vmlinux`).

Where the payload is: the setup header's ``payload_offset`` and
``payload_length`` (boot protocol 2.08+), relative to the protected-mode
code. Its first bytes say how it is compressed. The kernel's build appends
the uncompressed size as 4 little-endian bytes after every format but
gzip's (``size_append`` in scripts/Makefile.lib); it is checked here.

LZ4 is the kernel's *legacy* LZ4 format (``lz4 -l``): magic 0x184C2102,
then blocks, each after a 4-byte compressed length, 8 MiB uncompressed each
but the last (lib/decompress_unlz4.c). gzip, xz, lzma and bzip2 come from
the standard library, zstd from the ``zstandard`` package when installed.
A format that cannot be decoded here raises :class:`PayloadUnsupported`,
and the caller boots through the kernel's own decompressor.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

HDR_VERSION = 0x206
HDR_SETUP_SECTS = 0x1F1
HDR_PAYLOAD_OFFSET = 0x248
HDR_PAYLOAD_LENGTH = 0x24C
PROTOCOL_WITH_PAYLOAD = 0x0208

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20

#: leading bytes -> format name (arch/x86/boot/compressed/Makefile's choices)
MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),
)

#: bump when the cached files' layout changes (2: the ELF is written sparse)
CACHE_VERSION = 2

#: the unit in which the cached ELF's zero runs become holes (a page)
HOLE_GRAIN = 4096


class PayloadUnsupported(Exception):
    """This bzImage's payload cannot be decompressed on the host; the
    message says why (the kernel's own decompressor can still boot it)."""


@dataclass(frozen=True)
class Payload:
    """The compressed kernel inside a bzImage."""

    fmt: str
    data: bytes


def find_payload(image: bytes) -> Payload:
    """The compressed payload of a bzImage and its format."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise PayloadUnsupported("not a bzImage")
    (version,) = struct.unpack_from("<H", image, HDR_VERSION)
    if version < PROTOCOL_WITH_PAYLOAD:
        raise PayloadUnsupported(f"boot protocol {version >> 8}.{version & 0xFF:02d} has no payload_offset (2.08+)")
    setup_size = ((image[HDR_SETUP_SECTS] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", image, HDR_PAYLOAD_OFFSET)
    start = setup_size + offset
    if length < 8 or start + length > len(image):
        raise PayloadUnsupported(f"payload_offset {offset:#x} + payload_length {length:#x} lie outside the file")
    data = image[start : start + length]
    for magic, fmt in MAGICS:
        if data.startswith(magic):
            return Payload(fmt, data)
    raise PayloadUnsupported(f"unknown compression (payload starts with {data[:6].hex()})")


def _appended_size(data: bytes) -> int:
    (size,) = struct.unpack_from("<I", data, len(data) - 4)
    return size


def _lz4_legacy(data: bytes) -> bytes:
    try:
        import lz4.block
    except ImportError:
        raise PayloadUnsupported("LZ4 needs the lz4 package (pip install lz4)") from None
    expected = _appended_size(data)
    end = len(data) - 4  # the size the kernel's build appended
    pos, out, total = 0, [], 0
    while pos + 4 <= end:
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if n == LZ4_LEGACY_MAGIC:  # a stream, or another one concatenated
            continue
        if pos + n > end:
            raise PayloadUnsupported(f"LZ4 block of {n} bytes at {pos - 4:#x} runs past the payload's end")
        try:
            block = lz4.block.decompress(data[pos : pos + n], uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise PayloadUnsupported(f"LZ4 block at {pos - 4:#x}: {e}") from None
        out.append(block)
        total += len(block)
        pos += n
    if total != expected:
        raise PayloadUnsupported(f"LZ4 payload decoded to {total} bytes, the image says {expected}")
    return b"".join(out)


def _stream(decompressor, data: bytes, fmt: str) -> bytes:
    try:
        out = decompressor.decompress(data)
    except Exception as e:  # zlib.error, lzma.LZMAError, OSError, zstandard.ZstdError: each library its own
        raise PayloadUnsupported(f"{fmt} payload: {e}") from None
    if not decompressor.eof:
        raise PayloadUnsupported(f"{fmt} payload is truncated")
    return out


def decompress(payload: Payload) -> bytes:
    """The uncompressed payload (vmlinux + relocations), checked against
    the size the build recorded."""
    fmt, data = payload.fmt, payload.data
    if fmt == "lz4":
        return _lz4_legacy(data)
    if fmt == "gzip":
        import zlib

        return _stream(zlib.decompressobj(wbits=31), data, fmt)  # gzip's own ISIZE: no size appended
    if fmt in ("xz", "lzma"):
        import lzma

        out = _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE), data, fmt)
    elif fmt == "bzip2":
        import bz2

        out = _stream(bz2.BZ2Decompressor(), data, fmt)
    elif fmt == "zstd":
        try:
            import zstandard
        except ImportError:
            raise PayloadUnsupported("zstd needs the zstandard package (pip install zstandard)") from None
        out = _stream(zstandard.ZstdDecompressor().decompressobj(), data, fmt)
    else:
        raise PayloadUnsupported(f"{fmt} is not decoded on the host")
    if len(out) != _appended_size(data):
        raise PayloadUnsupported(f"{fmt} payload decoded to {len(out)} bytes, the image says {_appended_size(data)}")
    return out


def image_key(image: bytes) -> str:
    """The cache key of a bzImage: its content's hash."""
    import hashlib

    return hashlib.sha256(image).hexdigest()[:32]


def _stat_memo(path: Path, d: Path) -> tuple[Path, str, str | None]:
    """The memo of a file's content hash, found by its path, size,
    modification time and inode: hashing 14 MB took 0.25 s in the nested
    lab, at every boot. The memo's name is a CRC of that identity (no
    hashlib import on the fast path), its first line the identity itself.
    Returns (memo file, identity, hash or None)."""
    import zlib

    st = os.stat(path)
    ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}"
    memo = d / f"stat-{zlib.crc32(ident.encode()):08x}"
    try:
        known, _, key = memo.read_text().partition("\n")
    except (OSError, UnicodeDecodeError):
        return memo, ident, None
    return memo, ident, (key.strip() or None) if known == ident else None


def _write_atomically(target: Path, blob: bytes | str) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    if isinstance(blob, str):
        tmp.write_text(blob)
    else:
        tmp.write_bytes(blob)
    os.replace(tmp, target)


def _write_sparse_atomically(target: Path, blob: bytes) -> None:
    """Write ``blob`` with its all-zero pages left as holes. Why: a third of
    a kernel's loaded image is zeros (.bss, .brk and .init.scratch are
    stored in the decompressed ELF), and guest RAM starts zeroed, so the
    loader copies only the data extents (:func:`data_extents`): 15 of
    44 MB fewer bytes to copy for Debian's 6.1 kernel, which in the nested
    lab's emulated L1 is 0.3-1.3 s per boot. A file system without holes
    just stores the zeros."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    zero = bytes(HOLE_GRAIN)
    view = memoryview(blob)
    with open(tmp, "wb") as f:
        run = None  # start of the current run of non-zero pages
        for at in range(0, len(blob), HOLE_GRAIN):
            is_zero = view[at : at + HOLE_GRAIN] == zero[: min(HOLE_GRAIN, len(blob) - at)]
            if is_zero and run is not None:
                os.pwrite(f.fileno(), view[run:at], run)
                run = None
            elif not is_zero and run is None:
                run = at
        if run is not None:
            os.pwrite(f.fileno(), view[run:], run)
        f.truncate(len(blob))
    os.replace(tmp, target)


def data_extents(fd: int, start: int, end: int):
    """The ``(offset, end)`` parts of ``[start, end)`` of the file ``fd``
    that hold data (``SEEK_DATA``/``SEEK_HOLE``): the rest reads as zeros.
    The whole range when the file system cannot say."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from pos to the end of the file
                return
            yield pos, end  # SEEK_DATA unsupported here
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def cached_vmlinux(path: Path) -> tuple[Path, Path, bool]:
    """The decompressed vmlinux ELF and its relocation table of the bzImage
    at ``path``, as files in the cache (``vmlinux/<hash>.elf`` and
    ``.relocs``, the hash being the bzImage's), made on first use.

    Returns (elf path, relocs path, whether they came from the cache).
    Raises :class:`PayloadUnsupported` when the payload cannot be
    decompressed here.
    """
    from vmscope.images.cache import cache_dir
    from vmscope.kvm.boot.relocs import split_relocs

    d = cache_dir("vmlinux")
    memo, ident, key = _stat_memo(Path(path), d)
    image = None
    if key is None:
        image = Path(path).read_bytes()
        key = image_key(image)
    stem = d / f"{key}-v{CACHE_VERSION}"
    elf, rel = stem.with_suffix(".elf"), stem.with_suffix(".relocs")
    if elf.exists() and rel.exists():
        if image is not None:
            _write_atomically(memo, f"{ident}\n{key}")
        return elf, rel, True
    if image is None:
        image = Path(path).read_bytes()
        key = image_key(image)  # the memo may be stale: the content decides
        stem = d / f"{key}-v{CACHE_VERSION}"
        elf, rel = stem.with_suffix(".elf"), stem.with_suffix(".relocs")
    raw = decompress(find_payload(image))
    if raw[:4] != b"\x7fELF":
        raise PayloadUnsupported("the decompressed payload is not an ELF file")
    body, relocs = split_relocs(raw)
    _write_atomically(rel, relocs)
    _write_sparse_atomically(elf, body)  # the ELF last: its presence says both are complete
    _write_atomically(memo, f"{ident}\n{key}")
    return elf, rel, False
