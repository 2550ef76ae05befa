"""The dispatcher over the image formats the KVM VMM boots (PVH ELF, bzImage).

The loaders return a :class:`BootPlan` (defined with the PVH loader in
``vmscope.devices.pvh``, which the emulated CPU shares); neither imports
this module, so the dispatcher can import both at the top.
"""

from __future__ import annotations

from pathlib import Path

from vmscope.devices.pvh import BootPlan, load_pvh
from vmscope.devices.ram import GuestRam
from vmscope.kvm.boot.linux import load_bzimage
from vmscope.machine import ImageError, kernel_file_errors

__all__ = ["BootPlan", "load_kernel"]


def _is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x206 and head[0x202:0x206] == b"HdrS"


#: how a bzImage boots: "direct" (the VMM decompresses, places and relocates
#: the kernel and enters startup_64: vmscope.kvm.boot.vmlinux) or
#: "decompressor" (the kernel's own, from its 32-bit entry)
BOOT_METHODS = ("direct", "decompressor")


def load_kernel(path: Path, mem: GuestRam, cmdline: str = "", initrd: Path | None = None,
                boot: str = "decompressor") -> BootPlan:
    """Load ``path`` into ``mem`` with the loader its format needs.

    ``boot`` chooses how a bzImage boots (:data:`BOOT_METHODS`); "direct"
    falls back to the decompressor, with a log line, for a payload the host
    cannot decompress.

    Raises :class:`ImageError` naming the file and the problem.
    """
    path = Path(path)
    with kernel_file_errors(path), open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise ImageError(f"{path}: empty file")
    if head[:4] == b"\x7fELF":
        return load_pvh(path, mem, cmdline, initrd)
    if _is_bzimage(head):
        if boot not in BOOT_METHODS:
            raise ValueError(f"boot must be one of {', '.join(BOOT_METHODS)}, not {boot!r}")
        if boot == "direct":
            from vmscope.kvm.boot.vmlinux import load_bzimage_direct

            plan = load_bzimage_direct(path, mem, cmdline, initrd)
            if plan is not None:
                return plan
        return load_bzimage(path, mem, cmdline, initrd)
    raise ImageError(
        f"{path}: not an ELF file (starts with {head[:4].hex()}) nor a Linux bzImage; "
        "expected an ELF kernel with a PVH entry note or a bzImage"
    )
