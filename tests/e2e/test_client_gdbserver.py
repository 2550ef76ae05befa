"""The RSP client against Debian's real ``gdbserver`` debugging a small C
program compiled here: registers from gdbserver's target.xml, memory,
software and hardware breakpoints, a watchpoint, stepping, threads."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from vmscope.client import Client, MemoryReadError, TargetExited

pytestmark = pytest.mark.timeout(120)

PORT = 16200

SOURCE = r"""
#include <stdio.h>
#include <string.h>
volatile long counter = 0;
char message[3 * 4096] = "hello from the target";
__attribute__((noinline)) void tick(void) { counter++; }
int main(int argc, char **argv) {
    if (argc > 1) for (;;) tick();  /* spin until interrupted */
    for (int i = 0; i < 1000000; i++) tick();
    printf("%ld\n", counter);
    return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    for tool in ("gcc", "gdbserver", "nm"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed")
    d = tmp_path_factory.mktemp("gdbserver")
    (d / "t.c").write_text(SOURCE)
    subprocess.run(["gcc", "-O0", "-g", "-no-pie", "-o", str(d / "t"), str(d / "t.c")], check=True)
    syms = {}
    for line in subprocess.run(["nm", str(d / "t")], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return d / "t", syms


@pytest.fixture
def stub(program):
    yield from _debug(program)


@pytest.fixture
def spinning_stub(program):
    yield from _debug(program, "spin")


def _debug(program, *args):
    path, syms = program
    proc = subprocess.Popen(["gdbserver", "--once", f"127.0.0.1:{PORT}", str(path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    client = None
    try:
        while client is None:
            try:
                client = Client.connect(f"127.0.0.1:{PORT}", timeout=10)
            except ConnectionRefusedError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield client, syms
    finally:
        if client is not None:
            client.close()
        proc.kill()
        proc.wait(timeout=10)


def test_handshake_uses_gdbservers_features_and_target_xml(stub):
    c, _ = stub
    assert c.no_ack  # gdbserver offers QStartNoAckMode
    assert c.features.packet_size > 4096
    assert c.arch == "i386:x86-64"
    assert "rip" in c.layout and "orig_rax" in c.layout  # a gdbserver-only register
    assert c.last_stop.kind == "signal" and c.last_stop.signal == 5
    assert c.threads() == [c.last_stop.tid]


def test_registers_and_memory(stub):
    c, syms = stub
    regs = c.registers()
    assert regs["rsp"] > 0x7F0000000000 and regs["rip"] > 0
    assert c.read_memory(syms["message"], 21) == b"hello from the target"
    big = c.read_memory(syms["message"], 3 * 4096)  # several packets
    assert big.startswith(b"hello") and len(big) == 3 * 4096
    c.write_memory(syms["message"], b"HELLO")
    assert c.read_memory(syms["message"], 8) == b"HELLO fr"
    with pytest.raises(MemoryReadError, match="0x0"):
        c.read_memory(0, 16)


def test_breakpoint_step_and_continue(stub):
    c, syms = stub
    c.set_breakpoint(syms["tick"])
    stop = c.cont(timeout=30)
    assert stop.kind == "swbreak" and c.register("rip") == syms["tick"]
    stop = c.step()  # steps off the breakpoint
    assert stop.kind == "signal" and c.register("rip") != syms["tick"]
    counter = int.from_bytes(c.read_memory(syms["counter"], 8), "little")
    stop = c.cont(timeout=30)
    assert stop.kind == "swbreak" and c.register("rip") == syms["tick"]
    assert int.from_bytes(c.read_memory(syms["counter"], 8), "little") == counter + 1
    c.remove_breakpoint(syms["tick"])
    c.set_breakpoint(syms["tick"], hardware=True)
    stop = c.cont(timeout=30)
    assert stop.kind in ("hwbreak", "signal") and c.register("rip") == syms["tick"]
    c.remove_breakpoint(syms["tick"], hardware=True)


def test_watchpoint_reports_the_address(stub):
    c, syms = stub
    c.set_watchpoint(syms["counter"], 8, "write")
    stop = c.cont(timeout=30)
    assert stop.kind == "watch" and stop.addr == syms["counter"]
    assert int.from_bytes(c.read_memory(syms["counter"], 8), "little") == 1
    c.remove_watchpoint(syms["counter"], 8, "write")


def test_run_to_exit_then_reads_say_so(stub):
    c, syms = stub
    c.write_register("rip", c.register("rip"))  # P packet round trip
    stop = c.cont(timeout=60)
    assert stop.kind == "exited" and stop.code == 0
    with pytest.raises(TargetExited, match="exited with status 0"):
        c.registers()
    with pytest.raises(TargetExited):
        c.read_memory(syms["counter"], 8)


def test_interrupt_stops_a_running_program(spinning_stub):
    c, syms = spinning_stub
    c.resume()
    assert c.running
    c.interrupt()
    stop = c.wait(timeout=30)
    assert stop.kind == "signal" and stop.signal == 2  # SIGINT, as GDB's Ctrl-C
    assert not c.running
    assert c.registers()["rip"] > 0  # stopped and readable again


def test_resume_hooks_run_on_every_resume(stub):
    """Page-table caches register here so they are dropped when the target runs."""
    from vmscope.vmi import TranslationCache

    c, syms = stub
    cache = TranslationCache()
    cache.pages(0x1000)[1] = "stale"  # a cached translation
    c.on_resume(cache.invalidate)
    c.set_breakpoint(syms["tick"])
    c.cont(timeout=30)
    assert cache.pages(0x1000) == {}
    cache.pages(0x1000)[1] = "stale"
    c.step()
    assert cache.pages(0x1000) == {}


@pytest.mark.parametrize("cmd,want_rc", [("regs", 0), ("ps", 1)])
def test_inspect_regs_works_where_no_memory_path_does(program, capsys, cmd, want_rc):
    """gdbserver has no physical memory: ``regs`` still works, ``ps`` says why not."""
    from vmscope.client.inspect_cli import main as inspect_main

    path, _ = program
    proc = subprocess.Popen(["gdbserver", "--once", f"127.0.0.1:{PORT}", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        seen = b""
        while b"Listening on port" not in seen:
            line = proc.stdout.readline()
            assert line, f"gdbserver exited: {seen!r}"
            seen += line
        rc = inspect_main(["--gdb", f"127.0.0.1:{PORT}", cmd])
        out = capsys.readouterr()
        assert rc == want_rc, out.err
        if cmd == "regs":
            assert "rip" in out.out and "rsp" in out.out
        else:
            assert "cr3" in out.err
    finally:
        proc.kill()
        proc.wait(timeout=10)
