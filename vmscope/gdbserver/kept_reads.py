"""Replies to GDB's reads kept while the guest stays stopped, and the reads
GDB will make after a stop, answered before it asks.

Why: GDB repeats reads within one stop (a ``stepi`` reads the byte at pc
four times around one thread-list read), and on a virtual machine a reply
that comes after GDB went to sleep waiting for it pays for waking GDB's
vCPU (an interprocessor interrupt to a halted vCPU; docs/performance.md,
items 9, 11 and 12). A kept reply goes out microseconds after its request.

A kept reply is never one the target would answer differently: with the
guest stopped only the debugger changes its memory and registers, and any
request but a read or a breakpoint drops every kept reply first, as does a
stop. The age limit keeps a change made by another program (a write
through the RAM memfd of ``monitor memory``) from being hidden for longer
than a race between the two would hide it anyway. :class:`Session` owns
one :class:`KeptReads` and asks the target for what it does not hold.

A kept reply is also kept framed (:meth:`KeptReads.packet`), so the
transport can send it without parsing the request or building the packet
again: 3-4 us for a kept read instead of 5-14 us (docs/performance.md,
item 14). The sooner a reply goes out, the likelier GDB has not yet gone
to sleep waiting for it.
"""

from __future__ import annotations

from vmscope.rsp.framing import frame

#: Reads whose replies are kept: memory, registers, the thread list.
REUSABLE_READS = (b"m", b"x", b"g", b"p", b"qXfer:threads:read:")
#: Requests that change no reply a read gets, so they keep the replies:
#: breakpoints and watchpoints (Z/z). A stub's reads never show its own
#: breakpoints (gdbserver's ``check_mem_read`` does the same; every vmscope
#: target hides an INT3 it wrote from ``m``), and GDB removes its
#: breakpoints at every stop, between the thread list and its reads at pc.
KEEPS_READS = (b"Z", b"z")
#: How long a kept reply stays good, in seconds: GDB's repeats of one stop
#: come within a millisecond; a later read is answered afresh.
REUSE_SECONDS = 0.002
#: Replies longer than this are not kept (a dump's chunks are read once; a ``g`` reply fits).
REUSE_MAX_REPLY = 8192
REUSE_MAX_ENTRIES = 64
#: A memory read of at least this many bytes is a chunk of a dump: the
#: chunk after it is read ahead while GDB takes this one in
#: (:meth:`KeptReads.next_chunk`; GDB's ``dump memory`` asks for 512 KiB
#: at a time, the bytes it can take in a PacketSize of 1 MiB)...
READ_AHEAD_MIN = 64 * 1024
#: ... and stays good this long: GDB decodes 1 MiB of hex in 2-3 ms; a
#: reply older than this is read afresh (the age limit above, for a
#: reply GDB has not seen yet)
READ_AHEAD_SECONDS = 0.05
#: At most this many of one stop's reads are answered ahead at the next stop of its kind...
PREFETCH_MAX = 4
#: ... and remembered for at most this many kinds of stop
PREFETCH_KINDS = 32


