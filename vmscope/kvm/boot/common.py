"""What a boot loader hands the VMM, and the dispatcher over image formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vmscope.kvm.memory import GuestMemory
from vmscope.machine import ImageError


@dataclass
class BootPlan:
    """How to start the vCPUs after the image is in guest memory.

    ``mode`` is ``"pvh32"``: 32-bit protected mode, flat segments, paging
    off, ``ebx = start_info``; or ``"linux32"``: the same, but ``esi =
    start_info`` (the Linux boot protocol's boot_params) and a PC platform
    around the vCPUs (``vmscope.kvm.boot.linux.attach_platform``). ``all_cpus_at_entry``: every vCPU starts at
    ``entry`` (vmscope's SMP convention for its demo guests); otherwise only
    vCPU 0 does and the others wait for INIT/SIPI.
    """

    entry: int
    start_info: int
    mode: str = "pvh32"
    all_cpus_at_entry: bool = False
    segments: list[tuple[int, int]] = field(default_factory=list)  # (paddr, memsz)
    #: initial rsp. PVH defines none, but guests often push before setting
    #: their own stack; Firecracker gives them 0x8ff0 too.
    boot_stack: int = 0x8FF0


def _is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x206 and head[0x202:0x206] == b"HdrS"


def load_kernel(path: Path, mem: GuestMemory, cmdline: str = "", initrd: Path | None = None) -> BootPlan:
    """Load ``path`` into ``mem`` with the loader its format needs.

    Raises :class:`ImageError` naming the file and the problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a kernel image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    if not head:
        raise ImageError(f"{path}: empty file")
    if head[:4] == b"\x7fELF":
        from vmscope.kvm.boot.pvh import load_pvh

        return load_pvh(path, mem, cmdline, initrd)
    if _is_bzimage(head):
        from vmscope.kvm.boot.linux import load_bzimage

        return load_bzimage(path, mem, cmdline, initrd)
    raise ImageError(
        f"{path}: not an ELF file (starts with {head[:4].hex()}) nor a Linux bzImage; "
        "expected an ELF kernel with a PVH entry note or a bzImage"
    )
