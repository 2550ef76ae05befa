"""Guest-physical memory through the GDB stub itself: the slow path that
always works with QEMU (``Qqemu.PhyMemMode``)."""

from __future__ import annotations

from vmscope.client.client import Client, MemoryReadError, StubError
from vmscope.client.transport import BadReply, ConnectionLost, StubTimeout
from vmscope.vmi.errors import PhysicalMemoryError


class RspPhysicalMemory:
    """:class:`~vmscope.vmi.memory.PhysicalMemory` over a stub's physical
    memory mode. ``name`` shows in benchmarks and ``inspect`` output."""

    name = "rsp"

    def __init__(self, client: Client):
        self.client = client
        try:
            client.set_physical_mode(True)
            client.set_physical_mode(False)
        except StubError as e:
            raise PhysicalMemoryError(0, 0, f"the stub has no physical-memory mode ({e})") from e

    def read(self, addr: int, size: int) -> bytes:
        try:
            return self.client.read_memory(addr, size, physical=True)
        except MemoryReadError as e:
            raise PhysicalMemoryError(e.addr, e.size, "the stub cannot read it") from e
        except (BadReply, StubTimeout, ConnectionLost) as e:
            # which read failed, for the introspection above (a ps names the task it was reading)
            raise PhysicalMemoryError(addr, size, f"reading it through the stub failed: {e}") from e

    def write(self, addr: int, data: bytes) -> None:
        try:
            self.client.write_memory(addr, data, physical=True)
        except StubError as e:
            raise PhysicalMemoryError(addr, len(data), str(e)) from e
