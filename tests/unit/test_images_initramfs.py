"""The initramfs builder: cpio newc bytes, entries, the guest's /init.

Archives are checked two ways: with our reader and with GNU cpio, the
independent implementation (the kernel's own unpacker is exercised by the
boot tests in tests/lab/).
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vmscope.images import debian
from vmscope.images.cpio import CpioEntry, CpioFormatError, cpio_bytes, read_cpio
from vmscope.images.initramfs import Initramfs, InitramfsError, shared_libraries
from vmscope.images.kernel import KernelPackage
from vmscope.images.linux import (FIXED_WORKLOAD, GuestImageError, INIT_SCRIPT, guest_initramfs)


def _entries(image: Initramfs, tmp_path: Path, compress: bool = True) -> dict[str, CpioEntry]:
    out = tmp_path / "image.cpio.gz"
    image.write(out, compress=compress)
    return {e.name: e for e in read_cpio(out.read_bytes())}


def test_cpio_round_trip_keeps_names_modes_data_and_devices():
    entries = [
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/tool", stat.S_IFREG | 0o755, b"\x7fELF..." * 3, mtime=1234),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"tool"),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
    ]
    data = cpio_bytes(entries)
    assert data.startswith(b"070701")
    assert len(data) % 512 == 0
    assert list(read_cpio(data)) == entries


def test_cpio_reader_rejects_garbage_and_truncation():
    with pytest.raises(CpioFormatError, match="bad cpio magic"):
        list(read_cpio(b"not a cpio archive at all"))
    data = cpio_bytes([CpioEntry("f", stat.S_IFREG | 0o644, b"x" * 100)])
    with pytest.raises(CpioFormatError, match="truncated"):
        list(read_cpio(data[:150]))


def test_gnu_cpio_extracts_our_archive(tmp_path):
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.fail("GNU cpio is not installed (apt-get install cpio)")
    src = tmp_path / "src.txt"
    src.write_text("from the host\n")
    image = Initramfs()
    image.add_bytes("/etc/motd", "hello\n")
    image.add_file("/opt/copy.txt", src, mode=0o600)
    image.add_symlink("/bin/sh", "busybox")
    image.add_bytes("/bin/busybox", b"#!fake\n", mode=0o755)
    archive = gzip.decompress(_write(image, tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    listing = subprocess.run([cpio, "-t"], input=archive, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names == ["bin", "bin/busybox", "bin/sh", "etc", "etc/motd", "opt", "opt/copy.txt"]
    subprocess.run([cpio, "-idm", "--no-absolute-filenames", "--quiet"], input=archive, cwd=out,
                   check=True, capture_output=True)
    assert (out / "etc/motd").read_text() == "hello\n"
    assert (out / "opt/copy.txt").read_text() == "from the host\n"
    assert stat.S_IMODE((out / "opt/copy.txt").stat().st_mode) == 0o600
    assert os.readlink(out / "bin/sh") == "busybox"
    assert os.access(out / "bin/busybox", os.X_OK)


def _write(image: Initramfs, tmp_path: Path) -> bytes:
    path = tmp_path / "a.cpio.gz"
    image.write(path)
    return path.read_bytes()


def test_parents_come_before_children_and_are_implicit(tmp_path):
    image = Initramfs()
    image.add_bytes("/a/b/c/file", "x")
    image.add_bytes("/a/z", "y")
    names = [e.name for e in read_cpio(_write(image, tmp_path))]
    assert names == ["a", "a/b", "a/b/c", "a/b/c/file", "a/z"]
    for i, name in enumerate(names):
        parent = name.rpartition("/")[0]
        assert not parent or parent in names[:i]


def test_host_file_keeps_mtime_so_pyc_stay_valid(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("x = 1\n")
    os.utime(src, (1_600_000_000, 1_600_000_000))
    image = Initramfs()
    image.add_file("/lib/mod.py", src)
    entry = _entries(image, tmp_path)["lib/mod.py"]
    assert entry.mtime == 1_600_000_000
    assert entry.data == b"x = 1\n"


def test_fingerprint_follows_the_recipe(tmp_path):
    src = tmp_path / "f"
    src.write_text("one")
    image = Initramfs()
    image.add_file("/f", src)
    first = image.fingerprint()
    assert image.fingerprint() == first
    src.write_text("two!")  # size and mtime change
    assert image.fingerprint() != first
    other = Initramfs()
    other.add_file("/g", src)
    assert other.fingerprint() != image.fingerprint()


def test_add_tree_keeps_symlinks_and_honours_exclude(tmp_path):
    root = tmp_path / "tree"
    (root / "pkg/__pycache__").mkdir(parents=True)
    (root / "pkg/a.py").write_text("a")
    (root / "pkg/__pycache__/a.cpython-311.pyc").write_bytes(b"pyc")
    (root / "skipme").mkdir()
    (root / "skipme/big").write_text("no")
    (root / "link").symlink_to("pkg/a.py")
    image = Initramfs()
    image.add_tree("/opt/t", root, exclude=lambda rel: rel == "skipme")
    entries = _entries(image, tmp_path)
    assert entries["opt/t/pkg/a.py"].data == b"a"
    assert entries["opt/t/pkg/__pycache__/a.cpython-311.pyc"].data == b"pyc"
    assert entries["opt/t/link"].is_symlink and entries["opt/t/link"].data == b"pkg/a.py"
    assert not any(n.startswith("opt/t/skipme") for n in entries)


def test_bad_paths_and_missing_files_say_what_is_wrong(tmp_path):
    image = Initramfs()
    with pytest.raises(InitramfsError, match=r"'\.\.'"):
        image.add_bytes("/etc/../../escape", "x")
    with pytest.raises(InitramfsError, match="nope.*missing"):
        image.add_file("/x", tmp_path / "nope")
    with pytest.raises(InitramfsError, match="not a directory"):
        image.add_tree("/x", tmp_path / "nope")


def test_shared_libraries_of_python_include_libc_and_the_loader():
    libs = shared_libraries("/usr/bin/python3.11")
    assert any(Path(l).name == "libc.so.6" for l in libs)
    assert any("ld-linux" in l for l in libs)
    assert shared_libraries("/bin/busybox") == []  # static


def _fake_kernel(tmp_path: Path) -> KernelPackage:
    (tmp_path / "kernel/lib/modules/6.1.0-test").mkdir(parents=True)
    ref = debian.PackageRef("linux-image-test", "1", "amd64")
    return KernelPackage(ref, tmp_path / "kernel")


def test_guest_initramfs_has_busybox_console_and_init(tmp_path):
    image = guest_initramfs(_fake_kernel(tmp_path))
    entries = _entries(image, tmp_path)
    init = entries["init"]
    assert init.is_file and init.mode & 0o111
    text = init.data.decode()
    assert text.startswith("#!/bin/sh")
    for must in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "vmscope-linux-ready",
                 "cttyhack sh", "poweroff -f", "insmod"):
        assert must in text
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert entries["bin/busybox"].is_file
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"busybox"
    assert entries["bin/cttyhack"].is_symlink and entries["bin/udhcpc"].is_symlink
    assert entries["etc/vmscope/mode"].data == b"shell\n"
    assert entries["etc/vmscope/modules"].data == b""
    assert entries["etc/vmscope/workload"].data.decode() == FIXED_WORKLOAD


def test_guest_workload_mode_custom_script_and_extra_files(tmp_path):
    extra = tmp_path / "data.bin"
    extra.write_bytes(b"\x00\x01")
    image = guest_initramfs(_fake_kernel(tmp_path), mode="workload", seconds=9,
                            workload="#!/bin/sh\necho custom\n",
                            files={"/opt/data.bin": extra, "/etc/note": b"hi"})
    entries = _entries(image, tmp_path)
    assert entries["etc/vmscope/mode"].data == b"workload\n"
    assert entries["etc/vmscope/seconds"].data == b"9\n"
    assert entries["etc/vmscope/workload"].data == b"#!/bin/sh\necho custom\n"
    assert entries["opt/data.bin"].data == b"\x00\x01"
    assert entries["etc/note"].data == b"hi"


def test_guest_rejects_unknown_mode(tmp_path):
    with pytest.raises(GuestImageError, match="unknown mode 'server'"):
        guest_initramfs(_fake_kernel(tmp_path), mode="server")


def test_init_script_is_valid_shell():
    for script in (INIT_SCRIPT, FIXED_WORKLOAD):
        proc = subprocess.run(["/bin/busybox", "sh", "-n"], input=script.encode(), capture_output=True)
        assert proc.returncode == 0, proc.stderr


def test_uncompressed_archive_reads_back(tmp_path):
    image = Initramfs()
    image.add_bytes("/hello", "world")
    entries = _entries(image, tmp_path, compress=False)
    assert entries["hello"].data == b"world"
