"""Errors raised by the introspection layers.

They carry the numbers a user needs (the address, the paging level, the
entry seen) so a message like "0xffff888000000000: not mapped at PD
(entry 0x0 at 0x1234000)" is enough to see what went wrong.
"""

from __future__ import annotations


class VmiError(Exception):
    """Base class for introspection failures."""


class PhysicalMemoryError(VmiError):
    """A physical range the source cannot provide (outside RAM, unreadable)."""

    def __init__(self, addr: int, size: int, reason: str = "not backed by this memory source"):
        super().__init__(f"physical 0x{addr:x}+{size}: {reason}")
        self.addr = addr
        self.size = size
        self.reason = reason


class TranslationError(VmiError):
    """A virtual address the page tables do not map.

    ``level`` names the table where the walk stopped (``PML4``, ``PD``,
    ``L2``...), ``entry`` is the raw entry found there and ``entry_addr``
    its physical address (``None`` when the walk failed before reading one,
    e.g. a non-canonical address).
    """

    def __init__(self, vaddr: int, level: str, reason: str, entry: int | None = None, entry_addr: int | None = None):
        where = f" (entry 0x{entry:x} at physical 0x{entry_addr:x})" if entry is not None and entry_addr is not None else ""
        super().__init__(f"virtual 0x{vaddr:x}: {reason} at {level}{where}")
        self.vaddr = vaddr
        self.level = level
        self.reason = reason
        self.entry = entry
        self.entry_addr = entry_addr
