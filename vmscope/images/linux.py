"""A small Linux guest for vmscope's VMM and tests: Debian's cloud kernel and
a busybox initramfs.

The ``/init`` mounts proc, sysfs and devtmpfs, loads the chosen kernel modules,
prints ``vmscope-linux-ready`` on the console and then either starts a shell
(mode ``shell``) or runs a workload and powers off (mode ``workload``). The
mode baked into the image can be overridden per boot with ``vmscope.mode=``
on the kernel command line, and the fixed workload's length with
``vmscope.seconds=``.

Everything is cached: the kernel package by its version, each initramfs by a
fingerprint of what went into it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from vmscope.images.cache import cache_dir
from vmscope.images.debian import extract, host_arch, show
from vmscope.images.initramfs import Initramfs, InitramfsError
from vmscope.images.kernel import KernelPackage, cloud_kernel, module_bytes

READY_MARKER = "vmscope-linux-ready"
WORKLOAD_DONE_MARKER = "vmscope-workload-done"
POWEROFF_MARKER = "vmscope-poweroff"
MODES = ("shell", "workload")
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

INIT_SCRIPT = r"""#!/bin/sh
# vmscope guest init: mount the kernel's file systems, load modules, announce
# readiness on the console, then run a shell or the workload.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/vmscope/modules); do
    insmod "/lib/modules/$(uname -r)/$m.ko" || echo "vmscope: insmod $m failed"
done
mode=$(cat /etc/vmscope/mode)
seconds=$(cat /etc/vmscope/seconds)
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmscope.mode=*) mode="${arg#vmscope.mode=}" ;;
        vmscope.seconds=*) seconds="${arg#vmscope.seconds=}" ;;
    esac
done
export VMSCOPE_SECONDS="$seconds"
echo "vmscope-linux-ready"
if [ "$mode" = workload ]; then
    sh /etc/vmscope/workload
    echo "vmscope-workload-exit $?"
    echo "vmscope-poweroff"
    sync
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
fi
while true; do
    setsid cttyhack sh -l
done
"""

# A fixed, recognisable workload: a loop of file opens and small syscalls (so
# breakpoints on do_sys_openat2 hit), a named long sleeper (so a process list
# has something to find), then the process and module lists on the console.
FIXED_WORKLOAD = r"""#!/bin/sh
echo "vmscope-workload-start seconds=$VMSCOPE_SECONDS"
sleep 3600 &
sleeper=$!
end=$(( $(date +%s) + ${VMSCOPE_SECONDS:-5} ))
n=0
while [ "$(date +%s)" -lt "$end" ]; do
    cat /proc/version > /dev/null
    echo "$n" > /tmp/vmscope-workload
    ls /proc/self/fd > /dev/null
    rm -f /tmp/vmscope-workload
    n=$((n + 1))
done
echo "vmscope-workload-iterations $n"
echo "vmscope-ps-begin"
ps
echo "vmscope-ps-end"
echo "vmscope-modules-begin"
cat /proc/modules
echo "vmscope-modules-end"
kill "$sleeper"
echo "vmscope-workload-done"
"""


class GuestImageError(Exception):
    """The guest image cannot be built from what was asked."""


def find_busybox() -> Path:
    """The host's static busybox (package busybox-static)."""
    for candidate in BUSYBOX_CANDIDATES:
        p = Path(candidate)
        if p.exists():
            return p
    raise GuestImageError("busybox is not installed; install the busybox-static package")


def busybox_applets(busybox: Path) -> list[str]:
    """The applets ``busybox`` provides. A busybox for another architecture
    cannot run here; Debian builds busybox-static with the same applets on
    every architecture, so the host's list stands in for it."""
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    except OSError:  # Exec format error: a foreign busybox
        host = find_busybox()
        if host == busybox:
            raise GuestImageError(f"{busybox} cannot run here") from None
        return busybox_applets(host)
    if out.returncode != 0 or not out.stdout.strip():
        raise GuestImageError(f"{busybox} --list failed; is it a full busybox?")
    return [a for a in out.stdout.split() if a and a != "busybox"]


