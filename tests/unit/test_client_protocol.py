"""The client against small scripted stubs on real sockets. The stubs use
vmscope's own RSP framing for their side and mimic QEMU's quirks: no
no-ack mode, no ``x``, ``m`` replies capped at 2048 bytes, a whole ``m``
failing with E14 if it touches one unmapped byte, an unsolicited stop reply
on connect, and a target.xml with an undeclared ``xi:include``."""

from __future__ import annotations

import socket
import threading

import pytest

from vmscope.client import Client, ConnectionLost, MemoryReadError, StubTimeout
from vmscope.rsp import framing

pytestmark = pytest.mark.timeout(60)

TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>'
              b'<architecture>i386:x86-64</architecture><xi:include href="regs.xml"/></target>')
REGS_XML = (b'<?xml version="1.0"?><feature name="org.gnu.gdb.i386.core">'
            b'<reg name="rax" bitsize="64"/><reg name="rip" bitsize="64" type="code_ptr"/>'
            b'<reg name="eflags" bitsize="32"/><reg name="cr3" bitsize="64" regnum="3"/></feature>')

PAGE = 4096
MEM_BASE = 0x10000
MEMORY = bytearray(bytes(range(256)) * (3 * PAGE // 256))
UNMAPPED_PAGE = MEM_BASE + PAGE  # the middle page fails, as unmapped memory does in QEMU


class ScriptedStub:
    """Serves one connection on a thread; ``behaviour`` picks the quirks."""

    def __init__(self, behaviour: str = "qemu", unix_path: str | None = None):
        self.behaviour = behaviour
        if unix_path:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(unix_path)
            self.address = unix_path
        else:
            self.listener = socket.socket()
            self.listener.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.listener.listen(1)
        self.requests: list[bytes] = []
        self.raw_in = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, ep: framing.Endpoint, conn: socket.socket, payload: bytes) -> None:
        ep.send(payload)
        data = ep.data_to_send()
        if self.behaviour == "corrupt" and payload.startswith(b"T05") and not getattr(self, "_corrupted", False):
            self._corrupted = True  # first stop reply goes out with a wrong checksum
            data = data[:-2] + (b"00" if data[-2:] != b"00" else b"11")
        conn.sendall(data)

    def _serve(self):
        conn, _ = self.listener.accept()
        if conn.family == socket.AF_INET:  # no Nagle delay between '+' and the reply
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ep = framing.Endpoint()
        if self.behaviour == "qemu":
            ep.send(b"T02thread:01;")  # QEMU's stop reply, sent before anything is asked
            conn.sendall(ep.data_to_send())
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                self.raw_in += data
                for ev in ep.receive(data):
                    if isinstance(ev, framing.Nack):
                        self.nacks = getattr(self, "nacks", 0) + 1
                        conn.sendall(ep.data_to_send())  # the endpoint queued the retransmission
                    if isinstance(ev, framing.Packet):
                        if ep.data_to_send():  # our '+'
                            conn.sendall(b"+")
                        if self._handle(ep, conn, ev.payload) == "close":
                            return

    def _handle(self, ep, conn, p: bytes):
        self.requests.append(p)
        if self.behaviour == "silent" and p.startswith(b"m"):
            return None  # never answers
        if self.behaviour == "drop" and p.startswith(b"m"):
            conn.close()
            return "close"
        if p.startswith(b"qSupported"):
            feats = b"PacketSize=1000;qXfer:features:read+;vContSupported+"
            if self.behaviour == "noack":
                feats += b";QStartNoAckMode+"
            return self._reply(ep, conn, feats)
        if p == b"QStartNoAckMode":
            self._reply(ep, conn, b"OK")
            ep.disable_acks()
            return None
        if p.startswith(b"qXfer:features:read:"):
            annex, _, rng = p[len(b"qXfer:features:read:"):].partition(b":")
            off, length = (int(x, 16) for x in rng.split(b","))
            doc = TARGET_XML if annex == b"target.xml" else REGS_XML
            piece = doc[off : off + length]
            return self._reply(ep, conn, (b"l" if off + length >= len(doc) else b"m") + piece)
        if p == b"?":
            return self._reply(ep, conn, b"T05thread:01;")
        if p == b"vCont?":
            return self._reply(ep, conn, b"vCont;c;C;s;S")
        if p.startswith(b"vCont;"):
            return self._reply(ep, conn, b"T05thread:01;")  # stops again at once
        if p == b"g":
            return self._reply(ep, conn, (0x1111).to_bytes(8, "little").hex().encode()
                               + (0x401000).to_bytes(8, "little").hex().encode() + b"46020000")
        if p.startswith(b"p3"):
            return self._reply(ep, conn, (0x2660000).to_bytes(8, "little").hex().encode())
        if p.startswith(b"m"):
            addr, length = (int(x, 16) for x in p[1:].split(b","))
            length = min(length, 2048)  # QEMU's m replies carry at most 2048 bytes
            end = addr + length
            if not (MEM_BASE <= addr and end <= MEM_BASE + len(MEMORY)) or \
                    (addr < UNMAPPED_PAGE + PAGE and end > UNMAPPED_PAGE):
                return self._reply(ep, conn, b"E14")
            return self._reply(ep, conn, MEMORY[addr - MEM_BASE : end - MEM_BASE].hex().encode())
        return self._reply(ep, conn, b"")


def test_qemu_like_stub_handshake_registers_and_xinclude():
    stub = ScriptedStub("qemu")
    with Client.connect(stub.address, timeout=10) as c:
        assert not c.no_ack and c.features.packet_size == 0x1000
        assert c.last_stop.kind == "signal" and c.last_stop.signal == 5
        assert [r.name for r in c.layout.registers] == ["rax", "rip", "eflags", "cr3"]
        assert c.layout["cr3"].regnum == 3
        regs = c.registers()
        assert regs["rax"] == 0x1111 and regs["rip"] == 0x401000 and regs["eflags"] == 0x246
        assert c.register("cr3") == 0x2660000  # not in g: fetched with p


def test_reads_split_to_packet_size_and_retry_around_a_bad_page():
    stub = ScriptedStub("qemu")
    with Client.connect(stub.address, timeout=10) as c:
        first = c.read_memory(MEM_BASE, PAGE)
        assert first == bytes(MEMORY[:PAGE])
        assert max(int(r.split(b",")[1], 16) for r in stub.requests if r[:1] == b"m") * 2 <= 0x1000
        data, holes = c.read_memory_partial(MEM_BASE, 3 * PAGE)
        assert holes == [(UNMAPPED_PAGE, PAGE)]
        assert data[:PAGE] == MEMORY[:PAGE] and data[2 * PAGE :] == MEMORY[2 * PAGE :]
        assert data[PAGE : 2 * PAGE] == bytes(PAGE)
        with pytest.raises(MemoryReadError, match=f"0x{UNMAPPED_PAGE:x}"):
            c.read_memory(MEM_BASE + 100, 2 * PAGE)


def test_no_ack_mode_is_negotiated_when_offered():
    stub = ScriptedStub("noack")
    with Client.connect(stub.address, timeout=10) as c:
        assert c.no_ack
        before = len(stub.raw_in)
        c.registers()
        assert b"+" not in stub.raw_in[before:]


def test_stub_dropping_the_connection_mid_read_raises_not_hangs():
    stub = ScriptedStub("drop")
    with Client.connect(stub.address, timeout=30) as c:
        with pytest.raises(ConnectionLost, match="closed the connection"):
            c.read_memory(MEM_BASE, 64)


def test_silent_stub_times_out_with_a_clear_error():
    stub = ScriptedStub("silent")
    with Client.connect(stub.address, timeout=0.5) as c:
        with pytest.raises(StubTimeout, match="no answer from the stub"):
            c.read_memory(MEM_BASE, 64)


def test_corrupted_reply_is_nacked_and_retransmitted():
    """In ack mode a bad checksum gets a '-' and the stub sends the packet again."""
    stub = ScriptedStub("corrupt")
    with Client.connect(stub.address, timeout=10) as c:
        assert c.last_stop.signal == 5  # the '?' reply arrived intact the second time
        assert getattr(stub, "nacks", 0) == 1
        assert c.registers()["rax"] == 0x1111


def test_unix_socket_stub(tmp_path):
    stub = ScriptedStub("noack", unix_path=str(tmp_path / "gdb.sock"))
    with Client.connect(f"unix:{stub.address}", timeout=10) as c:
        assert c.no_ack and c.registers()["rip"] == 0x401000


def test_bad_addresses_are_rejected_clearly():
    with pytest.raises(ValueError, match="HOST:PORT"):
        Client.connect("localhost")


def test_vmscope_memfd_named_by_the_stub_is_mapped_directly():
    """vmscope's VMM names its RAM memfd in ``monitor memory``; the helper
    maps it through /proc/PID/fd and reads without any RSP round trip."""
    import os

    from vmscope.client.helpers.vmscope import vmscope_ram

    fd = os.memfd_create("vmscope-test-ram")
    try:
        os.ftruncate(fd, 1 << 20)
        os.pwrite(fd, b"guest-physical-0x1000", 0x1000)

        class MemfdStub(ScriptedStub):
            def _handle(self, ep, conn, p):
                if p.startswith(b"qRcmd,"):
                    text = f"ram gpa=0x0 size=0x100000 pid={os.getpid()} fd={fd} offset=0x0\n"
                    return self._reply(ep, conn, text.encode().hex().encode())
                return super()._handle(ep, conn, p)

        stub = MemfdStub("qemu")
        with Client.connect(stub.address, timeout=10) as c:
            ram = vmscope_ram(c)
            assert ram is not None and ram.read(0x1000, 21) == b"guest-physical-0x1000"
            before = len(stub.requests)
            ram.read(0, 1 << 20)
            assert len(stub.requests) == before  # no protocol traffic for memory
    finally:
        os.close(fd)


def test_requests_while_running_raise_before_reaching_the_stub():
    """The client knows when the target runs: a request then would get the
    stop reply as its answer (QEMU even drops the packet and stops), so it
    raises TargetRunning and sends nothing; wait() on a stopped target
    raises TargetStopped instead of waiting for a stop that never comes."""
    from vmscope.client import TargetRunning, TargetStopped

    stub = ScriptedStub("qemu")
    with Client.connect(stub.address, timeout=10) as c:
        with pytest.raises(TargetStopped, match="stopped"):
            c.wait(timeout=5)
        assert c.halt() is c.last_stop  # already stopped: nothing sent, nothing to wait for
        sent = len(stub.requests)
        c.resume()
        for call in (c.registers, lambda: c.read_memory(MEM_BASE, 8), c.threads, lambda: c.monitor("help"),
                     lambda: c.set_breakpoint(MEM_BASE), c.resume, lambda: c.step()):
            with pytest.raises(TargetRunning, match="the guest is running; stop it first"):
                call()
        assert c.wait(5).kind == "signal"  # the stub has answered the resume: it has seen all we sent
        assert stub.requests[sent:] == [b"vCont;c"]  # only the resume went out
        assert c.registers()["rax"] == 0x1111  # and in step again
