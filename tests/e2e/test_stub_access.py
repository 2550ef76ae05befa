"""Who can reach the stub: loopback unless told otherwise, a Unix socket
only its owner can use (``--gdb unix:PATH``, mode 0600), and a one-line
warning when it listens where other machines reach it (the protocol has no
authentication)."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from tests.support import Gdb, VmProcess, free_port

pytestmark = pytest.mark.e2e


def test_unix_socket_is_owner_only_and_gdb_debugs_through_it(tmp_path):
    from vmscope.guests import guest_elf

    path = str(tmp_path / "stub.sock")
    vm = VmProcess("--accel", "emu", "--gdb", f"unix:{path}")
    try:
        vm.wait_listening()
        assert f"target remote {path}" in vm.stderr
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert "warning" not in vm.stderr
        gdb = Gdb(guest_elf("demo"))
        try:
            assert "Remote debugging using" in gdb.cmd(f"target remote {path}")
            gdb.cmd("break tick")
            assert "Breakpoint 1," in gdb.cmd("continue", timeout=60)
            gdb.cmd("delete")
            gdb.cmd("detach")
        finally:
            gdb.close()
    finally:
        vm.close()
        vm.proc.wait(10)
    assert not os.path.exists(path), "the socket file goes with the VMM"


def test_a_stale_socket_is_replaced_but_nothing_else_is(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a dead VMM's socket: nobody listens
    vm = VmProcess("--accel", "emu", "--gdb", f"unix:{stale}")
    try:
        vm.wait_listening()
    finally:
        vm.close()
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    vm = VmProcess("--accel", "emu", "--gdb", f"unix:{regular}")
    assert vm.wait_exit(30) == 2
    assert "not a socket" in vm.stderr and regular.read_text() == "keep me"


def test_listening_beyond_loopback_warns_once_and_loopback_is_the_default():
    port = free_port()
    vm = VmProcess("--accel", "emu", "--gdb", f"0.0.0.0:{port}")
    try:
        vm.wait_listening()
        warnings = [ln for ln in vm.stderr.splitlines() if "warning" in ln]
        assert len(warnings) == 1 and "no authentication" in warnings[0] and f"0.0.0.0:{port}" in warnings[0]
    finally:
        vm.close()
    port = free_port()
    vm = VmProcess("--accel", "emu", "--gdb", str(port))
    try:
        vm.wait_listening()
        assert f"127.0.0.1:{port}" in vm.stderr and "warning" not in vm.stderr
    finally:
        vm.close()
