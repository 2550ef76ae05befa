"""Sockets for the client: TCP ``host:port`` or a Unix socket path, with a
timeout on every wait so a vanished stub raises instead of hanging."""

from __future__ import annotations

import socket


class ConnectionLost(ConnectionError):
    """The stub closed the connection (or it broke) while we waited."""


class StubTimeout(TimeoutError):
    """The stub did not answer in time."""


class StubBusy(StubTimeout):
    """The handshake got no answer at all: the stub most likely serves
    another debugger (stubs serve one at a time and leave the next
    connection waiting, accepted but unanswered). QEMU takes that waiting
    connection once the other debugger leaves, and pauses the guest as it
    does on every connection: attach again (and detach) to let it run."""


class BadReply(ConnectionError):
    """The stub broke the protocol: a reply longer than any we asked for,
    replies that keep failing their checksum, or one that does not parse;
    the message says which request and what came back."""


class NotAGdbStub(ConnectionError):
    """The peer is not a GDB stub (QEMU's QMP port, say); the message names it."""


def parse_address(address: str | tuple[str, int]) -> tuple[int, object]:
    """``"host:port"``, ``("host", port)``, ``"unix:/path"`` or ``"/path"`` ->
    (socket family, sockaddr)."""
    if isinstance(address, tuple):
        return socket.AF_INET, address
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[5:]
    if address.startswith("/") or address.startswith("./"):
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad stub address {address!r}: expected HOST:PORT, unix:/path or /path")
    return socket.AF_INET, (host.strip("[]") or "localhost", int(port))


def open_socket(address: str | tuple[str, int], timeout: float) -> socket.socket:
    family, sockaddr = parse_address(address)
    if family == socket.AF_INET:
        sock = socket.create_connection(sockaddr, timeout=timeout)  # type: ignore[arg-type]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    return sock
