"""vmscope's own VMM: map its guest-RAM memfd and read physical memory
directly. The stub names the memfd in ``monitor memory`` output, one line
per RAM range: ``ram gpa=0x0 size=0x20000000 pid=1234 fd=7 offset=0x0``."""

from __future__ import annotations

import re

from vmscope.client.client import Client, StubError
from vmscope.vmi.memory import RegionMemory, map_file_regions

_LINE = re.compile(r"gpa=(0x[0-9a-fA-F]+|\d+)\s+size=(0x[0-9a-fA-F]+|\d+)\s+pid=(\d+)\s+fd=(\d+)(?:\s+offset=(0x[0-9a-fA-F]+|\d+))?")


def vmscope_ram(client: Client, writable: bool = False) -> RegionMemory | None:
    """The VMM's RAM if the stub is vmscope's and on this host, else None."""
    try:
        text = client.monitor("memory")
    except StubError:
        return None
    ranges: dict[str, list[tuple[int, int, int]]] = {}
    for m in _LINE.finditer(text):
        path = f"/proc/{m.group(3)}/fd/{m.group(4)}"
        ranges.setdefault(path, []).append((int(m.group(1), 0), int(m.group(2), 0), int(m.group(5) or "0", 0)))
    if not ranges:
        return None
    try:
        maps = [map_file_regions(path, rs, writable) for path, rs in ranges.items()]
    except OSError:
        return None  # another host, or no permission on /proc/PID/fd
    return maps[0] if len(maps) == 1 else RegionMemory([r for m in maps for r in m.regions])
