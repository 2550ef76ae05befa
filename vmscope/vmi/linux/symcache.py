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

CACHE_VERSION = 1


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
    return Kallsyms([Symbol(*s) for s in symbols]), btf_blob


def store_cached(key: str, symbols: Kallsyms, btf_blob: bytes) -> None:
    import os
    import pickle

    try:
        path = _cache_file(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump((CACHE_VERSION, [tuple(s) for s in symbols.symbols], btf_blob), f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed
