"""QEMU through QMP (the ``qemu.qmp`` library): the system registers its
gdbstub lacks, and guest-physical memory through RAM that QEMU shares.

Shared RAM means a memory backend QEMU maps ``MAP_SHARED``:
``-object memory-backend-file,id=mem,mem-path=/dev/shm/x,share=on`` or
``-object memory-backend-memfd,id=mem,share=on`` with
``-machine memory-backend=mem``. Guest-physical addresses are mapped to file
offsets from QEMU's own flattened memory tree (``info mtree -f``), never by
assuming offset == address: above 3.5 GiB RAM continues after the PCI hole
at 4 GiB while the file continues where it stopped.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from vmscope.vmi.memory import RegionMemory, map_file_regions


class QmpError(Exception):
    """QMP unreachable, or QEMU refused a command."""


class NoSharedRam(QmpError):
    """QEMU's RAM is not shared, so it cannot be mapped from outside."""


# "  0000000000100000-000000001fffffff (prio 0, ram): mem @0000000000100000"
_FLAT_LINE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (ram|rom|romd|i/o|ramd)\): (\S+)(?: @([0-9a-f]+))?")


@dataclass(frozen=True)
class RamRange:
    gpa: int
    size: int
    region: str  # QEMU memory region name (a memory backend's id)
    offset: int  # offset inside that region (== inside its file)


def parse_flatview(text: str, address_space: str = "memory") -> list[RamRange]:
    """RAM/ROM ranges of one address space from ``info mtree -f`` output."""
    out: list[RamRange] = []
    in_view = False
    for line in text.splitlines():
        if line.startswith("FlatView"):
            in_view = False
        elif line.strip().startswith(f'AS "{address_space}"'):
            in_view = True
        elif in_view:
            m = _FLAT_LINE.match(line)
            if m and m.group(3) in ("ram", "rom", "ramd", "romd"):
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                out.append(RamRange(start, end - start + 1, m.group(4), int(m.group(5) or "0", 16)))
    return out


def merge_ranges(ranges: list[RamRange]) -> list[RamRange]:
    """Join ranges that continue each other in both GPA and file offset
    (QEMU splits low RAM into ROM/RAM pieces of the same backend)."""
    out: list[RamRange] = []
    for r in sorted(ranges, key=lambda r: r.gpa):
        last = out[-1] if out else None
        if last and last.region == r.region and last.gpa + last.size == r.gpa and last.offset + last.size == r.offset:
            out[-1] = RamRange(last.gpa, last.size + r.size, last.region, last.offset)
        else:
            out.append(r)
    return out


_CR_RE = re.compile(r"\b(CR[0-4]|EFER|DR[0-7]|CR8)=([0-9a-fA-F]+)")
_TABLE_RE = re.compile(r"\b(GDT|IDT)=\s*([0-9a-fA-F]+) ([0-9a-fA-F]+)")
_SEG_RE = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR) ?=([0-9a-fA-F]{4}) ([0-9a-fA-F]+) ([0-9a-fA-F]+) ([0-9a-fA-F]+)", re.M)


def parse_x86_info_registers(text: str) -> dict[str, int]:
    """System registers from HMP ``info registers`` (x86): CR0-4, CR8
    when shown, EFER, DR0-7, GDT/IDT base and limit, segment bases."""
    regs: dict[str, int] = {}
    for name, value in _CR_RE.findall(text):
        regs[name.lower()] = int(value, 16)
    for name, base, limit in _TABLE_RE.findall(text):
        regs[f"{name.lower()}r_base"] = int(base, 16)
        regs[f"{name.lower()}r_limit"] = int(limit, 16)
    for name, sel, base, limit, flags in _SEG_RE.findall(text):
        regs[f"{name.lower()}_base"] = int(base, 16)
    return regs


