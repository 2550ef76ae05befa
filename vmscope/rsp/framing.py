"""GDB Remote Serial Protocol framing, without I/O.

Bytes in, events out; payloads in, bytes out. The stub and the client both
feed whatever they read from their socket into :meth:`Endpoint.receive` and
write whatever :meth:`Endpoint.data_to_send` returns. Nothing here blocks,
reads a clock or touches a socket, so every line is testable with plain bytes
(the model is h11).

Wire format: ``$payload#cc`` where ``cc`` is the modulo-256 sum of the
payload bytes in two hex digits. Inside a payload ``}`` escapes the next byte
(XOR 0x20) and ``X*n`` repeats the previous byte ``ord(n) - 29`` more times
(run-length encoding). ``+``/``-`` acknowledge a packet until both sides
agree to ``QStartNoAckMode``; a lone 0x03 byte is an interrupt request;
``%payload#cc`` is an asynchronous notification.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Union
from zlib import adler32

ESCAPE = 0x7D  # '}'
RLE = 0x2A  # '*'
INTERRUPT = 0x03
#: bytes that must never appear raw in a payload we send
_MUST_ESCAPE = re.compile(rb"[$#}*]")


class FramingError(ValueError):
    """A payload that cannot be decoded (dangling escape, bad run length)."""


# --- events ------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """A well-formed packet; ``payload`` is unescaped and RLE-expanded."""

    payload: bytes


@dataclass(frozen=True)
class Notification:
    """A ``%name:data#cc`` asynchronous notification."""

    payload: bytes


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Nack:
    """The peer sent ``-``. In ack mode the last packet sent was queued again
    if the peer had not yet acknowledged it or sent anything newer; in no-ack
    mode nothing is retransmitted (a ``-`` there is GDB's note that its own
    timeout expired, not a request for a stale reply)."""


@dataclass(frozen=True)
class Interrupt:
    """The 0x03 byte (Ctrl-C in GDB)."""


@dataclass(frozen=True)
class BadPacket:
    """A packet that failed its checksum or could not be decoded. In ack
    mode a ``-`` has been queued so the peer retransmits. An ``oversized``
    one (longer than the endpoint's ``max_packet``) was acknowledged and
    discarded as it arrived, never buffered whole: the peer should get an
    error reply, not a retransmission request it would answer in kind."""

    raw: bytes
    reason: str
    oversized: bool = False


Event = Union[Packet, Notification, Ack, Nack, Interrupt, BadPacket]


# --- encoding helpers ----------------------------------------------------------


#: bodies from this size on are summed by :func:`zlib.adler32`, a chunk at a time
_LONG_BODY = 2048
#: adler32's first half is 1 + the sum of the bytes modulo 65521, exact
#: while the sum stays below it: 255 * 256 = 65,280 does
_SUM_CHUNK = 256


def checksum(data: bytes) -> int:
    """The RSP checksum: the sum of the bytes, modulo 256.

    gdb checks it even in no-ack mode, and for a memory reply (1 MiB of hex
    for a 512 KiB ``m``) ``sum()`` was most of the reply's cost: 2.3 of
    3.4-4.1 ms. Long bodies are summed by zlib's adler32 256 bytes at a
    time instead (its low half is 1 + the chunk's exact sum), 3x faster:
    0.8 ms per MiB. A hypothesis test checks both give the same."""
    n = len(data)
    if n < _LONG_BODY:
        return sum(data) & 0xFF
    view = memoryview(data)
    total = 0
    for off in range(0, n, _SUM_CHUNK):
        total += adler32(view[off : off + _SUM_CHUNK]) & 0xFFFF
    return (total - -(-n // _SUM_CHUNK)) & 0xFF


def _escape_one(m: re.Match) -> bytes:
    return bytes((ESCAPE, m.group()[0] ^ 0x20))


def escape(payload: bytes) -> bytes:
    """Escape the bytes that would break framing (``$ # } *``).

    Hex memory replies of 1 MiB need no escaping and must not cost a
    Python-level loop per byte.
    """
    # four memchr scans beat one regex scan by 30x on large clean payloads
    if b"$" not in payload and b"#" not in payload and b"}" not in payload and b"*" not in payload:
        return payload
    return _MUST_ESCAPE.sub(_escape_one, payload)


def decode(body: bytes) -> bytes:
    """Undo escapes and run-length encoding, in the single pass GDB uses:
    a repeat applies to the previous decoded byte."""
    if ESCAPE not in body and RLE not in body:
        return body
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        b = body[i]
        if b == ESCAPE:
            if i + 1 >= n:
                raise FramingError("escape character at end of packet")
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif b == RLE:
            if not out or i + 1 >= n:
                raise FramingError("run-length marker without a byte to repeat")
            count = body[i + 1] - 29
            if count < 0:
                raise FramingError(f"bad run length {body[i + 1]:#x}")
            out.extend(out[-1:] * count)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


#: longest run one ``X*n`` can stand for: X plus 97 repeats (n = '~')
_RLE_RUN = 98


def rle_encode(body: bytes) -> bytes:
    """Run-length encode an escaped payload, for replies.

    Only maximal runs of ``0`` and ``f`` are encoded (98 characters as
    ``0*~``): those are the hex digits of zeroed and 0xff memory, where
    encoding pays off, and ``bytes.replace`` finds them at C speed (a general
    run finder in Python costs more than it saves). GDB and LLDB expand runs
    in every packet they receive; QEMU never sends them. A dump of sparse
    guest RAM then crosses the wire (and GDB's per-character parser) about
    25 times smaller.
    """
    for c in (b"0", b"f"):
        body = body.replace(c * _RLE_RUN, c + b"*" + bytes((_RLE_RUN - 1 + 29,)))
    return body


class Encoded(bytes):
    """A payload already escaped and run-length encoded (:func:`hex_rle`):
    :func:`frame` sends it as is, with the checksum :meth:`with_checksum`
    computed ahead if it was (a dump's next chunk, made while GDB reads
    this one: ``Session.read_ahead``)."""

    checksum: int | None = None

    def with_checksum(self) -> Encoded:
        self.checksum = checksum(self)
        return self


_HEX_CHUNK = 4096  # raw bytes per chunk of hex_rle (a page)
_ZERO_CHUNK, _FF_CHUNK = bytes(_HEX_CHUNK), b"\xff" * _HEX_CHUNK
#: The encoding of a chunk of 0x00 / 0xff bytes: 8192 hex digits as 83 runs
#: of 98, then one run of 58 ("V" is 57 + 29).
_ZERO_HEX, _FF_HEX = b"0*~" * 83 + b"0*V", b"f*~" * 83 + b"f*V"


def hex_rle(data: bytes) -> Encoded:
    """Memory as a hex reply, run-length encoded (what :func:`frame` with
    ``rle=True`` makes of ``data.hex()``, run boundaries aside).

    Why not ``frame(data.hex(), rle=True)``: a 512 KiB read of zeroed guest
    RAM spent 3 ms in ``bytes.replace`` finding runs and 1 ms making the hex
    (docs/performance.md); here each all-zero or all-0xff page is one
    ``memcmp`` and a precomputed encoding, and the pages between are hexed
    and encoded in one piece.
    """
    n = len(data)
    out = []
    start = 0  # first byte not yet encoded
    for off in range(0, n - _HEX_CHUNK + 1, _HEX_CHUNK):
        chunk = data[off : off + _HEX_CHUNK]
        enc = _ZERO_HEX if chunk == _ZERO_CHUNK else _FF_HEX if chunk == _FF_CHUNK else None
        if enc is not None:
            if start < off:
                out.append(rle_encode(binascii.hexlify(data[start:off])))
            out.append(enc)
            start = off + _HEX_CHUNK
    if start < n:
        out.append(rle_encode(binascii.hexlify(data[start:] if start else data)))
    return Encoded(b"".join(out))


def frame(payload: bytes, *, rle: bool = False, notification: bool = False) -> bytes:
    """``$payload#cc`` with escaping (and RLE if asked); an :class:`Encoded`
    payload is sent as it is."""
    if isinstance(payload, Encoded):
        body, total = payload, payload.checksum
    else:
        body, total = escape(payload), None
        if rle:
            body = rle_encode(body)
    if total is None:
        total = checksum(body)
    # one copy of a long body, not three (a memory reply is 1 MiB of hex)
    return b"".join((b"%" if notification else b"$", body, b"#", b"%02x" % total))


# --- the endpoint --------------------------------------------------------------


class Endpoint:
    """One side of an RSP connection: parser, ack handling, retransmission.

    ``receive(data)`` returns events in order; outgoing bytes (packets, acks
    and retransmissions) accumulate until :meth:`data_to_send`.
    """

    #: a packet larger than this is dropped as garbage (and nacked)
    MAX_PACKET = 16 * 1024 * 1024

    def __init__(self, *, rle_replies: bool = False, max_packet: int | None = None) -> None:
        self.ack_mode = True
        self.rle_replies = rle_replies
        self.max_packet = max_packet or self.MAX_PACKET
        self._discarding = False  # inside an oversized packet: skip to its '#cc'
        self._buf = bytearray()
        self._out = bytearray()
        self._last_sent: bytes | None = None
        self._scanned = 0  # bytes of an incomplete packet already searched for '#'

    # output
    def send(self, payload: bytes) -> None:
        raw = frame(payload, rle=self.rle_replies)
        self._last_sent = raw
        self._out += raw

    def send_notification(self, payload: bytes) -> None:
        self._out += frame(payload, notification=True)

    def send_interrupt(self) -> None:
        self._out.append(INTERRUPT)

    @property
    def pending(self) -> int:
        """Bytes queued for :meth:`data_to_send`."""
        return len(self._out)

    def data_to_send(self) -> bytes:
        data, self._out = bytes(self._out), bytearray()
        return data

    @property
    def buffered(self) -> int:
        """Bytes received of a packet not yet complete."""
        return len(self._buf)

    def lone_packet(self, data: bytes) -> bytes | None:
        """The body of ``data`` (still escaped) when ``data`` is one whole
        packet, in no-ack mode, with no other packet partly received or
        being skipped: a debugger's usual read, since it waits for each
        reply. None otherwise. :meth:`receive` and the stub's fast paths
        take such a read without the general parse."""
        if (not self.ack_mode and not self._buf and not self._discarding and len(data) >= 4
                and data[0] == 0x24 and data[-3] == 0x23 and data.find(b"$", 1) < 0
                and data.find(b"#", 1) == len(data) - 3 and len(data) - 3 <= self.max_packet):
            return data[1:-3]
        return None

    def disable_acks(self) -> None:
        """Call after the ``OK`` to ``QStartNoAckMode`` was queued (stub) or
        received (client): from then on no ``+``/``-`` is sent or expected."""
        self.ack_mode = False

    # input
    def receive(self, data: bytes) -> list[Event]:
        # The common case first: in no-ack mode a read is one whole request
        # and nothing waits in the buffer (a debugger waits for each reply),
        # and its checksum is not checked (see _packet). The general parse
        # below gives the same event for it, in about three times the time.
        body = self.lone_packet(data)
        if body is not None:
            try:
                payload = decode(body)
            except FramingError:
                pass  # the general parse reports it
            else:
                self._last_sent = None
                return [Packet(payload)]
        self._buf += data
        events: list[Event] = []
        buf = self._buf
        i = 0
        n = len(buf)
        while i < n:
            if self._discarding:  # the rest of an oversized packet ('#' never occurs raw inside one)
                end = buf.find(b"#", i)
                if end < 0 or end + 2 >= n:
                    i = n if end < 0 else end  # keep '#' and what follows until the checksum is here
                    break
                self._discarding = False
                i = end + 3
                continue
            c = buf[i]
            if c == 0x24 or c == 0x25:  # '$' or '%'
                end = buf.find(b"#", max(i + 1, self._scanned))
                if end < 0 and n - i > self.max_packet or end - i > self.max_packet:
                    # Refused as it arrives: the buffer never holds more than max_packet of it.
                    events.append(BadPacket(bytes(buf[i : i + 64]),
                                            f"packet longer than {self.max_packet} bytes", oversized=True))
                    if self.ack_mode:
                        self._out.append(0x2B)  # taken (and refused): a retransmission would be as long
                    self._discarding = end < 0
                    self._scanned = 0
                    i = n if end < 0 else end + 3
                    continue
                if end < 0:
                    self._scanned = n
                    break
                if end + 2 >= n:
                    break  # checksum not here yet
                body = bytes(buf[i + 1 : end])
                cs_text = bytes(buf[end + 1 : end + 3])
                i = end + 3
                events.append(self._packet(c, body, cs_text))
            elif c == 0x2B:  # '+'
                self._last_sent = None  # delivered: a later '-' is not about it
                events.append(Ack())
                i += 1
            elif c == 0x2D:  # '-'
                self._retransmit()
                events.append(Nack())
                i += 1
            elif c == INTERRUPT:
                events.append(Interrupt())
                i += 1
            else:
                i += 1  # line noise between packets is ignored, as GDB does
        del buf[:i]
        self._scanned = max(0, self._scanned - i) if self._buf else 0
        return events

    def _retransmit(self) -> None:
        """Answer a ``-``: queue the last packet once more, in ack mode only.

        A reply is retransmitted only while it is the newest thing on the
        wire: once the peer has acknowledged it or sent a newer packet, a
        ``-`` cannot be about it. GDB sends ``-`` when its own
        ``remotetimeout`` expires while the stub is still working on the
        answer, even in no-ack mode; re-sending the previous reply then would
        put every later reply one behind its request (GDB's own gdbserver
        ignores ``-`` in no-ack mode for the same reason).
        """
        if self.ack_mode and self._last_sent is not None:
            self._out += self._last_sent

    def _packet(self, start: int, body: bytes, cs_text: bytes) -> Event:
        raw = bytes([start]) + body + b"#" + cs_text
        try:
            expected = int(cs_text, 16)
        except ValueError:
            expected = -1
        # In no-ack mode the checksum is still sent but need not be checked
        # (GDB ignores it too); a corrupt packet is then caught by parsing.
        if self.ack_mode and expected != checksum(body):
            self._nack()
            return BadPacket(raw, f"checksum {cs_text!r} != {checksum(body):02x}")
        try:
            payload = decode(body)
        except FramingError as e:
            self._nack()
            return BadPacket(raw, str(e))
        if start == 0x25:
            return Notification(payload)
        # a newer packet from the peer: whatever we sent before has arrived,
        # and a '-' from now on concerns the answer to this one
        self._last_sent = None
        if self.ack_mode:
            self._out.append(0x2B)
        return Packet(payload)

    def _nack(self) -> None:
        if self.ack_mode:
            self._out.append(0x2D)
