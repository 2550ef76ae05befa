"""Python for a lab of another architecture (an arm64 L1 on an x86_64 host).

The host's own Python cannot run there, so the interpreter, its standard
library and the shared libraries come from Debian's packages for the target
architecture (``apt-get download`` + ``dpkg-deb -x``; the architecture must
be enabled with ``dpkg --add-architecture``), and packages with native code
(unicorn, capstone) from their wheels for that platform (``pip download``).
Pure-Python packages are copied from the host as for a native lab.

``ldd`` cannot inspect foreign binaries, so shared-library dependencies are
found by reading each ELF's ``DT_NEEDED`` entries with pyelftools and looking
the names up in the unpacked packages.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterable

from vmscope.images import debian
from vmscope.images.cache import cache_dir
from vmscope.images.initramfs import Initramfs

# Debian arch -> (GNU triplet, pip platform tag)
ARCHES = {
    "arm64": ("aarch64-linux-gnu", "manylinux2014_aarch64"),
    "amd64": ("x86_64-linux-gnu", "manylinux2014_x86_64"),
}
# What Debian's python3.11 and its extension modules load. A package missing
# from the mirror is skipped; extension modules that then lack a library are
# left out (reported by ForeignPython.dropped).
PYTHON_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libffi8", "libssl3",
    "liblzma5", "libbz2-1.0", "libsqlite3-0", "libuuid1", "libncursesw6", "libtinfo6",
    "libreadline8", "libcrypt1",
)
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
               "pydoc_data", "site-packages", "dist-packages")


class ForeignError(Exception):
    """A package, wheel or library for the target architecture is missing."""


def elf_needed(path: Path) -> tuple[list[str], str | None]:
    """(DT_NEEDED names, PT_INTERP path) of an ELF file."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        needed: list[str] = []
        interp = None
        for seg in elf.iter_segments():
            if seg.header.p_type == "PT_INTERP":
                interp = seg.get_interp_name()
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                needed += [t.needed for t in sec.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
        return needed, interp


class RootSet:
    """Several unpacked packages seen as one file system."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = list(roots)

    def find(self, path: str) -> Path | None:
        """The host path of image path ``path``, following symlinks inside the roots."""
        for _ in range(16):
            for root in self.roots:
                p = root / path.lstrip("/")
                if p.is_symlink():
                    target = os.readlink(p)
                    path = target if target.startswith("/") else str(PurePosixPath(path).parent / target)
                    path = os.path.normpath(path)
                    break
                if p.exists():
                    return p
            else:
                return None
        return None


@dataclasses.dataclass
class ForeignPython:
    """What :func:`add_foreign_python` put in the image."""

    version: str
    dropped: list[str]


@functools.lru_cache(maxsize=8)
def _fetch(names: tuple[str, ...], arch: str, quiet: bool) -> tuple[Path, ...]:
    # apt-cache show fails as a whole when one name is unknown (libmpdec3 is
    # gone from Debian 12), so ask one by one only when the batch fails.
    refs = debian.show_many(list(names), arch)
    if not refs:
        for name in names:
            try:
                refs[name] = debian.show(name, arch)
            except debian.PackageError:
                pass
    return tuple(debian.extract(ref, quiet) for ref in refs.values())


def fetch_packages(names: Iterable[str], arch: str, quiet: bool = True) -> list[Path]:
    """Unpacked roots of those of ``names`` apt knows for ``arch`` (cached)."""
    return list(_fetch(tuple(names), arch, quiet))


def add_elf(image: Initramfs, roots: RootSet, image_path: str, triplet: str,
            extra_dirs: Iterable[str] = ()) -> list[str]:
    """Add the ELF at ``image_path`` and, recursively, the libraries it needs.
    Returns the sonames that were not found (nothing is added then)."""
    lib_dirs = [f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib", "/usr/lib", *extra_dirs]
    pending = [image_path]
    to_add: dict[str, Path] = {}
    missing: list[str] = []
    while pending:
        path = pending.pop()
        if path in to_add:
            continue
        host = roots.find(path)
        if host is None:
            missing.append(path)
            continue
        to_add[path] = host
        needed, interp = elf_needed(host)
        if interp and interp not in to_add:
            pending.append(interp)
        for soname in needed:
            found = next((f"{d}/{soname}" for d in lib_dirs if roots.find(f"{d}/{soname}")), None)
            if found is None:
                missing.append(soname)
            elif found not in to_add:
                pending.append(found)
    if missing:
        return missing
    for path, host in to_add.items():
        image.add_file(path, host)
    return []


def add_foreign_python(image: Initramfs, arch: str, quiet: bool = True) -> ForeignPython:
    """Debian's python3.11 for ``arch`` with its standard library."""
    if arch not in ARCHES:
        raise ForeignError(f"no lab Python for architecture {arch!r}")
    triplet, _ = ARCHES[arch]
    roots = RootSet(fetch_packages(PYTHON_PACKAGES, arch, quiet))
    exe = roots.find("/usr/bin/python3.11")
    if exe is None:
        raise ForeignError(f"python3.11-minimal:{arch} could not be fetched "
                           f"(dpkg --add-architecture {arch} && apt-get update)")
    missing = add_elf(image, roots, "/usr/bin/python3.11", triplet)
    if missing:
        raise ForeignError(f"python3.11 for {arch} needs libraries no package provided: {missing}")
    image.add_symlink("/usr/bin/python3", "python3.11")
    image.add_symlink("/usr/bin/python", "python3.11")
    dropped: list[str] = []
    for root in roots.roots:
        stdlib = root / "usr/lib/python3.11"
        if not stdlib.is_dir():
            continue

        def skip(rel: str) -> bool:
            top = rel.split("/", 1)[0]
            return top in STDLIB_SKIP or top.startswith("config-") or rel.endswith(".so") \
                or rel.startswith("lib-dynload/")

        image.add_tree("/usr/lib/python3.11", stdlib, exclude=skip)
        dynload = stdlib / "lib-dynload"
        for so in sorted(dynload.glob("*.so")) if dynload.is_dir() else []:
            if add_elf(image, roots, f"/usr/lib/python3.11/lib-dynload/{so.name}", triplet):
                dropped.append(so.name)
    return ForeignPython("3.11", dropped)


def wheel_dir(dist: importlib.metadata.Distribution, arch: str) -> Path:
    """The unpacked wheel of ``dist`` (same version as on the host) for ``arch``."""
    _, platform = ARCHES[arch]
    key = f"{dist.metadata['Name']}-{dist.version}-{platform}"
    dest = cache_dir("wheels") / key
    if (dest / ".vmscope-complete").exists():
        return dest
    dl = cache_dir("wheels") / "downloads"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", platform, "--python-version", "3.11", "--implementation", "cp",
           "--dest", str(dl), f"{dist.metadata['Name']}=={dist.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ForeignError(f"no {platform} wheel of {dist.metadata['Name']} {dist.version}: "
                           f"{proc.stderr.strip()[-500:]}")
    norm = dist.metadata["Name"].replace("-", "_").replace(".", "_").lower()
    wheels = [w for w in dl.glob("*.whl")
              if w.name.lower().startswith(f"{norm}-{dist.version}-") and platform.split("_", 1)[1] in w.name]
    if not wheels:
        raise ForeignError(f"pip download left no {platform} wheel of {dist.metadata['Name']}")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        for info in zf.infolist():
            zf.extract(info, tmp)
            mode = info.external_attr >> 16
            if mode:
                os.chmod(tmp / info.filename, mode & 0o777 | 0o600)
    (tmp / ".vmscope-complete").write_text(wheels[0].name + "\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process unpacked it first
        if not (dest / ".vmscope-complete").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


#: distributions with native code but no wheel for other platforms (an
#: sdist only, built on install), taken from Debian's build of the same
#: binding for the target architecture instead: same API, built for its python3.11
DEBIAN_BUILDS = {"pylibfdt": "python3-libfdt"}


def debian_build_dir(dist: importlib.metadata.Distribution, arch: str) -> Path | None:
    """The ``dist-packages`` directory of Debian's build of ``dist`` for
    ``arch``, or None when Debian has none listed here."""
    package = DEBIAN_BUILDS.get(dist.metadata["Name"])
    if package is None:
        return None
    roots = fetch_packages((package,), arch)
    if not roots:
        raise ForeignError(f"{dist.metadata['Name']} has no {arch} wheel and apt knows no {package}:{arch}")
    return roots[0] / "usr/lib/python3/dist-packages"


def has_native_code(dist: importlib.metadata.Distribution) -> bool:
    return any(str(f).endswith((".so",)) or ".so." in str(f) for f in dist.files or [])
