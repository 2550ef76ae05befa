"""The debugger served from the thread of the vCPU that runs alone.

Why: on a KVM target a single step is two hand-offs between threads, the
stub's to the vCPU's (which alone may enter KVM_RUN) and back with the stop;
each wakes a sleeping thread, about 20 us on a virtual machine, and GDB
steps one instruction per round trip; a breakpoint hit is a step and a
continue. So once the stub has started one vCPU running alone (a step, or
a continue with one vCPU online) it offers the connection to that vCPU
(:meth:`vmscope.kvm.runcontrol.RunControl.offer_debugger`): the vCPU's
thread, parked with the stop, sends the stop reply itself and answers the
requests GDB sends next (memory, registers, the thread list, breakpoints);
when the next request runs the same vCPU alone again it runs it in place,
with no hand-off at all. Anything else (a resume of several vCPUs, a
detach, a second packet in one read, acks still on) goes back to the
stub's thread unread, as does the connection when GDB pauses longer than
the poll window. While the vCPU runs, the stub's thread takes the offer
back after :data:`OFFER_WAIT` and watches the connection again (a Ctrl-C
is seen within that time).

Only one thread uses the connection, the session and the endpoint at a
time: the stub's thread waits while a vCPU's thread serves.
"""

from __future__ import annotations

import logging
import os
import select
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

    from vmscope.gdbserver.session import Session
    from vmscope.rsp.framing import Endpoint

log = logging.getLogger("vmscope.gdbserver")

#: requests a vCPU's thread answers (what GDB sends around a step or a
#: breakpoint hit); the stub's thread takes every other one
SERVED_FROM_VCPU = (b"m", b"x", b"g", b"p", b"qXfer:threads:", b"qfThreadInfo", b"qsThreadInfo", b"H", b"T",
                    b"vCont;", b"Z", b"z")
#: VMSCOPE_STUB_VCPU_SERVING=0 keeps every request in the stub's thread (to compare, or to rule this out)
ENABLED = os.environ.get("VMSCOPE_STUB_VCPU_SERVING", "1") != "0"
#: how long the stub's thread waits for a step to end before it takes back an offer no vCPU took
OFFER_WAIT = 0.05


class VcpuServing:
    """One connection's hand-offs to vCPU threads (see the module docstring);
    ``server`` is the :class:`~vmscope.gdbserver.transport.GdbServer` whose
    request handling and polling both threads use."""

    def __init__(self, server, conn: socket.socket, endpoint: Endpoint, session: Session,
                 rbuf: bytearray) -> None:
        self.server, self.conn, self.endpoint, self.session = server, conn, endpoint, session
        self.rbuf, self.rview = rbuf, memoryview(rbuf)
        self.target = server.target
        self.enabled = ENABLED and getattr(self.target, "serves_debugger_from_vcpu", False)
        self._back_r, self._back_w = os.pipe()  # a vCPU's thread gives the connection back through it
        os.set_blocking(self._back_r, False)  # drained without waiting; select waits for it
        self.handback: bytes | None = None  # a request a vCPU's thread read but left to the stub's
        self.lost = False  # the connection ended while a vCPU's thread served it

    def close(self) -> None:
        for fd in (self._back_r, self._back_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # --- the stub's thread ---------------------------------------------------------------

    def hand_off(self) -> bool:
        """After the stub answered a request: when it started a lone step,
        let the vCPU serve, wait until the connection is back and answer
        what the vCPU left. False when the connection ended meanwhile."""
        server = self.server
        while (self.enabled and self.session.running and not self.endpoint.ack_mode and not self.endpoint.pending
               and self.target.offer_debugger(self._serve)):
            self._wait_return()
            if self.lost:
                return False
            data, self.handback = self.handback, None
            if data is None:
                return True
            if not server._take_request(self.conn, self.endpoint, self.session, data):
                return False
        return True

    def _wait_return(self) -> None:
        """Not on the connection: a vCPU's thread reads it, and this thread
        waking for each request would take the interpreter lock from it
        (a switch CPython may delay by 5 ms). A Ctrl-C during a step that
        takes long waits for OFFER_WAIT, when the offer is taken back."""
        r, _, _ = select.select([self._back_r, self.server._wake_r], [], [], OFFER_WAIT)
        if self._back_r not in r and not self.target.withdraw_debugger():
            select.select([self._back_r], [], [])  # a vCPU serves: it gives back within a poll window
        self._drain()

    def _drain(self) -> None:
        try:
            while os.read(self._back_r, 64):
                pass
        except BlockingIOError:
            pass

    # --- a vCPU's thread -----------------------------------------------------------------

    def _serve(self, index: int) -> bool:
        """Runs in vCPU ``index``'s thread with the machine stopped. True
        keeps the offer (a step of this vCPU was started: its stop comes
        back here)."""
        try:
            if self._serve_requests(index):
                return True
        except Exception:  # a bug here must not end the vCPU's thread (and the VM)
            log.exception("serving the debugger from vCPU %d failed; the stub takes it back", index)
            self.lost = True
        os.write(self._back_w, b"x")
        return False

    def _serve_requests(self, index: int) -> bool:
        server, session, endpoint = self.server, self.session, self.endpoint
        event = self.target.take_stop()
        if event is None:
            return False
        log.debug("vCPU %d's thread serves the debugger from its stop", index)
        if session.running:
            endpoint.send(session.on_stop(event))
        try:
            server._send_reply(self.conn, endpoint.data_to_send())
        except OSError:
            self.lost = True
            return False
        session.prefetch()  # while GDB reads the stop reply
        if session.closed:  # the guest exited: "W" sent, the stub's thread ends the session
            return False
        while not server._closing:
            n = server._poll_request(self.conn, self.rbuf)
            if n is None:
                return False  # GDB paused: the stub's thread sleeps in select for it
            data = self.rview[:n].tobytes()
            if not self._servable(data):
                self.handback = data
                return False
            if not server._take_request(self.conn, endpoint, session, data):
                self.lost = True
                return False
            if session.closed:
                return False
            if session.running:
                return self.target.running_alone(index)
        return False

    def _servable(self, data: bytes) -> bool:
        """One whole packet, of a kind a vCPU's thread answers."""
        body = self.endpoint.lone_packet(data)
        return body is not None and body.startswith(SERVED_FROM_VCPU)
