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


def test_lab_run_put_carries_host_files_into_l1(tmp_path):
    """--put HOST:L1 (repeatable): a user's own files (a kernel, an
    initramfs, a directory of scripts) are in L1 when the command runs."""
    kernel = tmp_path / "my-kernel"
    kernel.write_bytes(bytes(range(256)) * 40)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "hello.sh").write_text("echo hello-from-$((6 * 7))\n")
    proc = subprocess.run([sys.executable, "-m", "vmscope", "lab", "run", "--ports", PORTS,
                           "--put", f"{kernel}:/root/guest/vmlinuz", "--put", f"{scripts}:/root/scripts", "--",
                           "md5sum /root/guest/vmlinuz; sh /root/scripts/hello.sh"],
                          capture_output=True, text=True, timeout=900)
    import hashlib

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == hashlib.md5(kernel.read_bytes()).hexdigest()
    assert "hello-from-42" in proc.stdout


def test_lab_run_put_refuses_a_missing_file_or_a_relative_l1_path(tmp_path):
    for arg, message in ((f"{tmp_path}/absent:/root/x", "no such file or directory"),
                         (f"{tmp_path}:relative", "the L1 path absolute")):
        proc = subprocess.run([sys.executable, "-m", "vmscope.lab", "run", "--put", arg, "--", "true"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
