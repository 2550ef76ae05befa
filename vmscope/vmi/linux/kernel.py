"""A running Linux kernel seen through its memory, without its vmlinux.

From a physical memory source and the CPU's page-table root this finds the
kernel image (the KASLR slide), decodes kallsyms, loads the kernel's BTF,
and switches to the kernel's own page tables (``init_top_pgt``) so that
reads work whichever process the CPU happened to stop in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from vmscope.vmi.address_space import AddressSpace
from vmscope.vmi.errors import TranslationError, VmiError
from vmscope.vmi.linux.btf import ARRAY, ENUM, ENUM64, INT, PTR, Btf, BtfError
from vmscope.vmi.linux.kallsyms import Kallsyms, KallsymsNotFound, Symbol, parse_kallsyms
from vmscope.vmi.memory import PhysicalMemory
from vmscope.vmi.paging.base import TranslationCache
from vmscope.vmi.paging.x86_64 import X86_64Paging

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # x86_64 __START_KERNEL_map
DEFAULT_TEXT = 0xFFFF_FFFF_8100_0000  # _text without KASLR (LOAD_PHYSICAL_ADDR 16 MiB)
KERNEL_IMAGE_END = 0xFFFF_FFFF_C000_0000  # KERNEL_IMAGE_SIZE with KASLR: 1 GiB
PTI_USER_PGD = 1 << 12  # with PTI, the user half of an 8 KiB PGD pair
SCAN_CHUNK = 2 << 20
MASK64 = (1 << 64) - 1

Progress = Callable[[str, int, int], None]  # (what, done, total)


class KernelNotFound(VmiError):
    """No Linux kernel image in the memory these page tables map."""


@dataclass(frozen=True)
class KernelLocation:
    text: int  # virtual _text (rounded down to its 2 MiB page)
    end: int  # end of the contiguous kernel image mapping
    slide: int  # KASLR virtual slide: text - 0xffffffff81000000
    phys_text: int  # physical address of _text
    root: int  # page-table root the image was found through


def find_kernel_image(phys: PhysicalMemory, cr3: int, cr4: int = 0, cache: TranslationCache | None = None) -> KernelLocation:
    """Find the kernel image in the top 1 GiB of the address space: the first
    2 MiB page mapped there is ``_text`` (the boot code unmaps the rest of the
    kernel mapping outside ``_text``.. ``_end``). With PTI the CPU may have
    stopped on the user PGD, which maps almost none of the kernel; then the
    kernel PGD is the other half of the 8 KiB pair."""
    tried = []
    for root in dict.fromkeys((cr3 & ~0xFFF, cr3 & ~0xFFF & ~PTI_USER_PGD)):
        walker = X86_64Paging(phys, root, cr4=cr4, cache=cache)
        start = end = None
        for va in range(START_KERNEL_MAP, KERNEL_IMAGE_END, 0x200000):
            try:
                walker.page(va)
            except TranslationError:
                if start is not None:
                    break
                continue
            except VmiError:
                break
            if start is None:
                start = va
            end = va + 0x200000
        tried.append(f"0x{root:x}")
        if start is not None and end is not None and end - start >= 4 << 20:
            return KernelLocation(start, end, start - DEFAULT_TEXT, walker.translate(start).paddr, root)
    raise KernelNotFound(f"no kernel image mapped at 0x{START_KERNEL_MAP:x}-0x{KERNEL_IMAGE_END:x} "
                         f"through page tables at {', '.join(tried)} (is this an x86_64 Linux guest in long mode?)")


@dataclass(frozen=True)
class Task:
    pid: int
    tgid: int
    ppid: int
    comm: str
    state: str  # ps letter: R S D T t X Z P I
    kernel_thread: bool
    address: int  # the task_struct
    start_time_ns: int = 0

    @property
    def kind(self) -> str:
        return "kernel" if self.kernel_thread else "user"


@dataclass(frozen=True)
class Module:
    name: str
    size: int
    refcount: int
    state: str
    base: int
    address: int  # the struct module
    used_by: tuple[str, ...] = ()  # modules that depend on this one (/proc/modules' 4th column)


@dataclass(frozen=True)
class LogRecord:
    seq: int
    timestamp_ns: int
    level: int
    facility: int
    text: str

    def format(self) -> str:
        secs, nsec = divmod(self.timestamp_ns, 1_000_000_000)
        return f"[{secs:5d}.{nsec // 1000:06d}] {self.text}"


_STATE_LETTERS = "RSDTtXZPI"
TASK_REPORT = 0x7F
TASK_IDLE = 0x402  # TASK_UNINTERRUPTIBLE | TASK_NOLOAD
PF_KTHREAD = 0x00200000


class LinuxKernel:
    """Introspection of one x86_64 Linux guest.

    ``phys`` is guest-physical memory; ``cr3``/``cr4`` come from any vCPU.
    ``symbols`` may be a System.map path to use instead of kallsyms.
    """

    def __init__(self, phys: PhysicalMemory, cr3: int, cr4: int = 0, *, cache: TranslationCache | None = None,
                 progress: Progress | None = None, system_map: str | None = None, disk_cache: bool = True):
        self.phys = phys
        self.cache = cache or TranslationCache()
        self.cr4 = cr4
        self._progress = progress or (lambda what, done, total: None)
        self.location = find_kernel_image(phys, cr3, cr4, self.cache)
        boot = AddressSpace(X86_64Paging(phys, self.location.root, cr4=cr4, cache=self.cache))
        self._btf: Btf | None = None
        self._layouts: dict = {}
        self._disk_key = _image_key(boot, self.location) if disk_cache and not system_map else None
        cached = _load_cached(self._disk_key) if self._disk_key else None
        if cached is not None:
            self.symbols, btf_blob = cached
            self._btf = Btf(btf_blob) if btf_blob else None
        else:
            self.symbols = self._load_symbols(boot, system_map)
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
        if self._disk_key and cached is None:
            try:
                btf_blob = self._btf_blob()
            except (BtfError, VmiError):
                btf_blob = b""
            _store_cached(self._disk_key, self.symbols, btf_blob)

    # ------------------------------------------------------------ loading

    def _load_symbols(self, boot: AddressSpace, system_map: str | None) -> Kallsyms:
        if system_map:
            return load_system_map(system_map, self.location.text)
        loc = self.location
        total = loc.end - loc.text
        buf = bytearray()
        err: Exception | None = None
        pos = loc.text
        while pos < loc.end:
            n = min(SCAN_CHUNK, loc.end - pos)
            data, _holes = boot.read_partial(pos, n)
            buf += data
            pos += n
            self._progress("scanning kernel image for kallsyms", pos - loc.text, total)
            if b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00" in data[-n:] or pos >= loc.end:
                try:
                    # The token table may sit right at a chunk end: read one more.
                    if pos < loc.end:
                        more, _ = boot.read_partial(pos, min(SCAN_CHUNK, loc.end - pos))
                        buf += more
                        pos += len(more)
                    return parse_kallsyms(bytes(buf), loc.text)
                except KallsymsNotFound as e:
                    err = e
        raise KallsymsNotFound(f"kallsyms not found in the kernel image at 0x{loc.text:x}-0x{loc.end:x}: {err}")

    @property
    def btf(self) -> Btf:
        """The kernel's BTF, read from ``__start_BTF`` on first use."""
        if self._btf is None:
            self._btf = Btf(self._btf_blob())
        return self._btf

    def _btf_blob(self) -> bytes:
        if "__start_BTF" not in self.symbols:
            raise BtfError("this kernel has no __start_BTF symbol (built without CONFIG_DEBUG_INFO_BTF?)")
        start = self.symbols["__start_BTF"]
        size = Btf.header_size(self.aspace.read(start, 24))
        self._progress("reading BTF", 0, size)
        blob = self.aspace.read(start, size)
        self._progress("reading BTF", size, size)
        return blob

    # ------------------------------------------------------------ typed reads

    def read(self, addr: int, size: int) -> bytes:
        return self.aspace.read(addr, size)

    def u64(self, addr: int) -> int:
        return self.aspace.u64(addr)

    def symbol(self, name: str) -> int:
        return self.symbols[name]

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

    def _fetch(self, obj: int, struct_name: str) -> bytes:
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

    def _layout(self, struct_name: str, paths: list[str]):
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
    def _decoder(f, lo: int):
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

    def tasks(self) -> list[Task]:
        """Every process (thread-group leader) on the ``init_task.tasks`` list,
        init_task (pid 0) first."""
        init = self.symbols["init_task"]
        if "task_state_field" not in self._layouts:
            self._layouts["task_state_field"] = "__state" if _has(self.btf, "task_struct", "__state") else "state"
        state_field = self._layouts["task_state_field"]
        paths = ["pid", "tgid", "comm", "real_parent", state_field, "exit_state", "flags", "start_time", "tasks.next"]
        fields, lo, hi = self._layout("task_struct", paths)
        decoders = [(p, self._decoder(f, lo)) for p, f in fields.items()]
        tasks_off = fields["tasks.next"].offset
        rows = []
        addr = init
        seen = set()
        while True:
            data = self.read(addr + lo, hi - lo)
            v = {p: dec(data) for p, dec in decoders}
            rows.append((addr, v))
            seen.add(addr)
            addr = v["tasks.next"] - tasks_off
            if addr == init:
                break
            if addr in seen or len(seen) > 1_000_000:
                raise VmiError("the task list loops without returning to init_task (corrupt or changing)")
        tgid_of = {addr: v["tgid"] for addr, v in rows}
        out = []
        for addr, v in rows:
            parent = v["real_parent"]
            if parent == addr or addr == init:
                ppid = 0
            else:
                ppid = tgid_of.get(parent)
                if ppid is None:
                    ppid = self.member(parent, "task_struct", "tgid")
            out.append(Task(pid=v["pid"], tgid=v["tgid"], ppid=ppid, comm=v["comm"],
                            state=_state_letter(v[state_field], v["exit_state"]),
                            kernel_thread=bool(v["flags"] & PF_KTHREAD) or addr == init, address=addr,
                            start_time_ns=v["start_time"]))
        return out

    def modules(self) -> list[Module]:
        """Loaded modules, most recently loaded first (as ``/proc/modules``)."""
        btf = self.btf
        states = btf.enumerators("module_state")
        out = []
        for addr in self.list_entries(self.symbols["modules"], "module", "list"):
            data = self._fetch(addr, "module")
            m = lambda path: self.member(addr, "module", path, data, addr)  # noqa: E731
            if _has(btf, "module", "core_layout"):
                size = m("core_layout.size") + m("init_layout.size")
                base = m("core_layout.base")
            else:  # Linux 6.4+: mem[MOD_TEXT..]
                size, base = self._module_mem(addr, data)
            refcount = m("refcnt.counter") - 1 if _has(btf, "module", "refcnt") else 0
            state = states.get(m("state"), str(m("state"))).removeprefix("MODULE_STATE_").capitalize()
            out.append(Module(m("name"), size, refcount, state, base, addr, self._module_users(addr)))
        return out

    def _module_users(self, mod: int) -> tuple[str, ...]:
        """Names on ``mod->source_list``: each ``struct module_use`` there
        links a module (``source``) that uses this one."""
        if not _has(self.btf, "module", "source_list"):
            return ()
        head = mod + self.btf.offsetof("module", "source_list")
        names = []
        for use in self.list_entries(head, "module_use", "source_list"):
            source = self.member(use, "module_use", "source")
            names.append(self.member(source, "module", "name"))
        return tuple(names)

    def _module_mem(self, addr: int, data: bytes) -> tuple[int, int]:
        f = self.btf.field("module", "mem")
        elem = f.elem_size
        size_off = self.btf.offsetof("module_memory", "size")
        base_off = self.btf.offsetof("module_memory", "base")
        sizes = [struct.unpack_from("<I", data, f.offset + i * elem + size_off)[0] for i in range(f.count)]
        base = struct.unpack_from("<Q", data, f.offset + base_off)[0]
        return sum(sizes), base

    def dmesg(self) -> list[LogRecord]:
        """The kernel log from the lockless printk ring buffer (Linux 5.10+)."""
        btf = self.btf
        rb = self.u64(self.symbols["prb"])
        m = lambda path: self.member(rb, "printk_ringbuffer", path)  # noqa: E731
        count = 1 << m("desc_ring.count_bits")
        descs, infos = m("desc_ring.descs"), m("desc_ring.infos")
        tail, head = m("desc_ring.tail_id.counter"), m("desc_ring.head_id.counter")
        data_size = 1 << m("text_data_ring.size_bits")
        data = self.read(m("text_data_ring.data"), data_size)
        desc_size, info_size = btf.struct_size("prb_desc"), btf.struct_size("printk_info")
        desc_blob = self.read(descs, desc_size * count)
        info_blob = self.read(infos, info_size * count)
        sv_off = btf.offsetof("prb_desc", "state_var")
        begin_off = btf.offsetof("prb_desc", "text_blk_lpos.begin")
        next_off = btf.offsetof("prb_desc", "text_blk_lpos.next")
        fi = {name: btf.field("printk_info", name) for name in ("seq", "ts_nsec", "text_len", "facility")}
        level_f = btf.field("printk_info", "level")
        id_mask = (1 << 62) - 1
        out = []
        ident = tail
        for _ in range(count):
            idx = ident % count
            d = idx * desc_size
            sv = struct.unpack_from("<Q", desc_blob, d + sv_off)[0]
            if sv & id_mask == ident & id_mask and (sv >> 62) in (1, 2):  # committed, finalized
                begin, nxt = struct.unpack_from("<QQ", desc_blob, d + begin_off)[0], \
                    struct.unpack_from("<Q", desc_blob, d + next_off)[0]
                i = idx * info_size
                ival = lambda f: int.from_bytes(info_blob[i + f.offset : i + f.offset + f.size], "little")  # noqa: E731
                text_len = ival(fi["text_len"])
                text = _ring_text(data, data_size, begin, nxt, text_len)
                level_byte = info_blob[i + level_f.offset]
                level = (level_byte >> level_f.bit_offset) & ((1 << (level_f.bitfield_size or 3)) - 1)
                out.append(LogRecord(ival(fi["seq"]), ival(fi["ts_nsec"]), level, ival(fi["facility"]),
                                     text.decode("utf-8", "replace")))
            if ident & id_mask == head & id_mask:
                break
            ident = (ident + 1) & id_mask
        out.sort(key=lambda r: r.seq)
        return out

    def uptime(self) -> float:
        """Seconds since boot (CLOCK_BOOTTIME) as of the timekeeper's last
        update. The clock source itself cannot be read from memory, so an
        idle tickless guest may be a fraction of a second (or, long idle,
        more) ahead of this value."""
        tk_core = self.symbols["tk_core"]
        btf = self.btf
        # static struct { seqcount_raw_spinlock_t seq; struct timekeeper timekeeper; } tk_core
        seq_size = btf.sizeof(btf.find("seqcount_raw_spinlock_t", 8)) if btf.has("seqcount_raw_spinlock_t", 8) else 4
        tk = tk_core + ((seq_size + 7) & ~7)
        # ktime_get() = tkr_mono.base + (cycles since cycle_last * mult + xtime_nsec) >> shift
        base = self.member(tk, "timekeeper", "tkr_mono.base")
        frac = self.member(tk, "timekeeper", "tkr_mono.xtime_nsec") >> self.member(tk, "timekeeper", "tkr_mono.shift")
        boot = self.member(tk, "timekeeper", "offs_boot")
        return (base + frac + boot) / 1e9

    def process_address_space(self, task: Task) -> AddressSpace:
        """The user address space of a process (its ``mm->pgd``)."""
        mm = self.member(task.address, "task_struct", "mm")
        if not mm:
            raise VmiError(f"task {task.pid} ({task.comm}) is a kernel thread: it has no user address space")
        pgd = self.member(mm, "mm_struct", "pgd")
        return AddressSpace(X86_64Paging(self.phys, self.virt_to_phys(pgd), cr4=self.cr4, cache=self.cache))

    def task(self, pid: int) -> Task:
        """The process with this pid; a clear error if there is none."""
        for t in self.tasks():
            if t.pid == pid:
                return t
        raise VmiError(f"no process with pid {pid} in the guest")

    def cmdline(self, task: Task) -> list[str] | None:
        """A process's argv, read from its own stack (``mm->arg_start`` ..
        ``arg_end``) as ``/proc/PID/cmdline`` does; None for kernel threads
        and when those pages are not resident."""
        mm = self.member(task.address, "task_struct", "mm")
        if not mm:
            return None
        start = self.member(mm, "mm_struct", "arg_start")
        end = self.member(mm, "mm_struct", "arg_end")
        if not 0 < end - start <= 1 << 20:
            return None
        try:
            raw = self.process_address_space(task).read(start, end - start)
        except VmiError:
            return None
        return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")]

    def virt_to_phys(self, vaddr: int) -> int:
        return self.aspace.translate(vaddr).paddr


