"""The client against stubs that misbehave. These faults cannot be made
with QEMU or vmscope's own stub, so a scripted fake stub (a real socket
on loopback, speaking the real framing) produces them: a reply that never
ends, one longer than anything we asked for, replies that keep failing
their checksum, one cut off by a disconnect, one that trickles a byte at a
time, one that does not parse. The client raises a clear, typed error
within its timeout, never hangs, and the introspection layer names the
read that failed."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from vmscope.arch.x86_64 import X86_64
from vmscope.client import BadReply, Client, ConnectionLost, StubTimeout
from vmscope.rsp.framing import Endpoint, Nack, Packet, frame

TIMEOUT = 2.0
SUPPORTED = b"PacketSize=4000;qXfer:features:read-;QStartNoAckMode-"


class FakeStub:
    """Answers the handshake like a real stub, then ``misbehave(request, sock)``
    for every later request. Runs in a thread; one client."""

    def __init__(self, misbehave):
        self.misbehave = misbehave
        self.on_nack = None  # what a '-' from the client gets (a real stub retransmits)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        ep = Endpoint()
        try:
            while not self.stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                for ev in ep.receive(data):
                    if isinstance(ev, Nack) and self.on_nack:
                        self.on_nack(conn)
                    if not isinstance(ev, Packet):
                        continue
                    conn.sendall(ep.data_to_send())  # our '+'
                    if ev.payload.startswith(b"qSupported"):
                        conn.sendall(frame(SUPPORTED))
                    elif ev.payload == b"?":
                        conn.sendall(frame(b"S05"))
                    elif ev.payload.startswith((b"qfThreadInfo",)):
                        conn.sendall(frame(b"m1"))
                    elif ev.payload.startswith(b"qsThreadInfo"):
                        conn.sendall(frame(b"l"))
                    elif ev.payload in (b"qAttached", b"qC", b"Hg1", b"Hg0", b"Hc-1", b"vCont?"):
                        conn.sendall(frame(b""))
                    else:
                        self.misbehave(ev.payload, conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def never_ending(req, conn, stub):
    conn.sendall(b"$")
    while not stub.stop.is_set():
        conn.sendall(b"00" * 512)
        time.sleep(0.01)


def oversized(req, conn, stub):
    conn.sendall(b"$" + b"00" * (5 << 20) + b"#00")  # 10 MiB, more than any reply we ask for


def bad_checksum(req, conn, stub):
    conn.sendall(b"$00000000#ff")  # and retransmitted as badly for every '-'
    stub.on_nack = lambda c: c.sendall(b"$00000000#ff")


def truncated_then_gone(req, conn, stub):
    conn.sendall(b"$0000")
    conn.close()


def trickle(req, conn, stub):
    for b in frame(b"00" * 64):
        if stub.stop.is_set():
            return
        conn.sendall(bytes([b]))
        time.sleep(0.5)


def not_hex(req, conn, stub):
    conn.sendall(frame(b"zz" * 8))


@pytest.fixture
def stub_for():
    stubs = []

    def make(misbehave):
        s = FakeStub(misbehave)
        stubs.append(s)
        return s

    yield make
    for s in stubs:
        s.close()


@pytest.mark.parametrize("misbehave, error, words", [
    (never_ending, StubTimeout, "no (complete )?answer"),
    (oversized, BadReply, "longer than"),
    (bad_checksum, BadReply, "corrupt packets"),
    (truncated_then_gone, ConnectionLost, "closed the connection"),
    (trickle, StubTimeout, "no (complete )?answer"),
    (not_hex, BadReply, "does not parse"),
], ids=["never-ending", "oversized", "bad-checksum", "truncated", "trickle", "not-hex"])
def test_client_raises_a_typed_error_within_its_timeout(stub_for, misbehave, error, words):
    stub = stub_for(misbehave)
    client = Client.connect(f"127.0.0.1:{stub.port}", timeout=TIMEOUT, arch=X86_64)
    t0 = time.monotonic()
    with pytest.raises(error, match=words):
        client.registers()
    assert time.monotonic() - t0 < TIMEOUT + 1.5, "the client must give up within its timeout"
    client.sock.close()


@pytest.mark.parametrize("misbehave", [never_ending, oversized, truncated_then_gone, not_hex],
                         ids=["never-ending", "oversized", "truncated", "not-hex"])
def test_introspection_names_the_read_that_failed(stub_for, misbehave):
    from vmscope.client.helpers.rsp import RspPhysicalMemory
    from vmscope.vmi.errors import PhysicalMemoryError

    stub = stub_for(lambda req, conn, s: conn.sendall(frame(b"OK")) if req.startswith(b"Qqemu") else
                    misbehave(req, conn, s))
    client = Client.connect(f"127.0.0.1:{stub.port}", timeout=TIMEOUT, arch=X86_64)
    phys = RspPhysicalMemory(client)
    t0 = time.monotonic()
    with pytest.raises(PhysicalMemoryError, match=r"physical 0x1234000\+64"):
        phys.read(0x1234000, 64)
    assert time.monotonic() - t0 < TIMEOUT + 1.5
    client.sock.close()
