"""``vmscope lab run`` and ``vmscope lab shell`` as a user runs them (each boots its own L1)."""

from __future__ import annotations

import subprocess
import sys

import pexpect
import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]
PORTS = "14000-14999"


def test_lab_run_streams_output_and_returns_the_exit_code():
    proc = subprocess.run([sys.executable, "-m", "vmscope", "lab", "run", "--ports", PORTS, "--",
                           "echo out-$((40 + 2)); echo err >&2; test -c /dev/kvm && exit 5"],
                          capture_output=True, text=True, timeout=900)
    assert proc.stdout == "out-42\n"
    assert proc.stderr.endswith("err\n")
    assert proc.returncode == 5


def test_lab_run_without_a_command_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "vmscope.lab", "run", "--"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "give a command after --" in proc.stderr


def test_lab_shell_puts_the_console_on_the_terminal():
    child = pexpect.spawn(sys.executable, ["-m", "vmscope.lab", "shell", "--ports", PORTS],
                          encoding="utf-8", codec_errors="replace", timeout=900)
    try:
        child.expect_exact("vmscope-lab-kvm yes")
        child.sendline("")
        child.expect(r"# ")
        child.sendline("grep -c ^kvm /proc/modules; echo shell-$((2 * 21))")
        child.expect(r"(\d+)\s+shell-42")
        assert int(child.match.group(1)) == 2  # kvm and kvm_amd
        child.send("\x01x")  # Ctrl-A X: QEMU's mux quits
        child.expect(pexpect.EOF, timeout=60)
    finally:
        if child.isalive():
            child.terminate(force=True)
