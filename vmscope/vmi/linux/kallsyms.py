"""Kernel symbols decoded from the kallsyms tables in guest memory.

No vmlinux or System.map is needed: every kernel built with
``CONFIG_KALLSYMS`` carries its compressed symbol table in ``.rodata``. The
tables (as ``scripts/kallsyms.c`` of Linux 5.x-6.1 lays them out, each
8-byte aligned) are::

    kallsyms_offsets        s32 per symbol (or kallsyms_addresses, u64)
    kallsyms_relative_base  u64
    kallsyms_num_syms       u32
    kallsyms_names          per symbol: length (1 byte, or 2 for >= 0x80),
                            then that many token indices
    kallsyms_markers        u32 (or u64): offset in names of every 256th symbol
    kallsyms_seqs_of_names  3 bytes per symbol (Linux 6.2+, and backported
                            to Debian's 6.1): symbol numbers sorted by name
    kallsyms_token_table    256 NUL-terminated strings
    kallsyms_token_index    256 u16: offset of each token in the table

We find the token table by its tell-tale run of single-digit tokens
("0\\0" ... "9\\0"), check it against the token index that follows it, find
the markers below it, then the start of the names by checking candidates
against ``num_syms`` and the last marker. The first character of each
decoded name is the ``nm`` type letter.
"""

from __future__ import annotations

import bisect
import re
import struct
from typing import Callable, Iterator, NamedTuple, Protocol

from vmscope.vmi.errors import VmiError

DIGITS = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"


class KallsymsNotFound(VmiError):
    """No consistent kallsyms tables in the memory searched."""


class Symbol(NamedTuple):
    name: str
    address: int
    type: str  # nm letter: T/t text, D/d data, B/b bss, R/r rodata, A...


def _align8(x: int) -> int:
    return (x + 7) & ~7


def _token_table_at(img: bytes, digits_pos: int) -> tuple[int, list[bytes], int] | None:
    """(table start, 256 tokens, index start) if ``digits_pos`` (where token
    0x30 "0" sits) belongs to a token table followed by its index.

    Walking forward from "0" over the 208 remaining tokens finds the table's
    end and so the index; the index entry for "0" then gives the table's
    start. (Walking backwards is unreliable: the table may directly follow
    data with no NUL before its first token.)"""
    pos = digits_pos
    for _ in range(256 - 0x30):
        end = img.find(b"\0", pos)
        if end <= pos:
            return None
        pos = end + 1
    index_start = _align8(pos)
    if index_start + 512 > len(img):
        return None
    index = struct.unpack_from("<256H", img, index_start)
    start = digits_pos - index[0x30]
    if start < 0 or index[0] != 0:
        return None
    tokens = []
    pos = start
    for i in range(256):
        if pos - start != index[i]:
            return None
        end = img.find(b"\0", pos)
        if end <= pos:
            return None
        tokens.append(img[pos:end])
        pos = end + 1
    return start, tokens, index_start


def _markers_below(img: bytes, table_start: int) -> tuple[int, list[int], int] | None:
    """(markers start, markers, element size) ending just below ``table_start``.

    Markers start at 0 and grow; we walk back from the table over zero
    padding, then over strictly decreasing values down to the leading 0."""
    for size, fmt in ((4, "<I"), (8, "<Q")):
        pos = table_start
        while pos >= size and struct.unpack_from(fmt, img, pos - size)[0] == 0 and table_start - pos < 8:
            pos -= size
        values = []
        prev = None
        while pos >= size:
            v = struct.unpack_from(fmt, img, pos - size)[0]
            if prev is not None and v >= prev:
                break
            values.append(v)
            pos -= size
            prev = v
            if v == 0:
                break
        if len(values) >= 2 and values[-1] == 0:
            values.reverse()
            return pos, values, size
    return None


def _markers_below_seqs(img: bytes, table_start: int) -> tuple[int, list[int], int] | None:
    """Markers separated from the token table by ``kallsyms_seqs_of_names``
    (3 bytes per symbol). Markers start with a zero u32 and increase; for
    each such run, its length fixes the symbol count N to 256 values, and
    the 3N bytes of seqs (plus up to 7 of padding) must fill the gap up to
    the token table exactly. Zero words are rare in that region, so we
    only try runs starting at one."""
    lowest = max(0, table_start - 3 * 2_000_000) & ~3
    pos = table_start
    while True:
        pos = img.rfind(b"\0\0\0\0", lowest, pos + 3)
        if pos < 0:
            return None
        if pos % 4:
            pos -= 1
            continue
        markers = [0]
        q = pos + 4
        while q + 4 <= table_start:
            v = struct.unpack_from("<I", img, q)[0]
            if v <= markers[-1] or v - markers[-1] > 256 * 300:
                break
            markers.append(v)
            q += 4
        count = len(markers)
        if count >= 2:
            # The run may swallow a few seqs bytes that happen to increase: try shorter runs too.
            for c in range(count, max(1, count - 3), -1):
                end = pos + 4 * c
                span = table_start - _align8(end)
                for pad in range(8):
                    n = (span - pad) / 3
                    if n == int(n) and (c - 1) * 256 < n <= c * 256:
                        return pos, markers[:c], 4
        pos -= 1


def _decode_names(img: bytes, pos: int, count: int, tokens: list[bytes]) -> tuple[list[bytes], int]:
    names = []
    for _ in range(count):
        n = img[pos]
        pos += 1
        if n & 0x80:  # "big" symbol: 2-byte length (Linux 6.1+)
            n = (n & 0x7F) | (img[pos] << 7)
            pos += 1
        names.append(b"".join(map(tokens.__getitem__, img[pos : pos + n])))
        pos += n
    return names, pos


class Kallsyms:
    """The decoded symbol table: lookups by name, by address, by pattern."""

    def __init__(self, symbols: list[Symbol], fingerprint: str | None = None, cached: bool = False):
        self.symbols = symbols
        #: the kernel build's identity, when decoded with a cache (keys its symbol file)
        self.fingerprint = fingerprint
        #: taken from the cache of an earlier decode of the same build
        self.cached = cached
        self._by_name: dict[str, Symbol] = {}
        for s in symbols:
            self._by_name.setdefault(s.name, s)
        self._sorted = sorted(symbols, key=lambda s: s.address)
        self._addrs = [s.address for s in self._sorted]

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> int:
        """Address of ``name``; KeyError names the symbol."""
        try:
            return self._by_name[name].address
        except KeyError:
            raise KeyError(f"kernel symbol {name!r} not in kallsyms") from None

    def get(self, name: str) -> Symbol | None:
        return self._by_name.get(name)

    def lookup(self, address: int) -> tuple[Symbol, int] | None:
        """(symbol, offset) containing ``address`` (nearest below)."""
        i = bisect.bisect_right(self._addrs, address) - 1
        return (self._sorted[i], address - self._addrs[i]) if i >= 0 else None

    def search(self, pattern: str) -> Iterator[Symbol]:
        """Symbols whose name matches a regular expression (or a glob, if
        the pattern contains ``*`` or ``?`` only)."""
        if re.fullmatch(r"[\w.*?]+", pattern) and ("*" in pattern or "?" in pattern):
            rx = re.compile("^" + re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".") + "$")
        else:
            rx = re.compile(pattern)
        return (s for s in self.symbols if rx.search(s.name))


class KallsymsCache(Protocol):
    """Where decoded tables of a kernel build are kept
    (:class:`vmscope.vmi.linux.symcache.BuildCache`)."""

    def get(self, key: str) -> "CachedKallsyms | None": ...

    def put(self, key: str, entry: "CachedKallsyms") -> None: ...