class KeptReads:
    """The replies kept in one session, and what it expects GDB to read."""

    def __init__(self) -> None:
        self._replies: dict[bytes, tuple[float, bytes]] = {}
        self._packets: dict[bytes, bytes] = {}  # kept replies framed, by request (made on first use)
        # What GDB read after the last stop of each kind, and that stop's
        # pc: what the next stop of the kind answers ahead
        self._reads_since_stop: list[bytes] = []
        self._stop_pc: int | None = None
        self._stop_key: tuple | None = None
        self._reads_by_stop: dict[tuple, tuple[list[bytes], int | None]] = {}
        self._resumed_by = b""
        self._predicted: list[bytes] = []
        # a dump's next chunk: the read to make ahead, and the reply made
        self._next_chunk: bytes | None = None
        self._ahead: tuple[bytes, float, bytes, bytes | None] | None = None

    def reply(self, payload: bytes, now: float) -> bytes | None:
        """The kept reply to the read ``payload``, if young enough."""
        kept = self._replies.get(payload)
        if kept is not None and now - kept[0] < REUSE_SECONDS:
            return kept[1]
        ahead = self._ahead
        if ahead is not None and ahead[0] == payload:
            self._ahead = None  # read once: a dump does not come back to a chunk
            if now - ahead[1] < READ_AHEAD_SECONDS:
                self._next_chunk = ahead[3]
                return ahead[2]
        return None

    def packet(self, payload: bytes, now: float) -> bytes | None:
        """The kept reply to the read ``payload`` as the packet to send
        (``$...#cc``, run-length encoded as the stub sends replies),
        framed once per kept reply; None when :meth:`reply` has none."""
        reply = self.reply(payload, now)
        if reply is None:
            return None
        kept = self._replies.get(payload)
        if kept is None or kept[1] is not reply:  # a dump's chunk read ahead: sent once, not kept
            return frame(reply, rle=True)
        packet = self._packets.get(payload)
        if packet is None:
            packet = self._packets[payload] = frame(reply, rle=True)
        return packet

    def keep(self, payload: bytes, reply: bytes, now: float) -> None:
        if len(reply) <= REUSE_MAX_REPLY and not reply.startswith(b"E"):
            if len(self._replies) >= REUSE_MAX_ENTRIES:
                self._clear()
            self._replies[payload] = (now, reply)
            self._packets.pop(payload, None)

    def read_asked(self, payload: bytes) -> None:
        """GDB sent the read ``payload``: remembered for the next stop of this kind."""
        if len(self._reads_since_stop) < PREFETCH_MAX and payload not in self._reads_since_stop:
            self._reads_since_stop.append(payload)
        self._next_chunk = None

    def memory_read(self, addr: int, asked: int, got: int) -> None:
        """The target answered a read of ``asked`` bytes at ``addr`` with
        ``got`` bytes (a stub answers at most what fits its PacketSize).
        If it is a chunk of a dump, GDB asks next for as much again right
        after what it got (``m A,80000`` then ``m A+7fff0,80000``)."""
        if asked >= READ_AHEAD_MIN and got >= READ_AHEAD_MIN and addr + got + asked <= 1 << 64:
            self._next_chunk = b"m%x,%x" % (addr + got, asked)
        else:
            self._next_chunk = None

    def next_chunk(self) -> bytes | None:
        """The read GDB will send next if it is dumping memory (once)."""
        payload, self._next_chunk = self._next_chunk, None
        return payload

    def keep_ahead(self, payload: bytes, reply: bytes, now: float, following: bytes | None) -> None:
        """The reply to a read made ahead (:meth:`next_chunk`), and the
        chunk due once GDB has it."""
        if not reply.startswith(b"E"):
            self._ahead = (payload, now, reply, following)

    def other_request(self, payload: bytes) -> None:
        """GDB sent ``payload``, not a read: the replies go, unless it is a breakpoint."""
        if not payload.startswith(KEEPS_READS):
            self._clear()
            self._ahead = self._next_chunk = None

    def resumed(self, payload: bytes) -> None:
        """``payload`` resumed the guest: part of the kind of the next stop."""
        self._resumed_by = payload

    def stopped(self, kind: str, signal: int, pc: int | None) -> None:
        """A stop at ``pc``: drop the replies, and predict GDB's reads from
        what it read after the last stop of the same kind (the resume
        packet, the stop kind and signal): GDB's own step off a breakpoint
        (``vCont;s:1``) is followed by no read, a ``stepi``
        (``vCont;s:1;c``) or a breakpoint hit by the thread list and a read
        at pc."""
        self._clear()
        self._ahead = self._next_chunk = None
        if self._stop_key is not None:
            if len(self._reads_by_stop) >= PREFETCH_KINDS:  # resumes at many addresses (c ADDR): start over
                self._reads_by_stop.clear()
            self._reads_by_stop[self._stop_key] = (self._reads_since_stop, self._stop_pc)
        self._stop_key = (self._resumed_by, kind, signal)
        reads, old_pc = self._reads_by_stop.get(self._stop_key, ((), None))
        self._predicted = _predicted_reads(pc, reads, old_pc)
        self._reads_since_stop, self._stop_pc = [], pc

    def forget(self) -> None:
        """The guest ended or is running: nothing kept is good any more."""
        self._clear()
        self._ahead = self._next_chunk = None

    def _clear(self) -> None:
        self._replies.clear()
        self._packets.clear()

    def take_predicted(self) -> list[bytes]:
        """The reads to answer ahead at this stop (once)."""
        predicted, self._predicted = self._predicted, []
        return predicted


def _predicted_reads(pc: int | None, reads, old_pc: int | None) -> list[bytes]:
    """The reads GDB will send after a stop at ``pc``, judged by the
    ``reads`` it sent after the last stop of the same kind (at ``old_pc``):
    the same thread-list read, and a read at that pc made at this one's."""
    predicted = []
    for payload in reads:
        if payload.startswith(b"qXfer:threads:read:"):
            predicted.append(payload)
        elif payload[:1] == b"m" and old_pc is not None and pc is not None:
            addr, _, length = payload[1:].partition(b",")
            if addr == b"%x" % old_pc:
                predicted.append(b"m%x,%s" % (pc, length))
    return predicted
