"""What ``vmscope run`` drives: a machine (KVM VMM or emulated CPU).

Both back ends (``vmscope.kvm`` and ``vmscope.emu``) take a
:class:`MachineConfig` and implement :class:`Machine`, so the CLI, the stub
and the tests treat them alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from vmscope.gdbserver.target import Target


class ImageError(Exception):
    """A kernel/initrd image that cannot be booted; the message names the
    file and what is wrong with it (one line, shown to the user as is)."""


@contextlib.contextmanager
def kernel_file_errors(path):
    """The OS errors of opening or reading a kernel or initrd file, as the
    ImageError that names the file and what is wrong with it."""
    try:
        yield
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a kernel image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None


class MachineUnavailable(Exception):
    """The back end cannot run here (no /dev/kvm, wrong host arch...)."""


@dataclass
class MachineConfig:
    """What to boot and on what.

    ``kernel=None`` boots the embedded demo guest of ``arch``.
    """

    arch: str = "x86_64"  # "x86_64" | "aarch64"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    mem_mib: int = 256
    cpus: int = 1
    #: where guest serial output goes (bytes); None = this process's stdout
    serial_out: BinaryIO | None = None
    #: file descriptor for serial input (the console), None = no input
    serial_in: int | None = None
    #: how the x86 KVM back end boots a bzImage: "decompressor" (the kernel's
    #: own, the boot every other VMM exercises) or "direct" (decompressed on
    #: the host, placed with KASLR, entered at startup_64)
    boot: str = "decompressor"
    extra: dict = field(default_factory=dict)


class Machine(Protocol):
    config: MachineConfig

    def start(self, paused: bool = False) -> None:
        """Create the vCPUs and start them; with ``paused`` no guest
        instruction runs until the debug target is resumed."""

    def debug_target(self) -> Target:
        """The Target the GDB stub drives (one per machine)."""

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status once the guest has ended (0 for a guest
        power-off or a debugger ``kill``), or None on timeout."""

    def shutdown(self) -> None:
        """Stop every vCPU and release resources; idempotent."""
