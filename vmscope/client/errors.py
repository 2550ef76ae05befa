"""What can go wrong talking to a stub, as exceptions a user can read."""

from __future__ import annotations

import os

from vmscope.rsp.stops import StopEvent


class StubError(Exception):
    """The stub answered a request with ``Exx`` (or refused it)."""

    def __init__(self, request: bytes, reply: bytes):
        code = reply[1:3].decode(errors="replace") if reply.startswith(b"E") else ""
        what = request[:40].decode(errors="replace")
        detail = f"error E{code}" if code else f"reply {reply[:40]!r}"
        if code.isalnum() and len(code) == 2:
            try:
                detail += f" ({os.strerror(int(code, 16))})"
            except ValueError:
                pass
        super().__init__(f"stub refused {what!r}: {detail}")
        self.request = request
        self.reply = reply


class TargetExited(StubError):
    """The debugged program or VM has exited; there is nothing to read."""

    def __init__(self, stop: StopEvent):
        what = f"exited with status {stop.code}" if stop.kind == "exited" else f"was killed by signal {stop.signal}"
        Exception.__init__(self, f"the target {what}")
        self.request, self.reply, self.stop = b"", b"", stop


class TargetRunning(RuntimeError):
    """A request that needs a stopped target, made while it runs.

    Raised before anything goes on the wire: a stub answers a running
    target's packets with nothing but the stop reply (QEMU takes the packet
    as a stop request and drops it), so the reply would be misread. Not a
    :class:`StubError`: the stub refused nothing, and code that treats a
    refusal as "not available" must not take this for one."""

    def __init__(self, request: bytes):
        what = request[:40].decode(errors="replace")
        super().__init__(f"the guest is running; stop it first (halt() or wait()) before sending {what!r}")
        self.request = request


class TargetStopped(RuntimeError):
    """:meth:`~vmscope.client.Client.wait` on a target that is not running:
    no stop reply would ever come."""

    def __init__(self):
        super().__init__("the guest is stopped: there is no stop to wait for (resume() or cont() first)")


class Unsupported(StubError):
    """The stub does not implement the request (empty reply)."""


class MemoryReadError(StubError):
    """Memory the stub could not read; ``addr`` is the first bad byte's page."""

    def __init__(self, addr: int, size: int, reply: bytes = b""):
        detail = f": stub replied {reply[:8].decode(errors='replace')}" if reply else ""
        Exception.__init__(self, f"cannot read memory at 0x{addr:x} (+{size} bytes){detail}")
        self.addr, self.size, self.request, self.reply = addr, size, b"", reply
