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
