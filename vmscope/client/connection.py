"""One RSP connection: packets over a socket, with timeouts, acks, console
output and the ``qSupported`` handshake. :class:`~vmscope.client.Client`
builds the debugger's operations on it.

The handshake says what went wrong when the other end is not a free GDB
stub, instead of a bare timeout: QEMU's QMP port (``--gdb`` given the
``--qmp`` address) greets with JSON, and a stub that already serves a
debugger (QEMU's and vmscope's serve one at a time) accepts the connection
and then says nothing.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from vmscope.client.errors import TargetRunning
import time

from vmscope.client.transport import BadReply, ConnectionLost, NotAGdbStub, StubBusy, StubTimeout
from vmscope.rsp import framing
from vmscope.rsp import packets as P

#: how much of what a peer sends before its first packet we keep, to name it
_PREAMBLE = 512
#: the longest reply taken from a stub: a full 1 MiB read in hex, escaped, with room to spare;
#: a longer one is a broken or hostile stub and must not grow our memory without bound
MAX_REPLY = 8 << 20
#: replies in a row that fail their checksum (ack mode) before we give up on the stub
MAX_CORRUPT = 3


@dataclass(frozen=True)
class Features:
    """What the stub said in its ``qSupported`` reply."""

    raw: dict[str, str | bool]

    def has(self, name: str) -> bool:
        return self.raw.get(name) is True

    @property
    def packet_size(self) -> int:
        value = self.raw.get("PacketSize")
        return int(value, 16) if isinstance(value, str) else 400


class Connection:
    """Packets to and from one stub. Not thread-safe, except :meth:`interrupt`."""

    CLIENT_FEATURES = P.Query("Supported", b"multiprocess-;swbreak+;hwbreak+;xmlRegisters=i386,aarch64;"
                              b"vContSupported+;binary-upload+")

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0):
        self.sock = sock
        self.timeout = timeout
        self.endpoint = framing.Endpoint(max_packet=MAX_REPLY)
        self._events: list[framing.Event] = []
        self._preamble = bytearray()  # bytes before the first packet (a QMP greeting, say)
        self._seen_packet = False
        self.console: list[str] = []  # text from O packets
        self.running = False
        self.features = self._negotiate()
        self.no_ack = False
        if self.features.has("QStartNoAckMode"):
            if self.request(P.Query("StartNoAckMode", set=True)) == b"OK":
                self.endpoint.disable_acks()
                self.no_ack = True

    # ------------------------------------------------------------ packets

    def _send(self, payload: bytes) -> None:
        self.endpoint.send(payload)
        self._flush()

    def _flush(self) -> None:
        data = self.endpoint.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError as e:
                raise ConnectionLost(f"connection to the stub broke while sending: {e}") from e

    def _recv_packet(self, timeout: float | None, waiting_for: str = "a reply") -> bytes:
        """Next packet payload; acks are absorbed and ``O`` console output
        is collected (it can arrive before any reply while running).

        ``timeout`` bounds the whole wait, not each read: a stub that
        trickles bytes, or streams a reply that never ends, raises
        :class:`StubTimeout` as one that is silent does; a reply longer than
        :data:`MAX_REPLY` or :data:`MAX_CORRUPT` corrupt ones in a row raise
        :class:`BadReply`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        corrupt = 0
        while True:
            while self._events:
                ev = self._events.pop(0)
                if isinstance(ev, framing.Packet):
                    self._flush()  # our '+' for it
                    self._seen_packet = True
                    return ev.payload
                if isinstance(ev, framing.BadPacket):
                    self._flush()  # the '-' asking for a retransmit
                    if ev.oversized:
                        raise BadReply(f"the stub sent a packet longer than {MAX_REPLY} bytes while we waited for "
                                       f"{waiting_for}; it starts {ev.raw[:40]!r}")
                    corrupt += 1
                    if corrupt >= MAX_CORRUPT:
                        raise BadReply(f"{corrupt} corrupt packets in a row while we waited for {waiting_for} "
                                       f"({ev.reason}; the last starts {ev.raw[:40]!r})")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise StubTimeout(f"no complete answer from the stub after {timeout} s while waiting for "
                                  f"{waiting_for}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise StubTimeout(f"no answer from the stub after {timeout} s while waiting for {waiting_for}") from None
            except OSError as e:
                raise ConnectionLost(f"connection to the stub broke while waiting for {waiting_for}: {e}") from e
            if not data:
                raise ConnectionLost(f"the stub closed the connection while we waited for {waiting_for}")
            if not self._seen_packet and len(self._preamble) < _PREAMBLE:
                self._preamble += data[: _PREAMBLE - len(self._preamble)]
                self._check_peer()
            self._events.extend(self.endpoint.receive(data))

    def _check_peer(self) -> None:
        """Before any packet: is this a GDB stub at all?"""
        text = bytes(self._preamble).lstrip()
        if text.startswith(b"{") and b'"QMP"' in text:
            raise NotAGdbStub("this is QEMU's QMP monitor, not its GDB stub: give QEMU's -gdb address "
                              "(e.g. tcp::1234) to --gdb and the QMP one to --qmp")

    def request(self, request: P.Request | bytes, timeout: float | None = None) -> bytes:
        """Send one request (a :mod:`vmscope.rsp.packets` request, or a raw
        payload) and return the reply's payload (skipping ``O`` console
        packets, whose text lands in :attr:`console`).

        Raises :class:`TargetRunning` while the target runs: a stub answers
        nothing then but the stop reply (QEMU even takes any packet as a stop
        request and drops it), so a request now would read the stop reply as
        its answer. :meth:`halt` or :meth:`wait` first."""
        payload = request if isinstance(request, bytes) else request.encode()
        if self.running:
            raise TargetRunning(payload)
        self._send(payload)
        what = f"the reply to {payload[:24].decode(errors='replace')!r}"
        while True:
            reply = self._recv_packet(timeout or self.timeout, what)
            if not self._console_text(reply):
                return reply

    def _console_text(self, payload: bytes) -> bool:
        """An ``O`` packet's text goes to :attr:`console` (True); anything else is a reply."""
        if payload.startswith(b"O") and payload != b"OK" and _is_hex(payload[1:]):
            self.console.append(bytes.fromhex(payload[1:].decode()).decode(errors="replace"))
            return True
        return False

    def interrupt(self) -> None:
        """Ask a running target to stop (the 0x03 byte); then wait for the stop."""
        try:
            self.sock.sendall(b"\x03")
        except OSError as e:
            raise ConnectionLost(f"connection to the stub broke while interrupting: {e}") from e

    # ------------------------------------------------------------ handshake

    def _negotiate(self) -> Features:
        try:
            reply = self.request(self.CLIENT_FEATURES)
            # QEMU stops a running guest when a debugger connects and sends that
            # stop reply unasked, ahead of our first answer: skip it.
            while re.fullmatch(rb"[ST][0-9a-fA-F]{2}.*", reply, re.S) and b"PacketSize" not in reply:
                reply = self._recv_packet(self.timeout, "the reply to qSupported")
        except StubTimeout as e:
            if self._preamble:
                raise NotAGdbStub(f"this peer does not speak the GDB remote protocol; it sent "
                                  f"{bytes(self._preamble[:80])!r}") from None
            raise StubBusy(f"{e}. The connection was accepted but nothing came back: a GDB stub serves one "
                           "debugger at a time (QEMU's and vmscope's do), so is another debugger attached?") from None
        raw: dict[str, str | bool] = {}
        for item in reply.decode(errors="replace").split(";"):
            if not item:
                continue
            if "=" in item:
                key, _, value = item.partition("=")
                raw[key] = value
            elif item[-1] in "+-?":
                raw[item[:-1]] = item[-1] == "+"
        return Features(raw)


def _is_hex(data: bytes) -> bool:
    return len(data) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in data)
