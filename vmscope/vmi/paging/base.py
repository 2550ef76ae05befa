"""What every page-table walker shares: the result type, the cache of
translations keyed by page-table root, and entry reads through it."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmscope.vmi.memory import PhysicalMemory

_U64 = struct.Struct("<Q")
# Tags that keep large-page keys apart from 4 KiB page numbers (< 2**52).
_LARGE_2M = 1 << 62
_LARGE_1G = 1 << 63


@dataclass(frozen=True)
class Page:
    """One mapped page: ``size`` bytes at virtual ``vbase`` backed by physical
    ``pbase``, with the effective permissions of the whole walk (a page is
    writable only if every level allows it, non-executable if any level says
    so)."""

    vbase: int
    pbase: int
    size: int
    writable: bool
    user: bool
    nx: bool
    level: str  # the table whose entry mapped the page: "PT", "PD", "L3"...


@dataclass(frozen=True)
class Translation:
    """A virtual address and where it lands."""

    vaddr: int
    paddr: int
    page: Page

    @property
    def page_size(self) -> int:
        return self.page.size


class TranslationCache:
    """Translations and page-table entries, per page-table root.

    Guest page tables change only while the guest runs, so a stopped guest
    can be walked once per page; whoever resumes the guest calls
    :meth:`invalidate` (the client does so on every continue and step).
    """

    def __init__(self) -> None:
        self._pages: dict[int, dict[int, Page]] = {}
        self._tables: dict[int, bytes] = {}
        #: walker-specific shortcuts (e.g. the PD table of each 1 GiB), dropped with the rest
        self.upper: dict = {}
        self.hits = 0
        self.misses = 0
        self._unkept_reads = False  # an entry was read without keeping its table page (still_valid)

    def pages(self, root: int) -> dict[int, Page]:
        return self._pages.setdefault(root, {})

    def entry(self, phys: PhysicalMemory, addr: int) -> int:
        """The 8-byte entry at physical ``addr``. The whole 4 KiB table page
        is read and kept: neighbouring entries are what the next walks need,
        and over RSP one 4 KiB read costs about what one 8-byte read does."""
        base = addr & ~0xFFF
        table = self._tables.get(base)
        if table is None:
            try:
                table = self._tables[base] = phys.read(base, 0x1000)
            except Exception:
                self._unkept_reads = True
                return _U64.unpack(phys.read(addr, 8))[0]  # a table at the edge of RAM
        return _U64.unpack_from(table, addr - base)[0]

    #: still_valid compares at most this many table pages (then a new walk is cheaper)
    MAX_CHECKED_TABLES = 32

    def still_valid(self, phys: PhysicalMemory) -> bool:
        """Whether every page-table page the cached walks read holds the
        same bytes in ``phys`` now. A translation is a function of its root
        and of those entries alone, so then every cached one still holds,
        even after the guest ran: a debugger stopping a guest again and
        again mostly finds its page tables as they were (accessed and dirty
        bits are set once), and comparing a few 4 KiB pages costs less than
        one walk. False when an entry was read without its page being kept."""
        if self._unkept_reads or len(self._tables) > self.MAX_CHECKED_TABLES:
            return False
        try:
            return all(phys.read(base, 0x1000) == table for base, table in self._tables.items())
        except Exception:
            return False

    def invalidate(self) -> None:
        self._unkept_reads = False
        self._pages.clear()
        self._tables.clear()
        self.upper.clear()


class Walker:
    """A page-table walker bound to one set of roots.

    Subclasses implement :meth:`_walk` (va -> :class:`Page` or raise
    :class:`~vmscope.vmi.errors.TranslationError`); this class adds the
    cache lookup, keyed at 4 KiB granularity so pages of any size hit.
    """

    root_key: int = 0

    def __init__(self, phys: PhysicalMemory, cache: TranslationCache | None = None):
        self.phys = phys
        self.cache = cache if cache is not None else TranslationCache()

    def _entry(self, addr: int) -> int:
        return self.cache.entry(self.phys, addr)

    def _walk(self, vaddr: int) -> Page:
        raise NotImplementedError

    def page(self, vaddr: int) -> Page:
        pages = self.cache.pages(self.root_key)
        page = pages.get(vaddr >> 12)
        if page is None:
            # A large page is also filed under its own size, so one walk
            # serves every 4 KiB inside it (the direct map uses 1 GiB pages).
            page = pages.get((vaddr >> 21) | _LARGE_2M) or pages.get((vaddr >> 30) | _LARGE_1G)
        if page is None:
            self.cache.misses += 1
            page = self._walk(vaddr)
            if page.size == 1 << 21:
                pages[(vaddr >> 21) | _LARGE_2M] = page
            elif page.size >= 1 << 30:
                pages[(vaddr >> 30) | _LARGE_1G] = page
            else:
                pages[vaddr >> 12] = page
        else:
            self.cache.hits += 1
        return page

    def translate(self, vaddr: int) -> Translation:
        page = self.page(vaddr)
        return Translation(vaddr, page.pbase + (vaddr - page.vbase), page)
