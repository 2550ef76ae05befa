"""``vmscope run`` on KVM as a process: what a user at a shell sees (piped
stdin reaching the guest, SIGUSR1's thread dump). The VMM in-process:
tests/unit/test_kvm_machine.py."""

from __future__ import annotations

import time

import pytest

from tests.kvm_support import ECHO_PLUS_ONE, tiny_guest
from tests.support import require_kvm

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


def test_vmscope_run_types_piped_stdin_into_the_guest(tmp_path):
    """Not only a terminal: `printf ... | vmscope run` feeds the serial port
    (as QEMU's -serial stdio does), so scripts can drive a guest's shell."""
    import subprocess
    import sys

    guest = tiny_guest(tmp_path, ECHO_PLUS_ONE)
    proc = subprocess.Popen([sys.executable, "-m", "vmscope", "run", "--accel", "kvm", "--kernel", str(guest)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(b"HALq", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"IBM" in out, (out, err)


def test_sigusr1_dumps_every_threads_stack_and_the_vm_runs_on():
    """`kill -USR1` on a seemingly hung `vmscope run` shows where each
    thread waits (the vCPU loops among them), without stopping the VM."""
    import signal
    import subprocess
    import sys

    require_kvm()
    proc = subprocess.Popen([sys.executable, "-m", "vmscope", "run", "--accel", "kvm"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 60
        while b"cpu 0 up" not in out and time.monotonic() < deadline:
            out += proc.stdout.read1(4096)
        assert b"cpu 0 up" in out, out
        # A burst while the vCPU threads start: faulthandler's dump of
        # running threads crashed here (SIGSEGV, about 1 run in 40)
        for _ in range(20):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.002)
        time.sleep(1.0)
        assert proc.poll() is None, "SIGUSR1 ended vmscope"
        later = proc.stdout.read1(4096)
        assert b"heartbeat" in later, "the guest stopped printing after SIGUSR1"
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    text = err.decode(errors="replace")
    assert "Thread 0x" in text and "_vcpu_loop" in text, text[-3000:]
    dumps = text.count("MainThread")  # signals that arrive together coalesce: up to 20 dumps
    assert 1 <= dumps <= 20 and text.count("_vcpu_loop") >= dumps, "a dump without the vCPU loop"
    # after the stacks, the machine's state: the demo guest runs, unheld, with no debugger
    assert text.count("run control: running, stop pending: no") == dumps, text[-3000:]
    assert text.count("vCPU 0: online, runnable, not parked") == dumps, text[-3000:]
    assert text.count("no debugger attached: 0 software breakpoints") == dumps, text[-3000:]


def test_sigusr1_state_follows_a_debugger_stop_and_its_detach():
    """The machine state after the stacks tells a held guest from a free
    one: with a debugger stopped at a breakpoint, every vCPU is held and
    the breakpoint is listed; after the detach the guest runs and nothing
    of the debugger is left (what `kill -USR1` is for when a guest seems
    hung after a debugger went away)."""
    import signal
    import subprocess
    import sys
    import threading

    from tests.support import free_port
    from vmscope.client.client import Client
    from vmscope.guests import guest_symbols

    require_kvm()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vmscope", "run", "--accel", "kvm", "--cpus", "2",
                             "--gdb", f"127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(b) for b in iter(lambda: proc.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()

    def report() -> str:
        """The state lines of one SIGUSR1 dump."""
        start = len(err)
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = err[start:].decode(errors="replace")
            if "attached:" in text:  # the last line of the report
                return text[text.index("run control:"):]
            time.sleep(0.05)
        raise AssertionError(f"no state report after SIGUSR1: {err[-3000:].decode(errors='replace')}")

    try:
        deadline = time.monotonic() + 30
        while b"waiting for gdb" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
        client = Client.connect(("127.0.0.1", port), timeout=20)
        tick = guest_symbols("demo")["tick"]
        client.set_breakpoint(tick)
        stop = client.cont(timeout=20)
        assert stop.kind == "swbreak", stop
        held = report()
        assert "run control: stopped, stop pending: no" in held, held
        assert held.count(", held, parked") == 2, held  # both vCPUs
        assert "a debugger attached: 1 software breakpoints" in held, held
        client.remove_breakpoint(tick)
        client.detach()
        free = report()
        assert "run control: running, stop pending: no" in free, free
        assert free.count(", runnable, ") == 2, free
        assert "no debugger attached: 0 software breakpoints, 0 hardware, 0 watchpoints" in free, free
    finally:
        proc.kill()
        proc.wait(30)
