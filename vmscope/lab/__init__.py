"""The nested KVM test lab: real ``/dev/kvm`` inside QEMU's emulator.

>>> from vmscope.lab import Lab
>>> with Lab(forward=[5555]) as lab:                       # doctest: +SKIP
...     print(lab.run("python3 -c 'import vmscope'").returncode)

See docs/lab.md. :mod:`vmscope.lab.image` builds the L1 initramfs, :mod:`vmscope.lab.process`
is the host side of the agent protocol,
:mod:`vmscope.lab.agent` runs inside L1, :mod:`vmscope.lab.cli` is
``vmscope lab``.
"""

from vmscope.lab.lab import Lab, LabError, LabProcess, LabResult, LabTimeout

__all__ = ["Lab", "LabError", "LabProcess", "LabResult", "LabTimeout"]


def main(argv: list[str] | None = None) -> int:
    """``vmscope lab ...``: see :mod:`vmscope.lab.cli`."""
    from vmscope.lab.cli import main as cli_main

    return cli_main(argv)


__all__.append("main")