def _has(btf: Btf, struct_name: str, path: str) -> bool:
    try:
        btf.field(struct_name, path)
        return True
    except BtfError:
        return False


def _state_letter(state: int, exit_state: int) -> str:
    """Like the kernel's ``task_state_index``: the highest reportable bit."""
    if state == TASK_IDLE:
        return "I"
    bits = (state | exit_state) & TASK_REPORT
    return _STATE_LETTERS[bits.bit_length()]


def _ring_text(data: bytes, size: int, begin: int, nxt: int, text_len: int) -> bytes:
    """Text of one record in the data ring (``get_data`` in
    ``kernel/printk/printk_ringbuffer.c``): a block is an 8-byte id and the
    text; a block that would wrap is stored whole at the ring's start."""
    if begin & 1 or nxt & 1 or begin == nxt:
        return b""  # data-less record
    bits = size.bit_length() - 1
    if begin >> bits == nxt >> bits:
        start, length = begin & (size - 1), nxt - begin
    elif (begin >> bits) + 1 == nxt >> bits:
        start, length = 0, nxt & (size - 1)
    else:
        return b""
    if length < 8:
        return b""
    return data[start + 8 : start + min(length, 8 + text_len)]


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


# ---------------------------------------------------------------- disk cache
#
# Decoding kallsyms and BTF costs a fraction of a second of CPU (and, over
# RSP, reading ~20 MiB of kernel image); both depend only on the kernel
# build and its KASLR placement. The first 64 KiB of relocated kernel text
# at its virtual address identify both, so they key a cache of the results.

CACHE_VERSION = 1


def _image_key(boot: AddressSpace, loc: KernelLocation) -> str | None:
    import hashlib

    try:
        head = boot.read(loc.text, 64 << 10)
    except VmiError:
        return None
    return hashlib.sha256(head + loc.text.to_bytes(8, "little") + bytes([CACHE_VERSION])).hexdigest()[:32]


def _cache_file(key: str):
    from vmscope.images.cache import cache_dir

    return cache_dir("kernels") / f"{key}.pickle"


def _load_cached(key: str):
    import pickle

    try:
        with open(_cache_file(key), "rb") as f:
            version, symbols, btf_blob = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
        return None
    if version != CACHE_VERSION:
        return None
    return Kallsyms([Symbol(*s) for s in symbols]), btf_blob


def _store_cached(key: str, symbols: Kallsyms, btf_blob: bytes) -> None:
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
