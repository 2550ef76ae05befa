"""Why a target stopped: the one stop type both ends of the protocol use.

The stub's targets produce :class:`StopEvent`s and the session turns them
into ``T``/``W``/``X`` replies; the client turns those replies back into the
same type (:func:`stop_event`). It lives here, in the protocol package,
rather than in the stub's, so the client does not depend on the stub and
the stub's targets do not depend on the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SIGTRAP = 5  # GDB's signal numbers are the protocol's, not the host's

StopKind = Literal["signal", "swbreak", "hwbreak", "watch", "rwatch", "awatch", "exited", "terminated"]


@dataclass(frozen=True)
class StopEvent:
    """Why the target stopped, as reported in a ``T``/``W``/``X`` stop reply.

    ``tid`` is the thread that caused the stop (the one GDB should select).
    For watchpoints ``addr`` is the watched data address that was accessed.
    For ``exited``/``terminated`` ``code`` is the exit status or signal.
    """

    kind: StopKind = "signal"
    tid: int = 1
    signal: int = SIGTRAP
    addr: int | None = None
    code: int = 0


def stop_event(payload: bytes) -> StopEvent:
    """A stop reply payload (``T05thread:1;swbreak:;``, ``W00``...) as a
    :class:`StopEvent`; a reply without a thread names thread 1. Raises
    :class:`~vmscope.rsp.packets.ProtocolError` for anything else."""
    from vmscope.rsp.packets import parse_stop_reply

    reply = parse_stop_reply(payload)
    tid = reply.tid if reply.tid is not None else 1
    if reply.kind == "exited":
        return StopEvent("exited", tid=tid, code=reply.code)
    if reply.kind == "terminated":
        return StopEvent("terminated", tid=tid, signal=reply.signal)
    kind = reply.reason or "signal"
    return StopEvent(kind, tid=tid, signal=reply.signal, addr=reply.addr)  # type: ignore[arg-type]