class QemuMonitor:
    """A synchronous QMP connection (``host:port`` or a Unix socket path).

    Built on ``qemu.qmp``'s asyncio client with a private event loop, so
    that connecting and every command have a timeout: QEMU's QMP server
    serves one client at a time and keeps a second one waiting for its
    greeting, which must end in an error, not a hang.
    """

    def __init__(self, address: str, timeout: float = 10.0):
        import asyncio

        from qemu.qmp import QMPClient

        self.address = address
        self.timeout = timeout
        target: str | tuple[str, int]
        if address.startswith("/") or address.startswith("unix:"):
            target = address.removeprefix("unix:")
        else:
            host, _, port = address.rpartition(":")
            if not port.isdigit():
                raise QmpError(f"bad QMP address {address!r}: expected HOST:PORT or a socket path")
            target = (host or "127.0.0.1", int(port))
        self._loop = asyncio.new_event_loop()
        self._qmp = QMPClient("vmscope")
        try:
            self._run(self._qmp.connect(target))
        except asyncio.TimeoutError:
            self._abandon()
            raise QmpError(f"QMP at {address} did not greet us within {timeout} s: QEMU serves one QMP client "
                           "at a time, is another one connected?") from None
        except Exception as e:  # qemu.qmp raises several types (ConnectError, OSError)
            self._abandon()
            raise QmpError(f"cannot connect to QMP at {address}: {e}") from e

    def _run(self, coro):
        import asyncio

        return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))

    def _abandon(self) -> None:
        try:
            self._loop.run_until_complete(self._qmp.disconnect())
        except Exception:
            pass
        self._loop.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._abandon()

    def command(self, name: str, **args):
        import asyncio

        try:
            return self._run(self._qmp.execute(name, args or None))
        except asyncio.TimeoutError:
            raise QmpError(f"QMP {name}: no answer within {self.timeout} s") from None
        except Exception as e:
            raise QmpError(f"QMP {name} failed: {e}") from e

    def hmp(self, command_line: str) -> str:
        return self.command("human-monitor-command", **{"command-line": command_line})

    def x86_system_registers(self, cpu: int = 0) -> dict[str, int]:
        if cpu:
            self.hmp(f"cpu {cpu}")
        return parse_x86_info_registers(self.hmp("info registers"))

    def ram_ranges(self) -> list[RamRange]:
        return merge_ranges(parse_flatview(self.hmp("info mtree -f")))

    def shared_ram(self, writable: bool = False) -> RegionMemory:
        """Map QEMU's shared RAM backends; raises :class:`NoSharedRam` with a
        hint when the guest's RAM is private to QEMU."""
        memdevs = {d["id"]: d for d in self.command("query-memdev") if d.get("id")}
        ranges = self.ram_ranges()
        by_backend: dict[str, list[RamRange]] = {}
        for r in ranges:
            if r.region in memdevs:
                by_backend.setdefault(r.region, []).append(r)
        if not by_backend:
            raise NoSharedRam("guest RAM is not a memory backend; start QEMU with "
                              "-object memory-backend-file,id=mem,mem-path=/dev/shm/NAME,size=SIZE,share=on "
                              "-machine memory-backend=mem (or memory-backend-memfd,share=on)")
        regions: list[RegionMemory] = []
        for backend, rs in by_backend.items():
            if not memdevs[backend].get("share"):
                raise NoSharedRam(f"memory backend {backend!r} is not shared; add share=on to it")
            path = self._backend_file(backend, memdevs[backend]["size"])
            regions.append(map_file_regions(path, [(r.gpa, r.size, r.offset) for r in rs], writable))
        if len(regions) == 1:
            return regions[0]
        return RegionMemory([reg for rm in regions for reg in rm.regions])

    def _backend_file(self, backend: str, size: int) -> str:
        try:
            path = self.command("qom-get", path=f"/objects/{backend}", property="mem-path")
        except QmpError:
            path = None  # not a file backend: a memfd
        if path:
            if os.path.isfile(path):
                return path
            raise NoSharedRam(f"memory backend {backend!r} uses mem-path {path!r}, which is not a file this "
                              "process can open (a directory makes QEMU create and unlink a hidden file)")
        found = _find_memfd(size, self._qemu_pid())
        if found is None:
            raise NoSharedRam(f"cannot find the memfd of backend {backend!r} in /proc "
                              "(QEMU must run on this host, as a user whose /proc/PID/fd we can read)")
        return found

    def _qemu_pid(self) -> int | None:
        """The QEMU process owning our QMP socket's listening end."""
        inode = _listening_inode(self.address)
        if inode is None:
            return None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return int(pid)
                except OSError:
                    continue
        return None


def _listening_inode(address: str) -> int | None:
    if address.startswith("/") or address.startswith("unix:"):
        path = address.removeprefix("unix:")
        try:
            with open("/proc/net/unix") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 8 and parts[7] == path and parts[3] == "00010000":
                        return int(parts[6])
        except OSError:
            return None
        return None
    port = int(address.rpartition(":")[2])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[1].rpartition(":")[2], 16) == port and parts[3] == "0A":
                        return int(parts[9])
        except OSError:
            continue
    return None


def _find_memfd(size: int, pid: int | None) -> str | None:
    pids = [str(pid)] if pid else [p for p in os.listdir("/proc") if p.isdigit()]
    for p in pids:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            link = f"/proc/{p}/fd/{fd}"
            try:
                if not os.readlink(link).startswith("/memfd:"):
                    continue
                st = os.stat(link)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size == size:
                return link
    return None
