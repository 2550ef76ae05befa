"""A running Linux kernel seen through its memory, without its vmlinux.

From a physical memory source and the CPU's page-table root this finds the
kernel image (the KASLR slide, :mod:`.kaslr`), decodes kallsyms, loads the
kernel's BTF, and switches to the kernel's own page tables
(``init_top_pgt``) so that reads work whichever process the CPU happened to
stop in. The OS objects live in small modules that take this object, as
drgn's helpers take a program: :mod:`.tasks`, :mod:`.modules`,
:mod:`.printk`, :mod:`.clock`.
"""

from __future__ import annotations

import struct
from typing import Callable

from vmscope.vmi.address_space import AddressSpace
from vmscope.vmi.errors import VmiError
from vmscope.vmi.errors import TranslationError
from vmscope.vmi.linux import clock, printk, symcache
from vmscope.vmi.linux import current as current_mod
from vmscope.vmi.linux import user as user_mod
from vmscope.vmi.linux import modules as modules_mod
from vmscope.vmi.linux import tasks as tasks_mod
from vmscope.vmi.linux.btf import ARRAY, ENUM, ENUM64, INT, PTR, Btf, BtfError
from vmscope.vmi.linux.kallsyms import Kallsyms, KallsymsNotFound, load_system_map, scan_for_kallsyms
from vmscope.vmi.linux.kaslr import (DEFAULT_TEXT, START_KERNEL_MAP, KernelLocation, KernelNotFound,  # noqa: F401
                                     find_kernel_image)
from vmscope.vmi.linux.modules import Module
from vmscope.vmi.linux.printk import LogRecord
from vmscope.vmi.linux.tasks import Task
from vmscope.vmi.memory import PhysicalMemory
from vmscope.vmi.paging.base import TranslationCache
from vmscope.vmi.paging.x86_64 import X86_64Paging

__all__ = ["LinuxKernel", "KernelLocation", "KernelNotFound", "LogRecord", "Module", "Task", "find_kernel_image"]

SCAN_CHUNK = 2 << 20
BTF_HEADER_MAGIC = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"  # magic, version 1, flags 0, hdr_len 24
MASK64 = (1 << 64) - 1

Progress = Callable[[str, int, int], None]  # (what, done, total)


