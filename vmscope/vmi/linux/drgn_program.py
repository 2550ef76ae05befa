"""A drgn ``Program`` over the same guest memory, for drgn's helpers.

drgn (>= 0.0.30) can debug "a Linux kernel via a custom memory transport":
``Program.set_linux_kernel_custom(vmcoreinfo)`` plus physical memory
segments whose reads we serve. The vmcoreinfo comes from the guest itself
(the kernel keeps it at ``vmcoreinfo_data``), the symbols from our kallsyms
decoding; types need debug info (``vmlinux`` with DWARF), which drgn loads
with ``prog.load_debug_info([path])`` if you have it. drgn is optional:
``pip install drgn``.
"""

from __future__ import annotations

from vmscope.vmi.errors import VmiError


def guest_vmcoreinfo(kernel) -> bytes:
    """The VMCOREINFO text the guest kernel prepared for crash dumps."""
    try:
        data = kernel.u64(kernel.symbols["vmcoreinfo_data"])
        size = kernel.u64(kernel.symbols["vmcoreinfo_size"])
    except KeyError as e:
        raise VmiError(f"the guest kernel has no vmcoreinfo ({e}); it needs CONFIG_CRASH_CORE") from None
    if not data or not 0 < size <= 1 << 20:
        raise VmiError(f"the guest's vmcoreinfo is not set up (data=0x{data:x}, size={size})")
    return kernel.read(data, size)


def drgn_program(kernel, vmlinux: str | None = None):
    """A live ``drgn.Program`` reading guest memory through ``kernel.phys``,
    with kallsyms symbols registered (and ``vmlinux`` debug info if given)."""
    try:
        import drgn
    except ImportError:
        raise VmiError("drgn is not installed (pip install drgn)") from None
    prog = drgn.Program(drgn.Platform(drgn.Architecture.X86_64,
                                      drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN))
    phys = kernel.phys

    def read(address: int, count: int, offset: int, physical: bool) -> bytes:
        return phys.read(address, count)

    for start, size in _ram_ranges(phys):
        prog.add_memory_segment(start, size, read, physical=True)
    prog.set_linux_kernel_custom(guest_vmcoreinfo(kernel), True)
    prog.register_symbol_finder("vmscope-kallsyms", _symbol_index(drgn, kernel.symbols), enable_index=0)
    if vmlinux:
        prog.load_debug_info([vmlinux])
    return prog


def _ram_ranges(phys) -> list[tuple[int, int]]:
    regions = getattr(phys, "regions", None)
    if regions:
        return [(r.gpa, r.size) for r in regions]
    size = getattr(phys, "size", None)
    return [(getattr(phys, "base", 0), size if size else 1 << 46)]


def _symbol_index(drgn, kallsyms):
    syms = []
    ordered = kallsyms._sorted
    for i, s in enumerate(ordered):
        nxt = ordered[i + 1].address if i + 1 < len(ordered) else s.address
        kind = drgn.SymbolKind.FUNC if s.type in "Tt" else drgn.SymbolKind.OBJECT
        binding = drgn.SymbolBinding.GLOBAL if s.type.isupper() else drgn.SymbolBinding.LOCAL
        syms.append(drgn.Symbol(s.name, s.address, max(0, min(nxt - s.address, 1 << 32)), binding, kind))
    return drgn.SymbolIndex(syms)
