"""A per-kernel cache of decoded kallsyms and BTF."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.vmi.address_space import AddressSpace
from vmscope.vmi.errors import VmiError
from vmscope.vmi.linux.kallsyms import Kallsyms, Symbol

if TYPE_CHECKING:
    from vmscope.vmi.linux.kaslr import KernelLocation

# ---------------------------------------------------------------- disk cache
#
# Decoding kallsyms and BTF costs a fraction of a second of CPU (and, over
# RSP, reading ~20 MiB of kernel image); both depend only on the kernel
# build and its KASLR placement. The first 64 KiB of relocated kernel text
# at its virtual address identify both, so they key a cache of the results.

CACHE_VERSION = 2  # 2: the kernel build's fingerprint is kept too


def image_key(boot: AddressSpace, loc: KernelLocation) -> str | None:
    import hashlib

    try:
        head = boot.read(loc.text, 64 << 10)
    except VmiError:
        return None
    return hashlib.sha256(head + loc.text.to_bytes(8, "little") + bytes([CACHE_VERSION])).hexdigest()[:32]


def _cache_file(key: str):
    from vmscope.images.cache import cache_dir

    return cache_dir("kernels") / f"{key}.pickle"


def load_cached(key: str):
    import pickle

    try:
        with open(_cache_file(key), "rb") as f:
            version, symbols, btf_blob = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
        return None
    if version != CACHE_VERSION:
        return None
    symbols, fingerprint = symbols
    return Kallsyms([Symbol(*s) for s in symbols], fingerprint), btf_blob


def store_cached(key: str, symbols: Kallsyms, btf_blob: bytes) -> None:
    import os
    import pickle

    try:
        path = _cache_file(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump((CACHE_VERSION, ([tuple(s) for s in symbols.symbols], symbols.fingerprint), btf_blob), f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed


# ---------------------------------------------------------------- per kernel build
#
# The image key above changes with every KASLR placement. What a GDB stub
# needs at every boot of the same kernel (the decoded kallsyms and the
# symbol file made from them) depends only on the build: keyed by the
# kallsyms tables themselves (``kallsyms.CachedKallsyms``), kept in
# memory and on disk, slid to each boot's placement on load.

BUILD_CACHE_VERSION = 1


class BuildCache:
    """Decoded kallsyms (a :class:`~vmscope.vmi.linux.kallsyms.KallsymsCache`)
    and symbol files per kernel build, in memory and under the cache
    directory. A read-only or missing cache directory only costs speed."""

    def __init__(self, disk: bool = True) -> None:
        self.disk = disk
        self._kallsyms: dict[str, object] = {}
        self._elves: dict[str, tuple[int, bytes]] = {}
        self._btf: dict[str, bytes] = {}

    def _path(self, key: str, kind: str):
        from vmscope.images.cache import cache_dir

        return cache_dir("kernel-builds") / f"{key}.{kind}"

    def _load(self, fingerprint: str, kind: str):
        import pickle

        if not self.disk:
            return None
        try:
            with open(self._path(fingerprint, kind), "rb") as f:
                version, value = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError):
            return None
        return value if version == BUILD_CACHE_VERSION else None

    def _store(self, fingerprint: str, kind: str, value) -> None:
        import os
        import pickle

        if not self.disk:
            return
        try:
            path = self._path(fingerprint, kind)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump((BUILD_CACHE_VERSION, value), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except OSError:
            pass

    # kallsyms.KallsymsCache
    def get(self, fingerprint: str):
        from vmscope.vmi.linux.kallsyms import CachedKallsyms

        if fingerprint not in self._kallsyms:
            value = self._load(fingerprint, "kallsyms")
            if value is None:
                return None
            self._kallsyms[fingerprint] = CachedKallsyms(*value)
        return self._kallsyms[fingerprint]

    def put(self, fingerprint: str, entry) -> None:
        self._kallsyms[fingerprint] = entry
        self._store(fingerprint, "kallsyms", tuple(entry))

    def btf(self, build: str) -> bytes | None:
        """The BTF blob of a kernel build seen before."""
        if build not in self._btf:
            value = self._load(build, "btf")
            if value is None:
                return None
            self._btf[build] = value
        return self._btf[build]

    def put_btf(self, build: str, blob: bytes) -> None:
        self._btf[build] = blob
        self._store(build, "btf", blob)

    def export(self, include_disk: bool = False) -> dict:
        """Everything held in memory (and, with ``include_disk``, every
        kallsyms and BTF entry under the cache directory), to install in
        another process (:meth:`install`): how a fleet's workers, maybe on
        other hosts, get the symbols and types of the builds already known."""
        if include_disk and self.disk:
            from vmscope.images.cache import cache_dir

            for path in cache_dir("kernel-builds").glob("*.kallsyms"):
                self.get(path.stem)
            for path in cache_dir("kernel-builds").glob("*.btf"):
                self.btf(path.stem)
        return {"kallsyms": dict(self._kallsyms), "btf": dict(self._btf), "elves": dict(self._elves)}

    def install(self, exported: dict) -> int:
        """Take entries made by :meth:`export`; returns how many were new."""
        new = 0
        for kind, mine in (("kallsyms", self._kallsyms), ("btf", self._btf), ("elves", self._elves)):
            for key, value in exported.get(kind, {}).items():
                new += key not in mine
                mine.setdefault(key, value)
        return new

    def symbol_file(self, symbols: Kallsyms, machine: str) -> bytes:
        """The GDB symbol file for ``symbols``: made once per build, then
        slid to each placement (milliseconds instead of a rebuild)."""
        from vmscope.vmi.linux.symfile import slide_symbol_elf, symbol_elf

        fp = symbols.fingerprint
        anchor = symbols["_text"] if "_text" in symbols else None
        if fp is None or anchor is None:
            return symbol_elf(symbols.symbols, machine)
        key = f"{fp}-{machine}"
        cached = self._elves.get(key) or self._load(key, "elf")
        if cached is not None:
            built_at, elf = cached
            self._elves[key] = cached
            return elf if built_at == anchor else slide_symbol_elf(elf, anchor - built_at)
        elf = symbol_elf(symbols.symbols, machine)
        self._elves[key] = (anchor, elf)
        self._store(key, "elf", (anchor, elf))
        return elf


#: one per process: every KVM target and inspector of the same kernel build shares it
BUILD_CACHE = BuildCache()
