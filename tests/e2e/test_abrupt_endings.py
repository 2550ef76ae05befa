"""A debugger that ends abruptly at any point leaves nothing behind: one VMM
(KVM, 2 vCPUs), N debuggers in a row, each cut off at a random moment
(SIGKILL of a stock gdb, or a raw client closing its socket) during a step,
between a breakpoint's Z and the continue, in the middle of a packet, while
a watchpoint's page is protected, during a 16 MiB read. After each: the VMM
lives, the next debugger attaches, the guest's code bytes equal the ELF's,
no page stays protected (the watched variable keeps being written: its
value moves) and no vCPU stays parked (both per-CPU counters move).

VMSCOPE_ABRUPT_N sets N (default 24, with a fixed seed; any seed may be
given with VMSCOPE_ABRUPT_SEED)."""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import pytest
from elftools.elf.elffile import ELFFile

from tests.support import Gdb, VmProcess, free_port, require_kvm
from vmscope.rsp.framing import Endpoint, Packet, frame

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = int(os.environ.get("VMSCOPE_ABRUPT_N", "24"))
SEED = int(os.environ.get("VMSCOPE_ABRUPT_SEED", "7"))


def demo_layout():
    from vmscope.guests import guest_elf

    with open(guest_elf("demo"), "rb") as f:
        elf = ELFFile(f)
        syms = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
        text = elf.get_section_by_name(".text")
        return syms, text["sh_addr"], text.data()


class Raw:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.ep = Endpoint()
        self.pending: list[bytes] = []
        self.request(b"qSupported:swbreak+;hwbreak+")

    def send(self, payload: bytes) -> None:
        self.ep.send(payload)
        self.sock.sendall(self.ep.data_to_send())

    def receive(self) -> bytes:
        while not self.pending:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "stub closed the connection"
            self.pending += [e.payload for e in self.ep.receive(chunk) if isinstance(e, Packet)]
            self.sock.sendall(self.ep.data_to_send())
        return self.pending.pop(0)

    def request(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.receive()

    def cut(self) -> None:
        self.sock.close()


def u64(data: bytes) -> int:
    return int.from_bytes(data, "little")


def check_clean(port: int, syms, text_addr: int, text: bytes) -> None:
    """The next debugger attaches and finds the guest intact and running."""
    c = Raw(port)
    try:
        assert c.request(b"?")[:1] in (b"T", b"S")
        got = b""
        while len(got) < len(text):
            n = min(0x4000, len(text) - len(got))
            got += bytes.fromhex(c.request(b"m%x,%x" % (text_addr + len(got), n)).decode())
        assert got == text, "guest code differs from the ELF: a breakpoint was left in"
        before = [u64(bytes.fromhex(c.request(b"m%x,8" % (syms["per_cpu_counter"] + 8 * i)).decode()))
                  for i in range(2)]
        counter = u64(bytes.fromhex(c.request(b"m%x,8" % syms["counter"]).decode()))
        c.send(b"D")
        assert c.receive() == b"OK"
    finally:
        c.cut()
    time.sleep(0.3)
    c = Raw(port)
    try:
        after = [u64(bytes.fromhex(c.request(b"m%x,8" % (syms["per_cpu_counter"] + 8 * i)).decode()))
                 for i in range(2)]
        counter2 = u64(bytes.fromhex(c.request(b"m%x,8" % syms["counter"]).decode()))
        assert all(a > b for a, b in zip(after, before)), f"a vCPU stays parked: {before} -> {after}"
        assert counter2 > counter, "the watched variable is no longer written (its page stays protected?)"
        c.send(b"D")
        c.receive()
    finally:
        c.cut()


def cut_during_step(port, syms, rng):
    c = Raw(port)
    for _ in range(rng.randrange(1, 50)):
        c.request(b"vCont;s:%x" % rng.choice((1, 2)))
    c.send(b"vCont;s:1")  # and gone before the stop reply
    c.cut()


def cut_between_z_and_c(port, syms, rng):
    c = Raw(port)
    assert c.request(b"Z0,%x,1" % syms["tick"]) == b"OK"
    if rng.random() < 0.5:
        c.send(b"vCont;c")  # the breakpoint hits, nobody reads the stop
        time.sleep(rng.random() * 0.2)
    c.cut()


def cut_mid_packet(port, syms, rng):
    c = Raw(port)
    c.request(b"Z0,%x,1" % syms["tick"])
    wire = frame(b"m%x,100" % syms["counter"])
    c.sock.sendall(wire[: rng.randrange(1, len(wire))])
    c.cut()


def cut_while_watching(port, syms, rng):
    c = Raw(port)
    assert c.request(b"Z2,%x,8" % syms["counter"]) == b"OK"
    for _ in range(rng.randrange(0, 3)):
        c.send(b"vCont;c")
        assert c.receive()[:1] == b"T"  # a watch hit: the page is protected
    c.send(b"vCont;c")  # the guest runs with the page protected ...
    time.sleep(rng.random() * 0.1)
    c.cut()  # ... when the debugger vanishes


def cut_during_big_read(port, syms, rng):
    c = Raw(port)
    for off in range(0, 16 << 20, 0x80000):
        c.ep.send(b"m%x,80000" % off)
    c.sock.sendall(c.ep.data_to_send())
    c.sock.settimeout(1.0)
    got, stop_at = 0, rng.randrange(0, 1 << 20)  # replies are run-length encoded: a few MiB at most
    try:
        while got < stop_at:
            chunk = c.sock.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
    except socket.timeout:
        pass  # all sent already
    c.cut()


def kill_gdb(port, syms, rng):
    from vmscope.guests import guest_elf

    gdb = Gdb(guest_elf("demo"), timeout=60)
    gdb.cmd(f"target remote 127.0.0.1:{port}")
    what = rng.choice(("watch", "break", "stepi"))
    if what == "watch":
        gdb.cmd("watch counter")
    elif what == "break":
        gdb.cmd("break tick")
    if what == "stepi":
        gdb.start("stepi 200")
    else:
        gdb.start("continue")
    time.sleep(rng.random() * 0.3)
    os.kill(gdb.child.pid, signal.SIGKILL)
    gdb.close()


ENDINGS = [cut_during_step, cut_between_z_and_c, cut_mid_packet, cut_while_watching, cut_during_big_read, kill_gdb]


def test_abrupt_endings_at_random_moments_leave_nothing_behind():
    require_kvm()
    syms, text_addr, text = demo_layout()
    vm = VmProcess("--accel", "kvm", "--cpus", "2", gdb_port=free_port())
    rng = random.Random(SEED)
    survived = 0
    try:
        vm.wait_listening()
        for i in range(N):
            ending = ENDINGS[i % len(ENDINGS)] if i < len(ENDINGS) else rng.choice(ENDINGS)
            ending(vm.port, syms, rng)
            time.sleep(0.2)
            assert vm.proc.poll() is None, f"the VMM died after {ending.__name__}: {vm.stderr[-2000:]}"
            try:
                check_clean(vm.port, syms, text_addr, text)
            except AssertionError as e:
                raise AssertionError(f"after ending {i} ({ending.__name__}): {e}") from None
            survived += 1
    finally:
        vm.close()
    print(f"{survived} abrupt endings of {N} survived")
    assert survived == N
