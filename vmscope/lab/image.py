"""The lab's L1 initramfs: everything a test needs inside the nested KVM guest.

Two cpio archives, concatenated (Linux unpacks each in turn):

- the *base*, large and rarely changing: busybox, Debian's kernel modules for
  KVM and virtio-net, the host's Debian ``python3.11`` with the shared
  libraries it loads, vmscope's runtime dependencies copied from the host
  environment, and the L2 Linux guest images. Cached by fingerprint.
- the *source*, small and changing with every edit: the ``vmscope`` package
  of the checkout under test (plus ``tests/`` and ``bench/`` when present),
  so commands in the lab run the code being tested.

The base is stored uncompressed: QEMU loads the initrd from the host at
memory speed, while gunzip under TCG emulation would cost seconds per boot.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from vmscope.images.cache import cache_dir
from vmscope.images.initramfs import Initramfs, InitramfsError, shared_libraries
from vmscope.images.debian import host_arch
from vmscope.images.kernel import KernelPackage, cloud_kernel
from vmscope.images.linux import add_busybox, add_modules, build_linux_guest, foreign_busybox
from vmscope.lab import foreign

AGENT_PORT = 7100
READY_MARKER = "vmscope-lab-ready"
KVM_MARKER = "vmscope-lab-kvm"
# The lab's fixed places inside L1.
SRC_DIR = "/opt/vmscope/src"
SITE_DIR = "/opt/vmscope/site"
GUESTS_DIR = "/opt/vmscope/guests"
DEFAULT_PYTHON = "/usr/bin/python3.11"
# Distributions the lab carries by default (their requirements come along).
RUNTIME_DISTS = ("rich", "pyelftools", "capstone", "unicorn", "qemu.qmp", "lz4", "pylibfdt")
L1_MODULES = {
    "amd64": ("irqbypass", "kvm", "kvm_amd", "virtio_pci", "virtio_net"),
    "arm64": ("virtio_pci", "virtio_net"),  # KVM is built into Debian's arm64 kernel
}
# Parts of the standard library no lab command needs; config-* alone is 25 MB.
_STDLIB_SKIP = re.compile(r"^(test|idlelib|tkinter|turtledemo|lib2to3|ensurepip|pydoc_data|"
                          r"config-[^/]*|site-packages|dist-packages)(/|$)")

INIT_SCRIPT = f"""#!/bin/sh
# vmscope lab L1 init: kernel file systems, KVM and virtio-net modules, a
# static network address for QEMU user networking, then the command agent.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
for m in $(cat /etc/vmscope/modules); do
    insmod "/lib/modules/$(uname -r)/$m.ko" || echo "vmscope-lab: insmod $m failed"
done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "nameserver 10.0.2.3" > /etc/resolv.conf
if [ -c /dev/kvm ]; then echo "{KVM_MARKER} yes"; else echo "{KVM_MARKER} no"; fi
. /etc/vmscope/env
cd {SRC_DIR}
python3 {SRC_DIR}/vmscope/lab/agent.py --port {AGENT_PORT} --ready-marker {READY_MARKER} \\
    </dev/null >/dev/console 2>&1 &
while true; do
    setsid cttyhack sh -l
done
"""


class LabImageError(Exception):
    """Something the lab image needs is missing on the host."""


def _dist_requirements(dist: importlib.metadata.Distribution) -> list[str]:
    """Names of the requirements that apply here (environment markers are
    evaluated for this Python, which is the one L1 runs; extras are off)."""
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(req.name)
    return names


def distributions_closure(names: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` and everything they require."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise LabImageError(f"the lab needs Python package {name!r}, which is not installed "
                                f"here (pip install {name})") from None
        seen[key] = dist
        todo.extend(_dist_requirements(dist))
    return list(seen.values())


def add_distribution(image: Initramfs, dist: importlib.metadata.Distribution, dest: str) -> None:
    """Copy one installed distribution (its top-level packages, modules and
    ``.dist-info``) from the host's site-packages to ``dest``."""
    site = Path(dist.locate_file(""))
    tops: set[str] = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if not parts or parts[0] == ".." or parts[0].endswith(".pth"):
            continue
        tops.add(parts[0])
    libs: set[str] = set()
    for top in sorted(tops):
        src = site / top
        if src.is_dir():
            image.add_tree(f"{dest}/{top}", src)
            for so in src.rglob("*.so*"):
                if so.is_file() and not so.is_symlink():
                    libs.update(shared_libraries(so))
        elif src.is_file():
            image.add_file(f"{dest}/{top}", src)
    # Native libraries bundled in wheels (libunicorn, libcapstone) load
    # system libraries the Python executable itself does not.
    for lib in sorted(libs):
        image.add_file(lib, lib)


