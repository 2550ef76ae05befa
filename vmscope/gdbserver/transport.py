"""Sockets for the stub: listen, serve one debugger at a time, clean up.

The loop selects on the client socket and the target's stop descriptor, so
a Ctrl-C (0x03) reaches a running target at once and a stop is reported as
soon as it happens. Whatever way a client leaves (``detach``, ``kill``, a
closed socket, gdb killed with SIGKILL) the guest is stopped if needed, every
breakpoint and watchpoint is removed, and the guest resumes; the listener
then accepts the next client.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from typing import Callable

from vmscope.gdbserver.session import PACKET_SIZE, Session
from vmscope.gdbserver.target import StopEvent, Target
from vmscope.gdbserver.vcpu_serving import VcpuServing
from vmscope.rsp.framing import BadPacket, Endpoint, Interrupt, Packet, frame

log = logging.getLogger("vmscope.gdbserver")

#: how long a vanished client's running target gets to stop before cleanup
STOP_TIMEOUT = 10.0
#: how long a reply may wait for a client that does not read (then it is dropped, its breakpoints removed)
SEND_TIMEOUT = float(os.environ.get("VMSCOPE_STUB_SEND_TIMEOUT", "30"))
#: the longest packet taken from a debugger: our PacketSize and a little framing; longer ones get an error
#: reply as they arrive, so a client cannot make the stub buffer without bound
MAX_INCOMING = PACKET_SIZE + 64
#: the error a too-long packet gets (EINVAL)
TOO_LONG_REPLY = b"E16"
#: what a second debugger gets while one is attached (an error reply with text; GDB prints it)
BUSY_REPLY = b"E.vmscope: another debugger is attached to this stub; it serves one at a time"
#: bytes read from the debugger's socket at once (a 1 MiB ``X`` packet takes a few reads)
RECV_SIZE = 1 << 20
#: how long the stub polls for the debugger's next request after a reply while the guest is
#: stopped, before it sleeps in select (see ``GdbServer._poll_request``); 0 turns polling off
POLL_WINDOW = float(os.environ.get("VMSCOPE_STUB_POLL_US", "300")) / 1e6


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``PORT``, ``:PORT``, ``HOST:PORT`` or ``[v6]:PORT`` -> (host, port)
    (``unix:PATH`` is for :class:`GdbServer`'s ``unix``, see ``vmscope run``).

    The default host is loopback: a stub gives full control of the guest,
    so it is only reachable from elsewhere when the user says so.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}: expected [HOST:]PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} out of range 0-65535")
    return host, number


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listening address) is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


NO_AUTH_WARNING = ("the GDB stub listens on {where}, reachable from other machines; the protocol has no "
                   "authentication: whoever connects controls the guest")


class GdbServer:
    """A listener serving one GDB client at a time for one target: TCP
    (``host``, ``port``), or a Unix socket at ``unix`` created with mode
    0600, so only its owner can connect (as Firecracker and Cloud
    Hypervisor do for their API sockets)."""

    def __init__(self, target: Target, host: str = "127.0.0.1", port: int = 1234, *, unix: str | None = None) -> None:
        self.target = target
        self.unix_path = unix
        if unix is not None:
            self.listener = self._unix_listener(unix)
            self.address = (unix, None)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.listener.bind((host, port))
            except OSError:
                self.listener.close()
                raise
            self.address = self.listener.getsockname()[:2]
        self.listener.listen(1)
        self._wake_r, self._wake_w = os.pipe()
        self._closing = False
        self.killed = threading.Event()
        self.clients_served = 0

    @staticmethod
    def _unix_listener(path: str) -> socket.socket:
        """Bind a Unix socket at ``path`` with mode 0600 from the start (no
        window where another user could connect). A stale socket file left
        by a dead VMM is replaced; anything else at ``path`` is an error."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody listens: a stale socket
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: another stub listens there")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return listener

    @property
    def where(self) -> str:
        """Where GDB connects, as the user types it (``target remote WHERE``)."""
        if self.unix_path is not None:
            return self.unix_path
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def reachable_from_elsewhere(self) -> bool:
        return self.unix_path is None and not is_loopback(self.address[0])

    # --- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Stop serving (from any thread); the current client is dropped
        after its breakpoints are removed."""
        if not self._closing:
            self._closing = True
            os.write(self._wake_w, b"x")

    def serve_forever(self, on_client: Callable[[tuple], None] | None = None) -> None:
        try:
            while not self._closing and not self.killed.is_set():
                r, _, _ = select.select([self.listener, self._wake_r], [], [])
                if self._wake_r in r:
                    break
                conn, peer = self.listener.accept()
                if on_client:
                    on_client(peer)
                self.clients_served += 1
                try:
                    self.serve_client(conn)
                finally:
                    conn.close()
        finally:
            self.listener.close()
            if self.unix_path is not None:
                try:
                    os.unlink(self.unix_path)
                except OSError:
                    pass

    # --- one client -----------------------------------------------------------

    def serve_client(self, conn: socket.socket) -> None:
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = self.target
        # A previous client may have left the guest running: stop it first,
        # so the new one attaches to a stopped target, as GDB expects.
        if target.is_running():
            target.interrupt()
            self._wait_stop()
        target.take_stop()
        session = Session(target)
        endpoint = Endpoint(rle_replies=True, max_packet=MAX_INCOMING)
        conn.settimeout(SEND_TIMEOUT)  # reads wait in select(); this bounds sendall to a client that stopped reading
        stop_fd = target.stop_fd()
        # One receive buffer for the connection: ``recv(1 MiB)`` would
        # allocate (mmap), shrink (mremap) and free (munmap) a fresh 1 MiB
        # object per packet, 14 µs of a 50 µs round trip (docs/performance.md).
        rbuf = bytearray(RECV_SIZE)
        rview = memoryview(rbuf)
        handoff = VcpuServing(self, conn, endpoint, session, rbuf)
        try:
            while not session.closed:
                if POLL_WINDOW and not session.running and not endpoint.pending and not self._closing:
                    n = self._poll_request(conn, rbuf)
                    if n is not None:  # the debugger's next request, taken without sleeping
                        if not self._take_request(conn, endpoint, session, rview[:n].tobytes()):
                            break
                        if not handoff.hand_off():
                            break
                        continue
                if session.running and not endpoint.pending:
                    # A stop may be posted already (the emulated CPU runs a step in
                    # the thread that resumed it): report it without a select.
                    event = target.take_stop()
                    if event is not None:
                        self._report_stop(conn, endpoint, session, event)
                        continue
                r, _, _ = select.select([conn, stop_fd, self._wake_r, self.listener], [], [])
                closing = self._wake_r in r
                # A stop first, even when closing: the VMM closes the stub
                # right after the guest exits, and GDB must still get "W".
                if stop_fd in r or (closing and session.running):
                    event = target.take_stop()
                    if event is not None and session.running:
                        self._report_stop(conn, endpoint, session, event)
                    elif event is not None:
                        log.debug("stop while not running ignored: %s", event)
                if closing:
                    self._flush(conn, endpoint)
                    break
                if conn in r:
                    try:
                        n = conn.recv_into(rbuf)
                    except OSError:
                        n = 0
                    if not self._take_request(conn, endpoint, session, rview[:n].tobytes()):
                        break
                    if not handoff.hand_off():
                        break
                elif endpoint.pending:
                    self._flush(conn, endpoint)
                # after the client's own input: a "D" and a close queued there end this session first
                if self.listener in r and not session.closed and self._still_connected(conn):
                    self._turn_away()
        finally:
            handoff.close()
            if session.killed:
                self.killed.set()
            elif not session.closed:
                self._abandon(session)

    @classmethod
    def _report_stop(cls, conn: socket.socket, endpoint: Endpoint, session: Session, event) -> None:
        """Send the stop reply now, then answer ahead the reads GDB will
        make after it (:meth:`Session.prefetch`) while GDB reads it."""
        endpoint.send(session.on_stop(event))
        cls._flush(conn, endpoint)
        session.prefetch()

    def _take_request(self, conn: socket.socket, endpoint: Endpoint, session: Session, data: bytes) -> bool:
        """Answer what one read brought; False when the connection ended."""
        if not data:
            log.info("debugger connection closed")
            return False
        try:
            self._answer(conn, endpoint, session, data)
        except OSError as e:  # a send timed out (the client stopped reading) or the peer went away
            log.info("debugger connection lost while sending: %s", e or "timed out")
            return False
        return True

    @staticmethod
    def _poll_request(conn: socket.socket, rbuf: bytearray) -> int | None:
        """Wait for the debugger's next request by polling the socket for
        up to POLL_WINDOW seconds, without sleeping: bytes read (0 at EOF),
        or None when none came (then the loop sleeps in ``select``).

        Why: while the guest is stopped, GDB sends its requests one after
        another (a ``stepi`` is six), each as soon as the last reply is in.
        A thread asleep in ``select`` is woken by the kernel, and on a
        virtual machine that wake-up costs about 20 us, a third of a small
        request's round trip; polling keeps this side awake for the next
        one (KVM polls a halted vCPU for the same reason, halt_poll_ns).
        Only while the guest is stopped: then no vCPU thread needs the
        interpreter or the CPU, and a quiet debugger costs one window of
        CPU time per reply. The socket is non-blocking (it has a send
        timeout), so a read with nothing there returns at once."""
        fd = conn.fileno()
        deadline = time.perf_counter() + POLL_WINDOW
        while True:
            try:
                return os.readv(fd, [rbuf])
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return None
                os.sched_yield()
            except OSError:
                return 0

    def _answer(self, conn: socket.socket, endpoint: Endpoint, session: Session, data: bytes) -> None:
        """Handle what one read brought and send the replies. A batch of
        requests is answered as it goes once a PacketSize is queued, so a
        client that does not read holds back its next request, not our
        memory; a send that cannot finish in SEND_TIMEOUT raises."""
        packet = self._kept_packet(endpoint, session, data)
        if packet is not None:
            self._send_reply(conn, packet)
            session.read_ahead()
            return
        for event in endpoint.receive(data):
            if isinstance(event, Packet):
                reply = session.handle(event.payload)
                if reply is not None:
                    endpoint.send(reply)
                    if endpoint.pending > PACKET_SIZE:
                        conn.sendall(endpoint.data_to_send())
                if session.noack_pending:
                    conn.sendall(endpoint.data_to_send())
                    endpoint.disable_acks()
                    session.noack_pending = False
                if session.closed:
                    break
            elif isinstance(event, Interrupt):
                session.interrupt()
            elif isinstance(event, BadPacket):
                log.warning("bad packet from debugger: %s", event.reason)
                if event.oversized:
                    endpoint.send(TOO_LONG_REPLY)
        out = endpoint.data_to_send()
        if out:
            self._send_reply(conn, out)
            session.read_ahead()  # a dump's next chunk, while GDB decodes this one

    @staticmethod
    def _kept_packet(endpoint: Endpoint, session: Session, data: bytes) -> bytes | None:
        """The reply to ``data`` straight from the session's kept replies,
        when ``data`` is one whole request in no-ack mode with nothing
        buffered or queued: what ``endpoint.receive`` and ``session.handle``
        would give, in 3-4 us instead of 5-14 us (docs/performance.md, item 14).
        Anything else (two packets in one read, an interrupt byte, a request
        that is not a kept read) goes the long way."""
        body = None if endpoint.pending else endpoint.lone_packet(data)
        return None if body is None else session.kept_packet(body)

    @staticmethod
    def _send_reply(conn: socket.socket, data: bytes) -> None:
        """``conn.sendall(data)`` less a system call: CPython polls a socket
        that has a timeout before each send, and a reply to a stopped target
        fits the socket's buffer. One write on the (non-blocking) socket;
        only what does not fit goes through sendall and its send timeout."""
        try:
            sent = os.write(conn.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            conn.sendall(memoryview(data)[sent:])

    @staticmethod
    def _still_connected(conn: socket.socket) -> bool:
        """Whether the attached client is still there: the next one often
        connects before the stub has read the previous one's EOF, and must
        then wait its turn, not be turned away."""
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return True  # nothing to read: connected and quiet
        try:  # readable: data or EOF is there, so this does not wait (the socket has a send timeout)
            return conn.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _turn_away(self) -> None:
        """A second debugger while one is attached: tell it why, in the
        reply it waits for, instead of leaving it to time out unanswered
        in the listen backlog."""
        try:
            other, peer = self.listener.accept()
        except OSError:
            return
        log.warning("refused a second debugger (%s): one is attached", peer or "unix socket")
        try:
            other.settimeout(1.0)
            other.recv(4096)  # its first request (qSupported): read, so closing does not reset the reply away
            other.sendall(b"+" + frame(BUSY_REPLY))
            other.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            other.close()

    @classmethod
    def _flush(cls, conn: socket.socket, endpoint: Endpoint) -> None:
        try:
            cls._send_reply(conn, endpoint.data_to_send())
        except OSError:
            pass

    def _wait_stop(self) -> StopEvent | None:
        r, _, _ = select.select([self.target.stop_fd()], [], [], STOP_TIMEOUT)
        return self.target.take_stop() if r else None

    def _abandon(self, session: Session) -> None:
        """The client vanished: leave the guest running and unpatched."""
        target = self.target
        try:
            if session.running:
                target.interrupt()
                if self._wait_stop() is None:
                    log.error("target did not stop within %.0f s; breakpoints may remain", STOP_TIMEOUT)
                    return
                session.running = False
            session.cleanup()
            target.detach()
            log.info("debugger gone: breakpoints removed, guest resumed")
        except Exception:
            log.exception("cleanup after a vanished debugger failed")


def serve(target: Target, host: str = "127.0.0.1", port: int = 1234) -> GdbServer:
    """Start a stub for ``target`` in a daemon thread; returns the server
    (``server.address`` has the bound port when ``port`` was 0)."""
    server = GdbServer(target, host, port)
    threading.Thread(target=server.serve_forever, name="gdbstub", daemon=True).start()
    return server