class CachedKallsyms(NamedTuple):
    """A kernel build's decoded symbols, how to recognise the build, and
    where to find the one relocated value (``kallsyms_relative_base``) that
    places them in another boot. Positions are relative to the token table."""

    names_at: int  # start of kallsyms_names (negative)
    names_digest: str  # of names .. token table: markers, seqs, names
    rel_base_at: int
    rel_base: int  # kallsyms_relative_base when decoded
    symbols: list[tuple[str, int, str]]


def _digest(data) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


def _from_cache(img: bytes, table_start: int, key: str, entry: CachedKallsyms) -> Kallsyms | None:
    """The cached symbols if ``img`` holds the same build, slid to its placement.

    The token table names the candidate build (its cache key); the digest
    of names, markers and seqs confirms it. None of those hold a pointer,
    so they are the same in every boot of one build whatever KASLR chose;
    ``kallsyms_relative_base`` is then the only value that moved."""
    names = table_start + entry.names_at
    pos = table_start + entry.rel_base_at
    if names < 0 or pos < 0 or _digest(memoryview(img)[names:table_start]) != entry.names_digest:
        return None
    slide = struct.unpack_from("<Q", img, pos)[0] - entry.rel_base
    mask = (1 << 64) - 1
    # symbols relative to the base move with it; absolute ones (per-CPU offsets) stay
    return Kallsyms([Symbol(n, (a + slide) & mask if a >= KERNEL_HALF else a, t) for n, a, t in entry.symbols],
                    f"{key}-{entry.names_digest[:16]}", cached=True)


KERNEL_HALF = 1 << 63


def parse_kallsyms(img: bytes, base: int, cache: KallsymsCache | None = None) -> Kallsyms:
    """Find and decode kallsyms in ``img``, a copy of memory at virtual ``base``
    (the kernel image). Raises :class:`KallsymsNotFound` if nothing fits.

    With a ``cache``, a kernel build decoded before (in any boot) costs a
    search and a hash instead of a decode of ~90,000 names."""
    start = 0
    reasons = []
    while True:
        hit = img.find(DIGITS, start)
        if hit < 0:
            break
        start = hit + 1
        table = _token_table_at(img, hit)
        if table is None:
            continue
        table_start, tokens, index_start = table
        key = None
        if cache is not None:
            key = _digest(memoryview(img)[table_start : index_start + 512])  # token table and index
            entry = cache.get(key)
            if entry is not None and (found := _from_cache(img, table_start, key, entry)) is not None:
                return found
        any_markers = False
        for find_markers in (_markers_below, _markers_below_seqs):  # the second only if the first fails
            markers = find_markers(img, table_start)
            if markers is None:
                continue
            any_markers = True
            decoded = _decode_at(img, base, tokens, *markers)
            if decoded is not None:
                syms, names_start = decoded
                rel_base = struct.unpack_from("<Q", img, names_start - 16)[0]
                if cache is None or rel_base == 0:
                    # rel_base 0: an arm64 Image before it relocated itself (linked with
                    # --no-apply-dynamic-relocs); its addresses are offsets, which the cache
                    # could not tell from absolute (per-CPU) ones when sliding them later
                    return Kallsyms(syms)
                entry = CachedKallsyms(names_start - table_start, _digest(memoryview(img)[names_start:table_start]),
                                       names_start - 16 - table_start, rel_base, [tuple(s) for s in syms])
                cache.put(key, entry)
                return Kallsyms(syms, f"{key}-{entry.names_digest[:16]}")
        reasons.append(f"token table at +0x{table_start:x}: " + ("no names/num_syms consistent with the markers"
                                                                   if any_markers else "without markers below it"))
    raise KallsymsNotFound("no kallsyms tables found in the kernel image" + (f" ({'; '.join(reasons)})" if reasons else ""))