def add_python(image: Initramfs, python: str = DEFAULT_PYTHON) -> None:
    """The host's Debian Python, its standard library, its extension modules
    and every shared library ``ldd`` lists for them, at their host paths."""
    exe = Path(python)
    if not exe.exists():
        raise LabImageError(f"{python} is missing; the lab runs Debian's python3.11 "
                            f"(apt-get install python3.11)")
    version = re.search(r"python(\d+\.\d+)", exe.resolve().name)
    if not version:
        raise LabImageError(f"cannot tell the Python version of {python}")
    ver = version.group(1)
    stdlib = Path(f"/usr/lib/python{ver}")
    image.add_host_binary(exe.resolve(), f"/usr/bin/python{ver}")
    image.add_symlink("/usr/bin/python3", f"python{ver}")
    image.add_symlink("/usr/bin/python", f"python{ver}")
    image.add_tree(str(stdlib), stdlib, exclude=lambda rel: bool(_STDLIB_SKIP.match(rel)))
    libs: set[str] = set()
    for so in sorted((stdlib / "lib-dynload").glob("*.so")):
        libs.update(shared_libraries(so))
    for lib in sorted(libs):
        image.add_file(lib, lib)


def add_foreign_wheel(image: Initramfs, dist: importlib.metadata.Distribution, arch: str) -> None:
    """A package with native code, from its wheel for ``arch``, plus the
    system libraries its shared objects load."""
    root = foreign.wheel_dir(dist, arch)
    triplet, _ = foreign.ARCHES[arch]
    roots = foreign.RootSet(foreign.fetch_packages(foreign.PYTHON_PACKAGES, arch))
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            image.add_tree(f"{SITE_DIR}/{entry.name}", entry)
        else:
            image.add_file(f"{SITE_DIR}/{entry.name}", entry)
    for so in root.rglob("*.so*"):
        if not so.is_file() or so.is_symlink():
            continue
        bundled = {p.name for p in so.parent.iterdir()}
        needed, _ = foreign.elf_needed(so)
        for soname in needed:
            if soname in bundled:
                continue
            for d in (f"/lib/{triplet}", f"/usr/lib/{triplet}"):
                if roots.find(f"{d}/{soname}"):
                    missing = foreign.add_elf(image, roots, f"{d}/{soname}", triplet)
                    if missing:
                        raise LabImageError(f"{so.name} for {arch} needs {missing}")
                    break
            else:
                raise LabImageError(f"{so.name} for {arch} needs {soname}, which no package provided")


@dataclasses.dataclass
class LabImage:
    """Paths of a built lab image."""

    kernel: KernelPackage
    base: Path
    source: Path
    modules: list[str]

    @property
    def vmlinuz(self) -> Path:
        return self.kernel.vmlinuz

    def combined(self, dest: Path) -> Path:
        """Write base + source into one initrd file (QEMU takes one)."""
        tmp = dest.with_name(f".{dest.name}.tmp")
        with open(tmp, "wb") as out:
            for part in (self.base, self.source):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp, dest)
        return dest


def checkout_root() -> Path:
    """The directory holding the ``vmscope`` package being run."""
    import vmscope
    return Path(vmscope.__file__).resolve().parent.parent


def base_image(kernel: KernelPackage, python: str = DEFAULT_PYTHON,
               dists: Sequence[str] = RUNTIME_DISTS, modules: Sequence[str] | None = None,
               quiet: bool = True) -> tuple[Initramfs, list[str]]:
    """The recipe of the base archive and the module load order."""
    arch = kernel.package.arch
    if modules is None:
        if arch not in L1_MODULES:
            raise LabImageError(f"no lab module list for architecture {arch!r}")
        modules = L1_MODULES[arch]
    image = Initramfs()
    native = arch == host_arch()
    busybox = None if native else foreign_busybox(arch, quiet)
    add_busybox(image, busybox)
    order = add_modules(image, kernel, modules)
    if native:
        add_python(image, python)
    else:
        foreign.add_foreign_python(image, arch, quiet)
    for dist in distributions_closure(dists):
        if native or not foreign.has_native_code(dist):
            add_distribution(image, dist, SITE_DIR)
        elif (built := foreign.debian_build_dir(dist, arch)) is not None:
            image.add_tree(SITE_DIR, built)  # self-contained (libfdt compiled in)
        else:
            add_foreign_wheel(image, dist, arch)
    guest = build_linux_guest(kernel=kernel, quiet=quiet, busybox=busybox)
    image.add_file(f"{GUESTS_DIR}/linux/vmlinuz", guest.vmlinuz)
    image.add_file(f"{GUESTS_DIR}/linux/initramfs.cpio.gz", guest.initramfs)
    workload = build_linux_guest(kernel=kernel, mode="workload", quiet=quiet, busybox=busybox)
    image.add_file(f"{GUESTS_DIR}/linux/initramfs-workload.cpio.gz", workload.initramfs)
    image.add_bytes("/init", INIT_SCRIPT, mode=0o755)
    image.add_bytes("/etc/vmscope/modules", "".join(f"{m}\n" for m in order))
    image.add_bytes("/etc/vmscope/env", "".join(f"export {k}={v}\n" for k, v in {
        "PYTHONPATH": f"{SRC_DIR}:{SITE_DIR}",
        "HOME": "/root",
        "VMSCOPE_LAB": "1",
        "VMSCOPE_CACHE": "/tmp/vmscope-cache",
        "VMSCOPE_LAB_GUESTS": GUESTS_DIR,
        "TERM": "linux",
    }.items()))
    image.add_bytes("/etc/hostname", "vmscope-lab\n")
    return image, order


