"""The arm64 Image loader on Debian's real arm64 kernel (from its package,
cached by vmscope.images) and on broken copies of its header; no KVM."""

from __future__ import annotations

import gzip
import re
import struct

import pytest

from vmscope.devices.ram import GuestRam
from vmscope.kvm.arm64 import image
from vmscope.machine import ImageError

RAM_BASE = 0x4000_0000


@pytest.fixture(scope="module")
def debian_image() -> bytes:
    """Debian's arm64 kernel as its package ships it (raw, or gzip'd on
    releases that compress it), inflated."""
    from vmscope.images.kernel import cloud_kernel

    path = cloud_kernel("arm64", quiet=True).vmlinuz
    return image.read_image(path)


@pytest.fixture
def ram():
    r = GuestRam(RAM_BASE, 256 << 20, name="test-arm64-image")
    yield r
    r.close()


def test_debian_kernel_header(debian_image):
    hdr = image.parse_header(debian_image, "vmlinuz")
    assert debian_image[0x38:0x3C] == b"ARM\x64"
    assert hdr.text_offset == 0  # 2 MiB-aligned placement, as every kernel since 5.8
    assert hdr.image_size > len(debian_image)  # BSS and friends come after the file's end
    assert hdr.page_size == "4K" and hdr.flags & image.FLAG_PHYS_ANYWHERE


def test_gzip_compressed_image_loads_like_the_raw_one(tmp_path, debian_image, ram):
    raw = tmp_path / "Image"
    raw.write_bytes(debian_image)
    gz = tmp_path / "vmlinuz"
    gz.write_bytes(gzip.compress(debian_image, compresslevel=1))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 100_000)

    layout = image.load_image(gz, ram, initrd)
    assert layout.entry == RAM_BASE and layout.entry % image.ALIGN_2M == 0
    assert ram.read(layout.entry, len(debian_image)) == debian_image
    start, end = layout.initrd
    assert end - start == 100_000 and start % 4096 == 0
    assert start >= layout.kernel_end and end <= layout.fdt_addr
    assert ram.read(start, end - start) == initrd.read_bytes()
    assert layout.fdt_addr + layout.fdt_max == ram.end and layout.fdt_max <= image.FDT_MAX
    assert image.load_image(raw, ram, initrd).entry == layout.entry


def _with(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data[:4096])
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:40], r"40 bytes is too short for an arm64 Image"),
    (lambda d: _with(d, 0x38, "<I", 0x12345678), re.escape(r"magic at 0x38 is b'xV4\x12', expected b'ARM\x64'")),
    (lambda d: _with(d, 24, "<Q", 0xB), r"header flags 0xb: a big-endian kernel \(bit 0\)"),
    (lambda d: _with(d, 8, "<Q", 0x1234), r"header text_offset 0x1234 is not a page-aligned offset"),
])
def test_broken_headers_name_the_field(debian_image, mutate, message):
    with pytest.raises(ImageError, match=message):
        image.parse_header(mutate(debian_image), "vmlinuz")


def test_image_size_smaller_than_the_file_is_refused(debian_image):
    bad = bytearray(debian_image)
    struct.pack_into("<Q", bad, 16, 0x10000)
    with pytest.raises(ImageError, match=r"header image_size 0x10000 is smaller than the file"):
        image.parse_header(bytes(bad), "vmlinuz")


def test_x86_bzimage_gets_a_hint(tmp_path):
    bz = bytearray(0x1000)
    bz[0x202:0x206] = b"HdrS"
    with pytest.raises(ImageError, match=r"not an arm64 Linux Image .*use --arch x86_64"):
        image.parse_header(bytes(bz), "bzImage")


def test_corrupt_gzip_and_missing_file(tmp_path):
    bad = tmp_path / "vmlinuz"
    bad.write_bytes(gzip.compress(bytes(range(256)) * 64)[:10] + b"\xff" * 64)
    with pytest.raises(ImageError, match=r"a gzip file that does not inflate"):
        image.read_image(bad)
    with pytest.raises(ImageError, match=r"no such file"):
        image.read_image(tmp_path / "absent")


def test_too_little_ram_says_so(tmp_path, debian_image):
    small = GuestRam(RAM_BASE, 32 << 20, name="test-arm64-small")
    try:
        k = tmp_path / "Image"
        k.write_bytes(debian_image)
        with pytest.raises(ImageError, match=r"give the VM more memory \(--mem\)"):
            image.load_image(k, small)
    finally:
        small.close()


def test_initrd_that_does_not_fit(tmp_path, debian_image, ram):
    k = tmp_path / "Image"
    k.write_bytes(debian_image)
    big = tmp_path / "initrd"
    big.write_bytes(b"\0" * (225 << 20))
    with pytest.raises(ImageError, match=r"initrd of 225 MiB does not fit above the kernel"):
        image.load_image(k, ram, big)
