"""Kernel symbols for GDB, whatever the architecture: the kernel's own
kallsyms decoded from guest RAM into an ELF symbol table that the KVM
targets serve on ``target:/vmscope/kallsyms.elf``.

Why apart from the targets: the x86 target (:mod:`vmscope.kvm.x86.linux_support`,
which finds the kernel through x86 page tables and catches its entry with
an MSR filter) and the arm64 target (:mod:`vmscope.kvm.arm64.linux_symbols`,
which knows where its own loader put the Image) differ only in how they
locate the image; decoding, the per-build cache
(:data:`vmscope.vmi.linux.symcache.BUILD_CACHE`) and the background thread
are the same.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from vmscope.gdbserver.target import TargetError

log = logging.getLogger(__name__)

KALLSYMS_FILE = "/vmscope/kallsyms.elf"
MAX_IMAGE = 1 << 30  # KERNEL_IMAGE_SIZE with KASLR


@dataclass(frozen=True)
class KernelImage:
    symbols: object  # vmscope.vmi.linux.kallsyms.Kallsyms
    text: int  # virtual _text
    end: int  # virtual end of the image (last symbol, rounded up)
    phys_text: int

    @property
    def slide(self) -> int:
        """KASLR slide against x86_64's default ``_text``."""
        from vmscope.vmi.linux.kaslr import DEFAULT_TEXT

        return self.text - DEFAULT_TEXT


def image_from(syms, phys_text: int, text: int | None = None) -> KernelImage:
    """A :class:`KernelImage` from decoded kallsyms; ``_text`` (and ``_end``)
    from the symbols when they have them."""
    if "_text" in syms:
        text = syms["_text"]
    if text is None:
        raise TargetError("kallsyms has no _text symbol: cannot place the kernel image")
    in_image = [s.address for s in syms.symbols if text <= s.address < text + MAX_IMAGE]
    end = (max(in_image) + 0x1000) & ~0xFFF if in_image else text + 0x200000
    if "_end" in syms and text < syms["_end"] <= text + MAX_IMAGE:
        end = syms["_end"]
    return KernelImage(syms, text, end, phys_text)


class SymbolBuild:
    """The kernel's symbols and GDB symbol file, made in a thread of their own.

    Why: GDB gives a ``vFile:open`` 2 s (``remotetimeout``); decoding ~90,000
    kallsyms names and writing the ELF is Python work that took 4 s in the
    nested lab (0.5 s on a host). Started as soon as a running kernel is
    seen, it is done long before anyone types ``add-symbol-file``, and a stop
    reported meanwhile does not wait for it. The image is read from physical
    memory (it is contiguous there), so the guest may run on, and its page
    tables may change, while the thread works.

    ``loc``: where the image is (a :class:`vmscope.vmi.linux.kaslr.KernelLocation`:
    ``phys_text``, virtual ``text`` and ``end``);
    ``machine``: the symbol file's ELF machine (``x86_64``, ``aarch64``).
    """

    def __init__(self, read, loc, machine: str = "x86_64") -> None:
        self._read, self._loc, self._machine = read, loc, machine
        self.image: KernelImage | None = None
        self.symbol_file: bytes | None = None
        self.error: str | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kernel-symbols", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from vmscope.vmi.errors import VmiError
        from vmscope.vmi.linux.derived_symbols import with_derived_symbols
        from vmscope.vmi.linux.kallsyms import scan_for_kallsyms
        from vmscope.vmi.linux.symcache import BUILD_CACHE

        t0 = time.monotonic()
        loc = self._loc
        try:
            syms = scan_for_kallsyms(self._read, loc.phys_text, loc.phys_text + (loc.end - loc.text),
                                     cache=BUILD_CACHE)
            # data symbols kallsyms lacks (Debian arm64: no KALLSYMS_ALL), from the code that uses them
            syms = with_derived_symbols(syms, lambda va, n: self._read(loc.phys_text + va - loc.text, n),
                                        self._machine)
            image = image_from(syms, loc.phys_text, loc.text)
            self.symbol_file = BUILD_CACHE.symbol_file(syms, self._machine)
            self.image = image  # last: an image is only ever seen with its symbol file
        except (VmiError, TargetError, ValueError, IndexError) as e:
            self.error = f"no kallsyms in the kernel image at physical {loc.phys_text:#x}: {e}"
        self.seconds = time.monotonic() - t0
        if self.image is None:
            log.info("kernel symbols: %s (after %.2f s in the background)", self.error, self.seconds)
        else:
            log.info("kernel symbols: %d symbols in %.2f s (background, %s)", len(self.image.symbols), self.seconds,
                     "a known kernel build: from the cache" if self.image.symbols.cached else "decoded")

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