class LinuxKernel:
    """Introspection of one x86_64 Linux guest.

    ``phys`` is guest-physical memory; ``cr3``/``cr4`` come from any vCPU.
    ``symbols`` may be a System.map path to use instead of kallsyms.
    """

    arch = "x86_64"

    def __init__(self, phys: PhysicalMemory, cr3: int, cr4: int = 0, *, cache: TranslationCache | None = None,
                 progress: Progress | None = None, system_map: str | None = None, disk_cache: bool = True):
        self._setup(phys, cache, progress)
        self.cr4 = cr4
        self.location = find_kernel_image(phys, cr3, cr4, self.cache)
        boot = AddressSpace(X86_64Paging(phys, self.location.root, cr4=cr4, cache=self.cache))
        from_cache = self._symbols_and_btf(boot, system_map, disk_cache)
        self.text = self.symbols["_text"] if "_text" in self.symbols else self.location.text
        self.slide = self.text - DEFAULT_TEXT
        # Unsigned like the kernel's phys_base: "negative" when KASLR put the
        # image lower in physical memory than in the virtual kernel map.
        self.phys_base = (self.location.phys_text - (self.location.text - START_KERNEL_MAP)) & MASK64
        # The kernel's own page tables map all of the kernel, whatever the CPU ran.
        if "init_top_pgt" in self.symbols:
            root = (self.symbols["init_top_pgt"] - START_KERNEL_MAP + self.phys_base) & MASK64
        else:
            root = self.location.root
        self.root = root
        self.aspace = AddressSpace(X86_64Paging(phys, root, cr4=cr4, cache=self.cache))
        self._fill_disk_cache(from_cache)

    def _setup(self, phys: PhysicalMemory, cache: TranslationCache | None, progress: Progress | None) -> None:
        self.phys = phys
        self.cache = cache or TranslationCache()
        self._progress = progress or (lambda what, done, total: None)
        self._btf: Btf | None = None
        self._layouts: dict = {}
        self._vmcoreinfo: dict[str, str] | None = None
        self.current_hint: int | None = None  # a task_struct known to be running (arm64: SP_EL0)
        #: where the symbols came from: "decoded", "build-cache" (an earlier boot of this kernel
        #: build, slid here) or "placement-cache" (this very placement seen before)
        self.symbols_source = "decoded"

    def _symbols_and_btf(self, boot: AddressSpace, system_map: str | None, disk_cache: bool) -> bool:
        """Symbols (and BTF, if cached) from the disk cache, else decoded
        from ``boot`` (or taken from the per-build cache, slid to this
        placement); True if they came from the per-placement cache."""
        self._use_build_cache = disk_cache and not system_map
        self._disk_key = symcache.image_key(boot, self.location) if disk_cache and not system_map else None
        cached = symcache.load_cached(self._disk_key) if self._disk_key else None
        if cached is not None:
            self.symbols, btf_blob = cached
            self._btf = Btf(btf_blob) if btf_blob else None
            self.symbols_source = "placement-cache"
            return True
        self.symbols = self._load_symbols(boot, system_map)
        self.symbols_source = "build-cache" if getattr(self.symbols, "cached", False) else "decoded"
        return False

    def _fill_disk_cache(self, from_cache: bool) -> None:
        if self._disk_key and not from_cache:
            try:
                btf_blob = self._btf_blob()
            except (BtfError, VmiError):
                btf_blob = b""
            symcache.store_cached(self._disk_key, self.symbols, btf_blob)

    # ------------------------------------------------------------ loading

    def _load_symbols(self, boot: AddressSpace, system_map: str | None) -> Kallsyms:
        if system_map:
            return load_system_map(system_map, self.location.text)
        loc = self.location

        def progress(done: int, total: int) -> None:
            self._progress("scanning kernel image for kallsyms", done, total)

        try:
            syms = scan_for_kallsyms(lambda pos, n: boot.read_partial(pos, n)[0], loc.text, loc.end, SCAN_CHUNK,
                                     progress, cache=symcache.BUILD_CACHE if self._use_build_cache else None)
        except KallsymsNotFound as e:
            raise KallsymsNotFound(f"kallsyms not found in the kernel image at 0x{loc.text:x}-0x{loc.end:x}: {e}") \
                from None
        from vmscope.vmi.linux.derived_symbols import with_derived_symbols

        return with_derived_symbols(syms, boot.read, self.arch)  # e.g. jiffies, which arm64's kallsyms lacks

    @property
    def btf(self) -> Btf:
        """The kernel's BTF, read from ``__start_BTF`` on first use."""
        if self._btf is None:
            self._btf = Btf(self._btf_blob())
        return self._btf

    def _btf_blob(self) -> bytes:
        """The BTF blob: from the per-build cache when this kernel build was
        seen before (BTF holds no addresses, so every boot of a build has
        the same), else read from guest memory."""
        build = getattr(self.symbols, "fingerprint", None) if self._use_build_cache else None
        if build is not None and (blob := symcache.BUILD_CACHE.btf(build)) is not None:
            return blob
        blob = self._read_btf_blob()
        if build is not None:
            symcache.BUILD_CACHE.put_btf(build, blob)
        return blob

    def _read_btf_blob(self) -> bytes:
        if "__start_BTF" in self.symbols:
            start = self.symbols["__start_BTF"]
        else:  # kallsyms without data symbols (no CONFIG_KALLSYMS_ALL): find the blob by its header
            start = self._find_in_image(BTF_HEADER_MAGIC, "BTF")
        size = Btf.header_size(self.aspace.read(start, 24))
        self._progress("reading BTF", 0, size)
        blob = self.aspace.read(start, size)
        self._progress("reading BTF", size, size)
        return blob

    def _find_in_image(self, needle: bytes, what: str) -> int:
        loc = self.location
        pos = loc.text
        while pos < loc.end:
            n = min(SCAN_CHUNK, loc.end - pos)
            data, _ = self.aspace.read_partial(pos, n + len(needle))
            i = data.find(needle)
            if 0 <= i < n:
                return pos + i
            pos += n
        raise BtfError(f"no {what} in the kernel image at 0x{loc.text:x}-0x{loc.end:x} "
                       "(built without CONFIG_DEBUG_INFO_BTF?)")

    def vmcoreinfo(self) -> dict[str, str]:
        """The kernel's VMCOREINFO (what crash-dump tools read): from
        ``vmcoreinfo_data``, or, when kallsyms lacks data symbols, found in
        guest RAM by its first line (needs a memory source that can be
        searched quickly, i.e. mapped RAM)."""
        if self._vmcoreinfo is None:
            text = b""
            if "vmcoreinfo_data" in self.symbols:
                from vmscope.vmi.linux.drgn_program import guest_vmcoreinfo

                text = guest_vmcoreinfo(self)
            else:
                text = _search_vmcoreinfo(self.phys)
            info = {}
            for line in text.decode("utf-8", "replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    info[key] = value
            self._vmcoreinfo = info
        return self._vmcoreinfo

    def address_of(self, name: str) -> int:
        """A symbol's address: from kallsyms, else from VMCOREINFO's
        ``SYMBOL(name)``. The one spelling to use; ``symbol(name)`` and
        ``symbols[name]`` (kallsyms only) stay as aliases."""
        if name in self.symbols:
            return self.symbols[name]
        value = self.vmcoreinfo().get(f"SYMBOL({name})")
        if value is None:
            raise KeyError(f"kernel symbol {name!r} is neither in kallsyms nor in VMCOREINFO")
        return int(value, 16)

    # ------------------------------------------------------------ typed reads

    def read(self, addr: int, size: int) -> bytes:
        """Kernel memory at ``addr``. A user address is refused with a hint:
        it means something only in one process's page tables (see
        :meth:`user_read`)."""
        try:
            return self.aspace.read(addr, size)
        except TranslationError as e:
            if addr >> 63:
                raise
            raise TranslationError(e.vaddr, e.level, f"{e.reason} in the kernel's page tables; 0x{addr:x} is a "
                                   "user-space address: read it in its process's address space "
                                   "(kernel.user_read(task, addr, size), or hit.read() in a probe)",
                                   e.entry, e.entry_addr) from None

    def u64(self, addr: int) -> int:
        return self.aspace.u64(addr)

    def symbol(self, name: str) -> int:
        """Alias of :meth:`address_of` (kept for older scripts)."""
        return self.address_of(name)

    def member(self, obj: int, struct_name: str, path: str, data: bytes | None = None, base: int = 0):
        """Value of ``struct_name.path`` for the object at ``obj``: an int for
        integers, enums and pointers, ``bytes`` for arrays (``str`` for char
        arrays). Pass ``data`` (bytes read from ``base``) to decode from a
        copy instead of guest memory."""
        f = self.btf.field(struct_name, path)
        if data is not None:
            raw = data[obj - base + f.offset : obj - base + f.offset + f.size]
        else:
            raw = self.read(obj + f.offset, f.size)
        if f.kind == ARRAY:
            if f.elem_size == 1:
                return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            return raw
        if f.kind in (INT, ENUM, ENUM64, PTR):
            value = int.from_bytes(raw, "little", signed=f.signed)
            if f.bitfield_size:
                value = (value >> f.bit_offset) & ((1 << f.bitfield_size) - 1)
            return value
        return raw

    def fetch(self, obj: int, struct_name: str) -> bytes:
        return self.read(obj, self.btf.struct_size(struct_name))

    def list_entries(self, head: int, struct_name: str, member: str, limit: int = 1_000_000):
        """Addresses of the structs on the ``list_head`` at ``head``, linked
        through ``struct_name.member`` (like ``list_for_each_entry``)."""
        off = self.btf.offsetof(struct_name, member)
        seen = set()
        node = self.u64(head)
        while node != head:
            if node in seen or len(seen) >= limit:
                raise VmiError(f"list at 0x{head:x} loops without returning to its head (corrupt or changing)")
            seen.add(node)
            yield node - off
            node = self.u64(node)

    # ------------------------------------------------------------ OS objects

    def banner(self) -> str:
        return self.aspace.cstring(self.symbols["linux_banner"], 512).strip() if "linux_banner" in self.symbols else ""

    def layout(self, struct_name: str, paths: list[str]):
        """Fields of ``struct_name`` resolved once, and the byte window that
        covers them (so one read of that window decodes every field)."""
        key = (struct_name, tuple(paths))
        cached = self._layouts.get(key)
        if cached is None:
            fields = {p: self.btf.field(struct_name, p) for p in paths}
            lo = min(f.offset for f in fields.values())
            hi = max(f.offset + f.size for f in fields.values())
            cached = self._layouts[key] = (fields, lo, hi)
        return cached

    @staticmethod
    def decoder(f, lo: int):
        """A function decoding field ``f`` from a window read at offset ``lo``."""
        start, end = f.offset - lo, f.offset - lo + f.size
        if f.kind == ARRAY:
            if f.elem_size == 1:
                return lambda data: data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")
            return lambda data: data[start:end]
        if f.size in (1, 2, 4, 8) and not f.bitfield_size:
            code = {1: "b", 2: "h", 4: "i", 8: "q"}[f.size]
            unpack = struct.Struct("<" + (code if f.signed else code.upper())).unpack_from
            return lambda data: unpack(data, start)[0]

        def decode(data: bytes) -> int:
            value = int.from_bytes(data[start:end], "little", signed=f.signed)
            if f.bitfield_size:
                value = (value >> f.bit_offset) & ((1 << f.bitfield_size) - 1)
            return value
        return decode

    def virt_to_phys(self, vaddr: int) -> int:
        return self.aspace.translate(vaddr).paddr

    # ------------------------------------------------------------ OS objects (see the modules)

    def tasks(self, threads: bool = False) -> list[Task]:
        return tasks_mod.tasks(self, threads)

    def task(self, pid: int) -> Task:
        return tasks_mod.task(self, pid)

    def cmdline(self, task: Task) -> list[str] | None:
        return tasks_mod.cmdline(self, task)

    def process_address_space(self, task: Task) -> AddressSpace:
        return tasks_mod.process_address_space(self, task)

    # helpers named after the kernel's and drgn's (see current.py, user.py)

    def current_task(self, regs, tid: int | None = None) -> int:
        """``current`` on the stopped vCPU whose registers are ``regs``."""
        return current_mod.current_task(self, regs, tid)

    def cpu_from_registers(self, regs, tid: int | None = None) -> int:
        """The Linux CPU number of the vCPU whose registers are ``regs``."""
        return current_mod.cpu_from_registers(self, regs, tid)

    def task_from_address(self, address: int) -> Task:
        return current_mod.task_from_address(self, address)

    def find_task(self, pid: int) -> Task:
        return current_mod.find_task(self, pid)

    def user_read(self, task: Task, addr: int, size: int) -> bytes:
        return user_mod.user_read(self, task, addr, size)

    def user_string(self, task: Task, addr: int, limit: int = 4096) -> str:
        return user_mod.user_string(self, task, addr, limit)

    def modules(self) -> list[Module]:
        return modules_mod.modules(self)

    def dmesg(self) -> list[LogRecord]:
        return printk.dmesg(self)

    def uptime(self) -> float:
        return clock.uptime(self)


class Arm64LinuxKernel(LinuxKernel):
    """Introspection of one AArch64 Linux guest, from TTBR0/TTBR1/TCR and
    any kernel text address (VBAR_EL1, or the pc when stopped in the kernel).

    The image is found by walking down from that address to the first
    unmapped page; its arm64 Image header (still at ``_text``) gives the
    image size. Kernel addresses are walked through TTBR1 (swapper_pg_dir).
    """

    arch = "aarch64"

    def __init__(self, phys: PhysicalMemory, ttbr0: int, ttbr1: int, tcr: int, text_address: int, *,
                 current_task: int | None = None, cache: TranslationCache | None = None,
                 progress: Progress | None = None, system_map: str | None = None, disk_cache: bool = True):
        from vmscope.vmi.linux.kaslr import (KernelNotFound, arm64_kimage_vaddr, find_arm64_kernel_image,
                                             find_arm64_kernel_behind_trampoline)
        from vmscope.vmi.paging.aarch64 import TTBR_BADDR_MASK, Aarch64Paging

        self._setup(phys, cache, progress)
        self.cr4 = 0
        walker = Aarch64Paging(phys, ttbr0, ttbr1, tcr, cache=self.cache)
        try:
            self.location = find_arm64_kernel_image(AddressSpace(walker), text_address, walker)
        except KernelNotFound as error:
            # Stopped in EL0 under KPTI: TTBR1 and VBAR are the trampoline's.
            found = find_arm64_kernel_behind_trampoline(phys, walker, text_address, cache=self.cache)
            if found is None:
                raise error
            walker, self.location = found
        boot = AddressSpace(walker)
        from_cache = self._symbols_and_btf(boot, system_map, disk_cache)
        self.text = self.symbols["_text"] if "_text" in self.symbols else self.location.text
        self.slide = self.text - arm64_kimage_vaddr(walker)  # what the kernel prints as "Kernel Offset"
        self.phys_base = self.location.phys_text
        self.root = walker.ttbr1 & TTBR_BADDR_MASK  # swapper_pg_dir, also when found behind KPTI's trampoline
        self.aspace = boot
        self.current_hint = current_task
        self._fill_disk_cache(from_cache)

    def process_address_space(self, task: Task) -> AddressSpace:
        """The process's tables in TTBR0 (``mm->pgd``), the kernel's in TTBR1."""
        from vmscope.vmi.paging.aarch64 import Aarch64Paging

        mm = self.member(task.address, "task_struct", "mm")
        if not mm:
            raise VmiError(f"task {task.pid} ({task.comm}) is a kernel thread: it has no user address space")
        pgd = self.virt_to_phys(self.member(mm, "mm_struct", "pgd"))
        walker = self.aspace.walker
        return AddressSpace(Aarch64Paging(self.phys, pgd, walker.ttbr1, walker.tcr, cache=self.cache))


def _search_vmcoreinfo(phys) -> bytes:
    """VMCOREINFO text found in mapped guest RAM by its first lines."""
    for region in getattr(phys, "regions", ()):
        buf = region.buffer
        find = getattr(buf, "find", None)
        if find is None:
            continue
        i = find(b"OSRELEASE=", region.offset, region.offset + region.size)
        while i >= 0:
            chunk = bytes(buf[i : i + 8192])
            text = chunk.split(b"\0", 1)[0]
            if b"\nPAGESIZE=" in text[:256] and b"SYMBOL(" in text:
                return text
            i = find(b"OSRELEASE=", i + 1, region.offset + region.size)
    raise VmiError("VMCOREINFO not found: kallsyms has no data symbols and guest RAM cannot be searched "
                   "(use a shared-RAM memory path)")
