"""Debian's cloud kernel, unpacked from its package: the ``vmlinuz``, the
kernel version string and the loadable modules with their dependencies.

Dependencies come from each module's own ``.modinfo`` section (the
``depends=`` field), read with pyelftools, so no ``depmod`` run is needed and
the answer is the same on any host.
"""

from __future__ import annotations

import dataclasses
import functools
import lzma
import re
from pathlib import Path

from vmscope.images import debian

# The meta package that always points at the current cloud kernel.
CLOUD_KERNEL_META = {"amd64": "linux-image-cloud-amd64", "arm64": "linux-image-arm64"}


class KernelError(Exception):
    """A kernel module or file is not in the kernel package."""


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    package: debian.PackageRef
    root: Path  # where the package is unpacked

    @property
    def version(self) -> str:
        """The kernel release (``uname -r``), e.g. ``6.1.0-56-cloud-amd64``."""
        return self.modules_dir.name

    @property
    def modules_dir(self) -> Path:
        dirs = sorted((self.root / "lib/modules").iterdir())
        if not dirs:
            raise KernelError(f"{self.package.name} has no lib/modules")
        return dirs[0]

    @property
    def vmlinuz(self) -> Path:
        for name in (f"boot/vmlinuz-{self.version}", f"boot/vmlinux-{self.version}"):
            if (self.root / name).exists():
                return self.root / name
        raise KernelError(f"{self.package.name} holds no boot/vmlinuz-{self.version}")

    @functools.cached_property
    def _modules(self) -> dict[str, Path]:
        return {_module_name(p): p for p in self.modules_dir.rglob("*.ko*")}

    def module_path(self, name: str) -> Path:
        key = name.removesuffix(".ko").replace("-", "_")
        try:
            return self._modules[key]
        except KeyError:
            raise KernelError(f"kernel {self.version} has no module {name!r} "
                              f"(it may be built in, or misspelt)") from None

    def module_depends(self, name: str) -> list[str]:
        """The modules ``name`` needs loaded first (its direct dependencies)."""
        from elftools.elf.elffile import ELFFile
        import io

        data = module_bytes(self.module_path(name))
        section = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
        if section is None:
            return []
        for field in section.data().split(b"\0"):
            if field.startswith(b"depends="):
                return [d for d in field[8:].decode().split(",") if d]
        return []

    def modules_in_load_order(self, names: list[str]) -> list[str]:
        """``names`` plus everything they depend on, dependencies first."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(n: str) -> None:
            key = n.removesuffix(".ko").replace("-", "_")
            if key in seen:
                return
            seen.add(key)
            for dep in self.module_depends(key):
                visit(dep)
            order.append(key)

        for n in names:
            visit(n)
        return order


def module_bytes(path: Path) -> bytes:
    """The module's ELF bytes, decompressed if the package compressed it
    (busybox ``insmod`` only takes plain ELF)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix in (".zst", ".gz"):
        raise KernelError(f"{path.name}: {path.suffix} modules are not supported yet")
    return data


def cloud_kernel(arch: str | None = None, quiet: bool = False) -> KernelPackage:
    """The current Debian cloud kernel for ``arch`` (default: the host's),
    downloaded and unpacked into the cache on first use."""
    arch = arch or debian.host_arch()
    meta = CLOUD_KERNEL_META.get(arch)
    if meta is None:
        raise KernelError(f"no Debian cloud kernel known for architecture {arch!r}")
    image = next((d for d in debian.depends(meta, arch) if re.match(r"linux-image-\d", d)), None)
    if image is None:
        raise KernelError(f"{meta} does not depend on a linux-image-<version> package")
    ref = debian.show(image, arch)
    return KernelPackage(ref, debian.extract(ref, quiet))
