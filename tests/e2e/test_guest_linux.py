"""``vmscope guest linux``: the Debian-kernel + busybox guest boots under
plain ``qemu-system-x86_64 -accel tcg`` on the host.

Each boot takes a few seconds of emulated time; QEMU runs on a pty (pexpect)
so the guest's shell is driven the way a user at the console would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pexpect
import pytest

from vmscope.images.linux import LinuxGuest, build_linux_guest

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 300


@pytest.fixture(scope="module")
def shell_guest(tmp_path_factory) -> LinuxGuest:
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (./dev.sh setup installs it)")
    out = tmp_path_factory.mktemp("guest")
    proc = subprocess.run([sys.executable, "-m", "vmscope", "guest", "linux", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'vmlinuz'}" in proc.stdout
    kernel = re.search(r"^kernel (\S+)", proc.stdout, re.M).group(1)
    return LinuxGuest(out / "vmlinuz", out / "initramfs.cpio.gz", kernel)


def _boot(guest: LinuxGuest, extra_cmdline: str = "") -> pexpect.spawn:
    argv = guest.qemu_argv(memory_mib=512, extra_cmdline=extra_cmdline)
    return pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                         timeout=BOOT_TIMEOUT)


def _close(child: pexpect.spawn) -> None:
    if child.isalive():
        child.terminate(force=True)


def test_cli_writes_vmlinuz_and_initramfs(shell_guest):
    assert shell_guest.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"  # bzImage boot header
    assert shell_guest.initramfs.read_bytes()[:2] == b"\x1f\x8b"
    assert shell_guest.kernel_version.endswith("-cloud-amd64")


def test_shell_mode_boots_to_ready_and_runs_commands(shell_guest):
    child = _boot(shell_guest)
    try:
        child.expect_exact("vmscope-linux-ready")
        child.expect(r"[#$] ")
        child.sendline("echo answer-$((6 * 7)); cat /proc/mounts | grep -c -E 'proc|sysfs|devtmpfs'")
        child.expect(r"answer-42\s+(\d+)")
        assert int(child.match.group(1)) >= 3
        child.sendline("poweroff -f")
        child.expect(pexpect.EOF)
    finally:
        _close(child)


def test_workload_mode_prints_ps_and_modules_and_powers_off(tmp_path):
    guest = build_linux_guest(tmp_path, mode="workload", modules=["virtio_net"], seconds=1,
                              quiet=True)
    child = _boot(guest)
    try:
        child.expect_exact("vmscope-linux-ready")
        child.expect_exact("vmscope-workload-done")
        transcript = child.before
        child.expect(pexpect.EOF)
    finally:
        _close(child)
    child.close()
    assert child.exitstatus == 0  # QEMU exits cleanly when the guest powers off
    ps = transcript.split("vmscope-ps-begin", 1)[1].split("vmscope-ps-end", 1)[0]
    assert "sleep 3600" in ps and "/etc/vmscope/workload" in ps
    modules = transcript.split("vmscope-modules-begin", 1)[1].split("vmscope-modules-end", 1)[0]
    loaded = {line.split()[0] for line in modules.splitlines() if line.strip()}
    assert {"virtio_net", "net_failover", "failover"} <= loaded
    iterations = int(re.search(r"vmscope-workload-iterations (\d+)", transcript).group(1))
    assert iterations > 0


def test_kernel_command_line_switches_a_shell_image_to_a_custom_workload(tmp_path):
    guest = build_linux_guest(tmp_path, workload="#!/bin/sh\necho custom-$VMSCOPE_SECONDS\nexit 4\n",
                              quiet=True)
    child = _boot(guest, extra_cmdline="vmscope.mode=workload vmscope.seconds=3")
    try:
        child.expect_exact("custom-3")
        child.expect_exact("vmscope-workload-exit 4")
        child.expect(pexpect.EOF)
    finally:
        _close(child)


def test_cli_reports_bad_arguments_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vmscope.images", "linux", "--out", str(tmp_path),
                           "--add", "no-colon"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--add wants HOST:/IMAGE/PATH" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vmscope.images", "linux", "--out", str(tmp_path),
                           "--quiet", "--module", "no_such_module"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1
    assert "has no module 'no_such_module'" in proc.stderr
