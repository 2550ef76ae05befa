"""Bad input and vanishing clients, against ``vmscope run`` on real KVM.

- a port already in use: one-line error, non-zero exit
- a missing or malformed kernel: a clear error naming the problem
- gdb killed with SIGKILL while the guest runs: the VMM keeps running, every
  patched byte is restored, the next gdb attaches
- garbage on the wire: the stub survives and still answers
- lldb: connects with ``gdb-remote``, reads registers, steps
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import ROOT, Gdb, VmProcess, elf_bytes_at, elf_symbols, free_port, require_kvm, require_tool
from vmscope.rsp.framing import Endpoint, Packet

pytestmark = pytest.mark.e2e


def run_vmscope(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmscope", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = run_vmscope("run", "--accel", "emu", "--gdb", str(port))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "using the emulated CPU" not in ln]
    assert len(lines) == 1, res.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0].lower()


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"hello, not a kernel" * 10, "not an ELF"),
        (b"\x7fELF" + b"\x00" * 12, "ELF"),
    ],
    ids=["missing", "empty", "garbage", "truncated-elf"],
)
def test_bad_kernel_image_is_named(tmp_path, content, expected):
    path = tmp_path / "kernel.img"
    if content is not None:
        path.write_bytes(content)
    res = run_vmscope("run", "--accel", "kvm" if os.path.exists("/dev/kvm") else "emu", "--kernel", str(path))
    assert res.returncode != 0
    assert str(path) in res.stderr, res.stderr
    assert expected.lower() in res.stderr.lower(), res.stderr
    assert "Traceback" not in res.stderr


def test_elf_without_pvh_note_is_refused(tmp_path):
    require_kvm()
    res = run_vmscope("run", "--accel", "kvm", "--kernel", sys.executable)
    assert res.returncode != 0
    assert "PVH" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_bzimage_refused_until_linux_boot(tmp_path):
    require_kvm()
    img = bytearray(0x400)
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x202:0x206] = b"HdrS"
    img[0x206:0x208] = (0x020F).to_bytes(2, "little")
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(img))
    res = run_vmscope("run", "--accel", "kvm", "--kernel", str(path))
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "bzImage" in res.stderr or "Linux" in res.stderr, res.stderr


@pytest.fixture
def kvm_vm():
    require_kvm()
    port = free_port()
    vm = VmProcess("--accel", "kvm", "--cpus", "2", gdb_port=port)
    vm.wait_listening()
    yield vm
    vm.close()


def test_gdb_sigkill_restores_bytes_and_next_gdb_attaches(kvm_vm):
    from vmscope.guests import guest_elf

    elf = guest_elf("demo")
    tick = elf_symbols(elf)["tick"]
    gdb = Gdb(elf)
    gdb.cmd(f"target remote 127.0.0.1:{kvm_vm.port}")
    gdb.cmd("break tick")
    gdb.cmd("break main_loop")
    gdb.cmd("continue", timeout=120)  # hits: breakpoints are in memory now
    gdb.cmd("delete 2")
    gdb.start("continue")
    time.sleep(0.5)
    os.kill(gdb.child.pid, signal.SIGKILL)
    gdb.close()
    time.sleep(1.0)
    assert kvm_vm.proc.poll() is None, f"VMM died with the debugger: {kvm_vm.stderr[-2000:]}"
    gdb2 = Gdb(elf)
    try:
        out = gdb2.cmd(f"target remote 127.0.0.1:{kvm_vm.port}")
        assert "Remote debugging using" in out, out
        raw = gdb2.cmd(f"x/8xb {tick}")
        got = bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", raw.split(":", 1)[1]))
        assert got == elf_bytes_at(elf, tick, 8)
        first = gdb2.value("counter")
        gdb2.cmd("break tick")
        out = gdb2.cmd("continue", timeout=120)
        assert "Breakpoint 1," in out, gdb2.transcript()
        assert gdb2.value("counter") >= first
        gdb2.cmd("delete")
        gdb2.cmd("detach")
    finally:
        gdb2.close()
    assert kvm_vm.proc.poll() is None


def _raw_exchange(port: int, data: bytes, payload: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` then the packet ``payload``; return the first reply."""
    ep = Endpoint()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        ep.send(payload)
        s.sendall(ep.data_to_send())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            for ev in ep.receive(chunk):
                if isinstance(ev, Packet):
                    return ev.payload
    raise AssertionError("no reply")


def test_garbage_then_valid_packet_still_answered(kvm_vm):
    junk = b"$\x00\xff#zz$m,#00}}}*$" + os.urandom(2000).replace(b"$", b"x") + b"#00"
    reply = _raw_exchange(kvm_vm.port, junk, b"?")
    assert reply.startswith(b"T05"), reply
    # a malformed but well-framed packet gets an error reply, not silence
    assert _raw_exchange(kvm_vm.port, b"", b"mzzzz,4").startswith(b"E")
    assert kvm_vm.proc.poll() is None


def test_lldb_reads_registers_and_steps(kvm_vm):
    import pexpect

    from vmscope.guests import guest_elf

    lldb = require_tool("lldb")
    child = pexpect.spawn(lldb, [str(guest_elf("demo"))], encoding="utf-8", timeout=60, env={**os.environ, "TERM": "dumb"})
    try:
        child.expect(r"\(lldb\) ")
        child.sendline(f"gdb-remote 127.0.0.1:{kvm_vm.port}")
        child.expect(r"\(lldb\) ")
        child.sendline("register read rip")
        child.expect(r"rip = (0x[0-9a-f]+)")
        before = int(child.match.group(1), 16)
        child.expect(r"\(lldb\) ")
        child.sendline("thread step-inst")
        child.expect(r"\(lldb\) ")
        child.sendline("register read rip")
        child.expect(r"rip = (0x[0-9a-f]+)")
        after = int(child.match.group(1), 16)
        assert after != before
        child.expect(r"\(lldb\) ")
        child.sendline("process detach")
        child.expect(r"\(lldb\) ")
    finally:
        child.terminate(force=True)
