"""A client whose timeout fires while the stub works still gets every reply
in step, with acks on and off, against ``vmscope run --gdb`` (KVM and the
emulated CPU).

GDB sends ``-`` each time its ``remotetimeout`` (2 s by default) expires
while it waits for an answer, even in no-ack mode. A stub that answered each
``-`` with its previous reply put every later reply one behind its request
("Received too much data from the target" when the kernel symbol file took
4 s to build).
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.support import VmProcess, free_port, require_kvm
from vmscope.rsp.framing import Endpoint, Packet

pytestmark = pytest.mark.e2e


class RetryingClient:
    """A raw RSP client that sends ``-`` right after chosen requests, as GDB
    does when its timeout fires before the answer is there."""

    def __init__(self, port: int, *, no_ack: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.ep = Endpoint()
        self.pending: list[bytes] = []
        self.request(b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+")
        if no_ack:
            assert self.request(b"QStartNoAckMode") == b"OK"
            self.ep.disable_acks()

    def send(self, payload: bytes, nacks: int = 0) -> None:
        self.ep.send(payload)
        self.sock.sendall(self.ep.data_to_send() + b"-" * nacks)

    def receive(self, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.pending:
            if time.monotonic() > deadline:
                raise AssertionError("no reply")
            chunk = self.sock.recv(1 << 20)
            assert chunk, "stub closed the connection"
            self.pending += [ev.payload for ev in self.ep.receive(chunk) if isinstance(ev, Packet)]
            self.sock.sendall(self.ep.data_to_send())  # our '+' in ack mode
        return self.pending.pop(0)

    def request(self, payload: bytes, nacks: int = 0) -> bytes:
        self.send(payload, nacks)
        return self.receive()

    def quiet(self, seconds: float = 0.3) -> bytes:
        """Whatever the stub sends while we ask nothing (must be nothing)."""
        self.sock.settimeout(seconds)
        try:
            extra = self.sock.recv(1 << 20)
        except socket.timeout:
            extra = b""
        finally:
            self.sock.settimeout(20)
        return extra

    def close(self) -> None:
        try:
            self.send(b"D")
        finally:
            self.sock.close()


@pytest.fixture(params=["kvm", "emu"])
def stub(request):
    if request.param == "kvm":
        require_kvm()
    vm = VmProcess("--accel", request.param, "--cpus", "2", gdb_port=free_port())
    vm.wait_listening()
    yield vm
    vm.close()


@pytest.mark.parametrize("no_ack", [False, True], ids=["acks", "no-ack"])
def test_retrying_client_gets_every_reply_in_step(stub, no_ack):
    from elftools.elf.elffile import ELFFile

    from vmscope.guests import guest_elf

    with open(guest_elf("demo"), "rb") as f:
        syms = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()}
    requests = [b"?", b"qC", b"qfThreadInfo", b"g"] + [b"m%x,%x" % (syms[name], 8 + i)
                                                       for i, name in enumerate(("tick", "counter", "tick", "start64"))]
    client = RetryingClient(stub.port, no_ack=no_ack)
    try:
        # first without retries (the guest stays stopped throughout, so the answers do not change)
        expected = [client.request(r) for r in requests]
        assert len(set(expected)) == len(expected), "each request needs its own answer for this test to mean anything"
        got = []
        for i, req in enumerate(requests):
            got.append(client.request(req, nacks=1 + i % 3))  # the timeout fired 1-3 times before the answer
        assert got == expected
        assert client.quiet() == b"", "nothing stale may follow the last answer"
        if not no_ack:
            # with acks on, a '-' after an answer (before our '+') asks for it once more
            client.ep.send(b"qC")
            client.sock.sendall(client.ep.data_to_send())
            raw = b""
            while b"#" not in raw or len(raw) < raw.index(b"#") + 3:
                raw += client.sock.recv(4096)
            if raw.startswith(b"+"):
                raw = raw[1:]
            client.sock.sendall(b"-")
            again = client.sock.recv(4096)
            assert again == raw, (again, raw)
            client.sock.sendall(b"+")
            assert client.request(b"?") == expected[0]
    finally:
        client.close()
    assert stub.proc.poll() is None