def _is_dynamic(path: Path) -> bool:
    """True for an ELF with a program interpreter (it needs shared libraries,
    which the guest image does not carry)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            return any(seg.header.p_type == "PT_INTERP" for seg in ELFFile(f).iter_segments())
    except ELFError:
        raise GuestImageError(f"{path} is not an ELF executable") from None


def add_busybox(image: Initramfs, busybox: Path | None = None) -> None:
    """Busybox at /bin/busybox and one symlink per applet in /bin, plus the
    device node the kernel needs before devtmpfs is mounted."""
    busybox = busybox or find_busybox()
    if _is_dynamic(busybox):
        raise GuestImageError(f"{busybox} is dynamically linked; install busybox-static")
    image.add_file("/bin/busybox", busybox, mode=0o755)
    for applet in busybox_applets(busybox):
        if f"/bin/{applet}" not in image:
            image.add_symlink(f"/bin/{applet}", "busybox")
    for d in ("/dev", "/proc", "/sys", "/tmp", "/run", "/root", "/etc", "/sbin", "/usr/bin"):
        image.add_dir(d)
    image.add_chardev("/dev/console", 5, 1)
    image.add_bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    image.add_bytes("/etc/group", "root:x:0:\n")


def add_modules(image: Initramfs, kernel: KernelPackage, names: Sequence[str]) -> list[str]:
    """Put ``names`` and their dependencies under /lib/modules/<version>/ as
    flat, uncompressed ``.ko`` files; returns the load order."""
    order = kernel.modules_in_load_order(list(names))
    for name in order:
        image.add_bytes(f"/lib/modules/{kernel.version}/{name}.ko",
                        module_bytes(kernel.module_path(name)))
    return order


def guest_initramfs(kernel: KernelPackage, mode: str = "shell", modules: Sequence[str] = (),
                    workload: str | None = None, files: Mapping[str, str | os.PathLike | bytes] | None = None,
                    seconds: int = 5, busybox: Path | None = None) -> Initramfs:
    """The guest's initramfs as a recipe (nothing is written yet).

    ``workload`` replaces the fixed workload script; ``files`` maps image
    paths to host paths or to bytes, added last so they can override anything.
    """
    if mode not in MODES:
        raise GuestImageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if seconds < 0:
        raise GuestImageError("workload seconds must not be negative")
    image = Initramfs()
    add_busybox(image, busybox)
    order = add_modules(image, kernel, modules)
    image.add_bytes("/init", INIT_SCRIPT, mode=0o755)
    image.add_bytes("/etc/vmscope/modules", "".join(f"{m}\n" for m in order))
    image.add_bytes("/etc/vmscope/mode", mode + "\n")
    image.add_bytes("/etc/vmscope/seconds", f"{seconds}\n")
    image.add_bytes("/etc/vmscope/workload", workload if workload is not None else FIXED_WORKLOAD,
                    mode=0o755)
    for dest, src in (files or {}).items():
        if isinstance(src, bytes):
            image.add_bytes(dest, src)
        elif Path(src).is_dir():
            image.add_tree(dest, src)
        else:
            image.add_file(dest, src)
    return image


def foreign_busybox(arch: str, quiet: bool = True) -> Path:
    """busybox from Debian's busybox-static package for ``arch``."""
    root = extract(show("busybox-static", arch), quiet)
    for candidate in BUSYBOX_CANDIDATES:
        if (root / candidate.lstrip("/")).exists():
            return root / candidate.lstrip("/")
    raise GuestImageError(f"busybox-static:{arch} holds no busybox binary")


@dataclasses.dataclass(frozen=True)
class LinuxGuest:
    """A built guest: the files and how to boot them."""

    vmlinuz: Path
    initramfs: Path
    kernel_version: str
    cmdline: str = DEFAULT_CMDLINE

    arch: str = "amd64"

    def qemu_argv(self, memory_mib: int = 512, accel: str = "tcg", extra_cmdline: str = "",
                  qemu: str | None = None) -> list[str]:
        """A QEMU command line that boots this guest with its console on stdio."""
        cmdline = f"{self.cmdline} {extra_cmdline}".strip()
        machine: list[str] = []
        if self.arch == "arm64":
            cmdline = cmdline.replace("console=ttyS0", "console=ttyAMA0")
            machine = ["-machine", "virt", "-cpu", "max"]
        qemu = qemu or ("qemu-system-aarch64" if self.arch == "arm64" else "qemu-system-x86_64")
        return [qemu, *machine, "-accel", accel, "-m", str(memory_mib), "-nodefaults",
                "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                "-kernel", str(self.vmlinuz), "-initrd", str(self.initramfs), "-append", cmdline]


def build_linux_guest(out_dir: str | os.PathLike | None = None, mode: str = "shell",
                      modules: Sequence[str] = (), workload: str | None = None,
                      files: Mapping[str, str | os.PathLike | bytes] | None = None,
                      seconds: int = 5, kernel: KernelPackage | None = None,
                      quiet: bool = False, arch: str | None = None,
                      busybox: Path | None = None) -> LinuxGuest:
    """Build (or fetch from the cache) the guest and, if ``out_dir`` is given,
    copy ``vmlinuz`` and ``initramfs.cpio.gz`` there.

    ``arch`` is a Debian architecture (``amd64``, ``arm64``; default: the
    host's); for a foreign one busybox comes from that architecture's
    busybox-static package."""
    kernel = kernel or cloud_kernel(arch, quiet=quiet)
    if busybox is None and kernel.package.arch != host_arch():
        busybox = foreign_busybox(kernel.package.arch, quiet)
    image = guest_initramfs(kernel, mode, modules, workload, files, seconds, busybox)
    cached = cache_dir("images") / f"linux-{kernel.version}-{image.fingerprint()[:16]}.cpio.gz"
    if not cached.exists():
        if quiet:
            image.write(cached)
        else:
            from rich.console import Console
            with Console(stderr=True).status(f"building {cached.name}"):
                image.write(cached)
    guest = LinuxGuest(kernel.vmlinuz, cached, kernel.version, arch=kernel.package.arch)
    if out_dir is None:
        return guest
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel.vmlinuz, out / "vmlinuz")
    shutil.copyfile(cached, out / "initramfs.cpio.gz")
    return LinuxGuest(out / "vmlinuz", out / "initramfs.cpio.gz", kernel.version,
                      arch=kernel.package.arch)


__all__ = ["LinuxGuest", "build_linux_guest", "guest_initramfs", "GuestImageError",
           "InitramfsError", "READY_MARKER", "WORKLOAD_DONE_MARKER", "MODES"]