def _add_extra_files(image: Initramfs, extra_files: Mapping[str, str | os.PathLike | bytes]) -> None:
    for dest, src in extra_files.items():
        if isinstance(src, bytes):
            image.add_bytes(dest, src)
        elif Path(src).is_dir():
            image.add_tree(dest, src)
        else:
            image.add_file(dest, src)


def source_image(root: Path | None = None,
                 extra_files: Mapping[str, str | os.PathLike | bytes] | None = None) -> Initramfs:
    """The checkout's vmscope package (and tests/, bench/ if present), plus
    ``extra_files`` (kept here, in the small archive, so adding a file does
    not rebuild the 140 MiB base)."""
    root = root or checkout_root()
    image = Initramfs()
    skip = lambda rel: rel.endswith((".egg-info",)) or "/.pytest_cache" in f"/{rel}" or "__pycache__" in rel
    image.add_tree(f"{SRC_DIR}/vmscope", root / "vmscope", exclude=skip)
    _add_bytecode(image, f"{SRC_DIR}/vmscope", root / "vmscope")
    for extra in ("tests", "bench", "pyproject.toml"):
        p = root / extra
        if p.is_dir():
            image.add_tree(f"{SRC_DIR}/{extra}", p, exclude=skip)
        elif p.is_file():
            image.add_file(f"{SRC_DIR}/{extra}", p)
    _add_extra_files(image, extra_files or {})
    return image


def _add_bytecode(image: Initramfs, dest: str, source: Path, python: str = DEFAULT_PYTHON) -> None:
    """Bytecode for the package, as an installed package has it: L1's
    ``/opt/vmscope/src`` is read-only to Python's cache, and compiling
    vmscope's modules at every start took 0.2-1 s of each ``vmscope run``
    there (TCG runs L1 slowly). Unchecked-hash .pyc files (valid whatever the
    file times) made by this interpreter, so only when it is the lab's
    Python version."""
    import importlib.util
    from importlib._bootstrap_external import _code_to_hash_pyc

    if f"python{sys.version_info[0]}.{sys.version_info[1]}" != os.path.basename(python):
        return
    tag = sys.implementation.cache_tag
    for py in sorted(source.rglob("*.py")):
        if "__pycache__" in py.parts:
            continue
        data = py.read_bytes()
        try:
            code = compile(data, f"{dest}/{py.relative_to(source).as_posix()}", "exec", dont_inherit=True)
        except SyntaxError:
            continue  # Python reports it when the module is imported
        rel = py.relative_to(source)
        pyc = _code_to_hash_pyc(code, importlib.util.source_hash(data), checked=False)
        image.add_bytes(f"{dest}/{rel.parent.as_posix()}/__pycache__/{py.stem}.{tag}.pyc".replace("/./", "/"),
                        bytes(pyc))


def build_lab_image(kernel: KernelPackage | None = None, python: str = DEFAULT_PYTHON,
                    dists: Sequence[str] = RUNTIME_DISTS, modules: Sequence[str] | None = None,
                    extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
                    source_root: Path | None = None, quiet: bool = True,
                    arch: str | None = None) -> LabImage:
    """Build (or reuse from the cache) both archives. ``arch`` is a Debian
    architecture (default: the host's); ``arm64`` gives an arm64 L1."""
    kernel = kernel or cloud_kernel(arch, quiet=quiet)
    base, order = base_image(kernel, python, dists, modules, quiet)
    lab_cache = cache_dir("lab")
    base_path = lab_cache / f"l1-base-{kernel.version}-{base.fingerprint()[:16]}.cpio"
    if not base_path.exists():
        _write(base, base_path, f"building the lab image {base_path.name}", quiet, compress=False)
    src = source_image(source_root, extra_files)
    src_path = lab_cache / f"l1-src-{src.fingerprint()[:16]}.cpio.gz"
    if not src_path.exists():
        _write(src, src_path, "packing the vmscope source", True, compress=True)
    for used in (base_path, src_path):
        os.utime(used)  # mtime = last use, for pruning
    prune(lab_cache, f"l1-base-{kernel.version}-*.cpio", keep=4)
    prune(lab_cache, "l1-src-*.cpio.gz", keep=20)
    return LabImage(kernel, base_path, src_path, order)


def prune(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently used files matching ``pattern``:
    every Python upgrade or source edit makes a new archive, and a base is
    about 140 MiB."""
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)


def _write(image: Initramfs, path: Path, label: str, quiet: bool, compress: bool) -> None:
    if quiet:
        image.write(path, compress=compress)
        return
    from rich.console import Console
    with Console(stderr=True).status(label):
        image.write(path, compress=compress)


__all__ = ["build_lab_image", "LabImage", "LabImageError", "InitramfsError", "AGENT_PORT",
           "READY_MARKER", "SRC_DIR", "SITE_DIR", "GUESTS_DIR"]