def scan_for_kallsyms(read: Callable[[int, int], bytes], start: int, end: int, chunk: int = 2 << 20,
                      progress: Callable[[int, int], None] | None = None,
                      cache: KallsymsCache | None = None) -> Kallsyms:
    """Read ``[start, end)`` chunk by chunk with ``read(addr, n)`` until
    kallsyms decodes: the tables sit in ``.rodata``, so most of a kernel
    image (and ``.bss`` after it) is never read. Works on virtual or
    physical addresses alike (symbol addresses come from the tables)."""
    buf = bytearray()
    pos = start
    err: Exception | None = None
    while pos < end:
        n = min(chunk, end - pos)
        data = read(pos, n)
        buf += data
        pos += n
        if progress:
            progress(pos - start, end - start)
        if DIGITS in buf[-n - len(DIGITS):] or pos >= end:
            if pos < end:  # the token table may sit right at a chunk end: read one more
                more = read(pos, min(chunk, end - pos))
                buf += more
                pos += len(more)
            try:
                return parse_kallsyms(bytes(buf), start, cache)
            except KallsymsNotFound as e:
                err = e
    raise KallsymsNotFound(f"kallsyms not found in 0x{start:x}-0x{end:x}: {err or 'no token table'}")


def _decode_at(img: bytes, base: int, tokens: list[bytes], markers_start: int, markers: list[int],
               msize: int) -> tuple[list[Symbol], int] | None:
    """(symbols, start of kallsyms_names) if the names below the markers
    decode consistently."""
    last = markers[-1]
    full = (len(markers) - 1) * 256
    # names end at markers_start (minus up to 7 bytes of padding); the last
    # marker's symbol starts `last` bytes after the names start.
    lowest = max(8, markers_start - last - 256 * 300)
    cand = (markers_start - last) & ~7
    while cand >= lowest:
        num = struct.unpack_from("<I", img, cand - 8)[0]
        if full < num <= full + 256:
            try:
                _, end = _decode_names(img, cand + last, num - full, tokens)
            except IndexError:
                end = -1
            if markers_start - 8 < end <= markers_start:
                syms = _symbols(img, base, tokens, cand, num, markers, msize)
                return None if syms is None else (syms, cand)
        cand -= 8
    return None


def _symbols(img: bytes, base: int, tokens: list[bytes], names_start: int, num: int, markers: list[int],
             msize: int) -> list[Symbol] | None:
    names, _ = _decode_names(img, names_start, num, tokens)
    rel_base = struct.unpack_from("<Q", img, names_start - 16)[0]
    offsets_start = names_start - 16 - _align8(4 * num)
    if offsets_start < 0:
        return None
    offsets = struct.unpack_from(f"<{num}i", img, offsets_start)
    return symbols_from(names, offsets, rel_base)


def symbols_from(names: list[bytes], offsets, rel_base: int) -> list[Symbol]:
    """Symbols from decoded names (type letter first) and their raw
    ``kallsyms_offsets``. One decode of all names and C-level loops: this
    runs for 90,000 symbols while GDB waits for the symbol file."""
    negative = sum(1 for o in offsets if o < 0)
    if negative > len(offsets) // 2:  # CONFIG_KALLSYMS_ABSOLUTE_PERCPU
        addrs = [off if off >= 0 else rel_base - 1 - off for off in offsets]
    else:
        addrs = [rel_base + (off & 0xFFFFFFFF) for off in offsets]
    text = b"\n".join(names).decode("ascii", "replace").split("\n")
    return list(map(Symbol, [t[1:] for t in text], addrs, [t[:1] for t in text]))


def load_system_map(path: str, text: int) -> Kallsyms:
    """Symbols from a System.map, slid so that ``_text`` lands at ``text``."""
    syms = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                try:
                    syms.append(Symbol(parts[2], int(parts[0], 16), parts[1]))
                except ValueError:
                    continue
    named = {s.name: s for s in syms}
    if "_text" not in named:
        raise KallsymsNotFound(f"{path} has no _text symbol: not a System.map (Debian's package ships a placeholder)")
    slide = (text - named["_text"].address) & ((1 << 64) - 1)
    return Kallsyms([Symbol(s.name, (s.address + slide) & ((1 << 64) - 1) if s.type.upper() != "A" else s.address,
                            s.type) for s in syms])
