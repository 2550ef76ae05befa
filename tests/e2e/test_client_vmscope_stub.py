"""The client against vmscope's own stub (``vmscope run --accel emu``, the
demo guests): binary ``x`` reads in large packets, no-ack mode, registers
from our target.xml for both architectures, breakpoints, steps and two
vCPU threads."""

from __future__ import annotations

import time

import pytest

from tests.support import VmProcess
from vmscope.client import Client
from vmscope.guests import guest_symbols

pytestmark = pytest.mark.timeout(300)

PORTS = {"x86_64": 16400, "aarch64": 16401}


@pytest.fixture(params=["x86_64", "aarch64"])
def stub(request):
    arch = request.param
    vm = VmProcess("--accel", "emu", "--arch", arch, "--cpus", "2", gdb_port=PORTS[arch])
    client = None
    try:
        deadline = time.monotonic() + 60
        while client is None:
            try:
                client = Client.connect(f"127.0.0.1:{PORTS[arch]}", timeout=20)
            except ConnectionRefusedError:
                if time.monotonic() > deadline or vm.proc.poll() is not None:
                    raise AssertionError(f"vmscope run never listened:\n{vm.stderr[-2000:]}")
                time.sleep(0.1)
        yield arch, client, guest_symbols("demo", arch)
    finally:
        if client is not None:
            client.close()
        vm.close()


def test_handshake_offers_binary_reads_and_no_ack(stub):
    arch, c, _ = stub
    assert c.no_ack and c.features.has("binary-upload")
    assert c.features.packet_size >= 64 * 1024
    assert c.arch == ("i386:x86-64" if arch == "x86_64" else "aarch64")
    assert c.threads() == [1, 2]


def test_big_binary_reads_match_small_ones(stub):
    arch, c, sym = stub
    start = min(sym.values()) & ~0xFFF
    big = c.read_memory(start, 64 * 1024)
    pieces = b"".join(c.read_memory(start + off, 4096) for off in range(0, 64 * 1024, 4096))
    assert big == pieces and any(big)
    c._use_x = False  # the same bytes through hex m packets
    assert c.read_memory(start, 64 * 1024) == big
    c._use_x = True
    banner = c.read_memory(sym["banner"], 8) if "banner" in sym else None
    if banner is not None:
        assert banner.isascii()


def test_breakpoint_and_step_on_the_demo_guest(stub):
    arch, c, sym = stub
    pc = "rip" if arch == "x86_64" else "pc"
    c.set_breakpoint(sym["tick"])
    stop = c.cont(timeout=60)
    assert stop.kind in ("swbreak", "signal") and stop.signal == 5
    assert c.register(pc) == sym["tick"]
    stop = c.step()
    assert c.register(pc) != sym["tick"]
    c.remove_breakpoint(sym["tick"])


def test_each_vcpu_is_a_thread_with_its_own_registers(stub):
    arch, c, sym = stub
    pc = "rip" if arch == "x86_64" else "pc"
    c.set_breakpoint(sym["tick"])
    c.cont(timeout=60)
    c.remove_breakpoint(sym["tick"])
    per_thread = {}
    for tid in c.threads():
        c.select_thread(tid)
        per_thread[tid] = c.registers()[pc]
    assert set(per_thread) == {1, 2}
    assert c.last_stop.tid in per_thread and per_thread[c.last_stop.tid] == sym["tick"]
