"""The stub under input it should not get, measured: a packet longer than
its PacketSize, a client that types one byte per 100 ms, a client that
never reads its replies, 1,000 connections in a row and 10,000 stops in one
session. Each limit gets a clear error reply or a bounded wait, never an
unbounded buffer; memory (RSS) and threads stay flat; the guest keeps
printing on its console."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.support import VmProcess, free_port, require_kvm
from vmscope.rsp.framing import Endpoint, Packet, frame

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


class Raw:
    """A raw RSP client (no-ack after the handshake)."""

    def __init__(self, port: int, handshake: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.ep = Endpoint()
        self.pending: list[bytes] = []
        if handshake:
            self.request(b"qSupported:multiprocess+;swbreak+;hwbreak+")
            assert self.request(b"QStartNoAckMode") == b"OK"
            self.ep.disable_acks()

    def send(self, payload: bytes) -> None:
        self.ep.send(payload)
        self.sock.sendall(self.ep.data_to_send())

    def receive(self, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.pending:
            assert time.monotonic() < deadline, "no reply"
            chunk = self.sock.recv(1 << 20)
            assert chunk, "stub closed the connection"
            self.pending += [e.payload for e in self.ep.receive(chunk) if isinstance(e, Packet)]
            out = self.ep.data_to_send()
            if out:
                self.sock.sendall(out)
        return self.pending.pop(0)

    def request(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.receive()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def vm(request):
    accel = getattr(request, "param", "kvm")
    if accel == "kvm":
        require_kvm()
    env = {"VMSCOPE_STUB_SEND_TIMEOUT": "3"}
    vm = VmProcess("-v", "--accel", accel, "--cpus", "2", gdb_port=free_port(), env=env)
    vm.wait_listening()
    yield vm
    vm.close()


def heartbeats(vm) -> int:
    return vm.serial.count("heartbeat")


def test_packet_longer_than_packetsize_gets_an_error_and_the_session_goes_on(vm):
    c = Raw(vm.port)
    try:
        supported = c.request(b"qSupported")
        size = int(supported.split(b"PacketSize=")[1].split(b";")[0], 16)
        before = proc_status(vm.proc.pid)["VmRSS"]
        huge = b"X100000,%x:" % (4 * size) + b"\x90" * (4 * size)
        c.sock.sendall(frame(huge))  # 4x PacketSize
        assert c.receive() == b"E16"
        assert c.request(b"qC").startswith(b"QC")
        grown = proc_status(vm.proc.pid)["VmRSS"] - before
        assert grown < 3 * size // 1024, f"RSS grew by {grown} KiB for a refused packet of {4 * size >> 10} KiB"
    finally:
        c.close()
    assert vm.proc.poll() is None


def test_a_client_typing_one_byte_per_100ms_is_served_and_the_console_runs_on(vm):
    c = Raw(vm.port)
    try:
        def dribble(payload: bytes) -> None:
            for b in frame(payload):
                c.sock.sendall(bytes([b]))
                time.sleep(0.1)

        dribble(b"?")
        assert c.receive().startswith(b"T05")
        dribble(b"vCont;c")
        start = heartbeats(vm)
        for _ in range(10):  # the stub reads slowly typed input while the guest runs and prints
            c.sock.sendall(b"x")  # noise between packets: ignored
            time.sleep(0.1)
        assert heartbeats(vm) > start, "the console stopped while a slow client typed"
        c.sock.sendall(b"\x03")
        assert c.receive().startswith((b"T02", b"T05", b"T00"))
    finally:
        c.close()


def test_a_client_that_never_reads_is_dropped_after_the_send_timeout(vm):
    """It floods 64 reads of 512 KiB and reads nothing: the stub's memory stays
    bounded (the socket fills, the stub waits), after the send timeout the
    client is dropped with its breakpoints, and the next client is served
    while the first still holds its socket open."""
    flood = Raw(vm.port)
    noise = os.urandom(0x80000)  # incompressible: replies the size of the read
    for off in range(0, len(noise), 0x4000):
        assert flood.request(b"X%x,4000:" % (0x800000 + off) + noise[off : off + 0x4000]) == b"OK"
    tick = flood.request(b"m100000,1")
    assert flood.request(b"Z0,100000,1") == b"OK"  # a breakpoint it will never remove
    before = proc_status(vm.proc.pid)["VmRSS"]
    for _ in range(64):
        flood.ep.send(b"m800000,80000")
        flood.sock.sendall(flood.ep.data_to_send())
    time.sleep(1.0)
    grown = proc_status(vm.proc.pid)["VmRSS"] - before
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB for a client that does not read"
    busy = socket.create_connection(("127.0.0.1", vm.port), timeout=10)  # the stub is stuck sending to the flooder
    busy.close()
    deadline = time.monotonic() + 30
    while "connection lost while sending" not in vm.stderr and "not reading" not in vm.stderr:
        assert time.monotonic() < deadline, vm.stderr[-2000:]
        time.sleep(0.2)
    nxt = Raw(vm.port)  # the flooder still holds its socket open
    try:
        assert nxt.request(b"?").startswith(b"T05")
        assert nxt.request(b"m100000,1") == tick, "the dropped client's breakpoint must be gone"
        nxt.request(b"D")
    finally:
        nxt.close()
        flood.close()
    start = heartbeats(vm)
    time.sleep(1.5)
    assert heartbeats(vm) > start, "the guest must run on after the clients left"


def test_a_thousand_connections_leave_memory_and_threads_flat(vm):
    def cycle(i: int) -> None:
        c = Raw(vm.port, handshake=i % 2 == 0)
        try:
            if i % 3 == 0:
                c.request(b"?")
                c.send(b"D")
        finally:
            c.close()

    for i in range(50):  # warm up: lazily built state, allocator pools
        cycle(i)
    time.sleep(0.5)
    before = proc_status(vm.proc.pid)
    for i in range(1000):
        cycle(i)
    time.sleep(1.0)
    after = proc_status(vm.proc.pid)
    print(f"1000 connections: RSS {before['VmRSS']} -> {after['VmRSS']} KiB, threads {before['Threads']} -> "
          f"{after['Threads']}")
    assert after["Threads"] == before["Threads"]
    assert after["VmRSS"] - before["VmRSS"] < 8 * 1024
    c = Raw(vm.port)
    assert c.request(b"?").startswith(b"T05")
    c.close()


def test_ten_thousand_stops_in_one_session_leave_memory_and_threads_flat(vm):
    c = Raw(vm.port)
    try:
        for _ in range(500):  # warm up
            assert c.request(b"vCont;s:1")[:1] == b"T"
        before = proc_status(vm.proc.pid)
        t0 = time.monotonic()
        for _ in range(10_000):
            reply = c.request(b"vCont;s:1")
            assert reply[:3] == b"T05", reply
        took = time.monotonic() - t0
        after = proc_status(vm.proc.pid)
        print(f"10000 stops in {took:.1f} s: RSS {before['VmRSS']} -> {after['VmRSS']} KiB, "
              f"threads {before['Threads']} -> {after['Threads']}")
        assert after["Threads"] == before["Threads"]
        assert after["VmRSS"] - before["VmRSS"] < 8 * 1024
        c.send(b"D")
    finally:
        c.close()


def test_a_second_debugger_is_told_why_it_is_refused(vm):
    first = Raw(vm.port)
    try:
        second = Raw(vm.port, handshake=False)
        second.send(b"qSupported")
        reply = second.receive(timeout=10)
        assert reply.startswith(b"E.") and b"another debugger is attached" in reply, reply
        second.close()
        assert first.request(b"?").startswith(b"T05"), "the first debugger keeps its session"
    finally:
        first.close()
