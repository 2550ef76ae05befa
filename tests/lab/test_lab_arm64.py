"""The arm64 twin: ``qemu-system-aarch64 -M virt,virtualization=on -cpu max``
boots Debian's arm64 kernel at EL2, which then has a real KVM; the L1 image is
built from Debian's arm64 packages and aarch64 wheels."""

from __future__ import annotations

import json
import socket

import pexpect
import pytest

from tests.lab_support import FORWARDED_GUEST_PORT, RERUN_IF_THE_LAB_DIED, require_arm64

pytestmark = [pytest.mark.lab, pytest.mark.slow, RERUN_IF_THE_LAB_DIED]


def test_arm64_l1_runs_a_tiny_l2_guest(arm64_lab):
    assert arm64_lab.kvm_available, arm64_lab.console
    r = arm64_lab.run("python3 tests/lab/kvm_smoke.py", timeout=600, check=True)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["api_version"] == 12
    assert report["exits"] == [{"exit": "mmio", "write": True, "addr": 0x9000, "value": 0x42}]


def test_arm64_python_and_vmscope_with_native_wheels(arm64_lab):
    r = arm64_lab.python("import platform, vmscope, capstone, unicorn, rich, elftools; "
                         "print(platform.machine(), vmscope.__file__); "
                         "uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM); "
                         "print(len(list(capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)"
                         ".disasm(b'\\x1f\\x20\\x03\\xd5', 0))))", timeout=600, check=True)
    assert r.stdout.split() == ["aarch64", "/opt/vmscope/src/vmscope/__init__.py", "1"]


def test_arm64_port_forwarding(arm64_lab):
    # SO_REUSEADDR: the connection's TIME_WAIT inherits it, so the next test
    # can listen on the same port at once
    server = ("import socket; s=socket.socket(); "
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              f"s.bind(('0.0.0.0', {FORWARDED_GUEST_PORT})); s.listen(1); print('listening', flush=True); "
              "c,_=s.accept(); c.sendall(c.recv(100)[::-1]); c.close()")
    with arm64_lab.spawn(["python3", "-c", server]) as proc:
        proc.wait_for_output("listening", timeout=300)
        with socket.create_connection(("127.0.0.1", arm64_lab.host_port(FORWARDED_GUEST_PORT)),
                                      timeout=120) as conn:
            conn.sendall(b"arm64")
            reply = b""
            while chunk := conn.recv(100):
                reply += chunk
        assert reply == b"46mra"
        assert proc.wait(300).returncode == 0


def test_arm64_guest_image_boots_under_qemu_aarch64(tmp_path):
    require_arm64()
    from vmscope.images.linux import build_linux_guest

    guest = build_linux_guest(tmp_path, arch="arm64", mode="workload", seconds=1,
                              modules=["virtio_net"], quiet=True)
    argv = guest.qemu_argv()
    assert argv[0] == "qemu-system-aarch64" and "console=ttyAMA0" in argv[-1]
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace", timeout=600)
    try:
        child.expect_exact("vmscope-linux-ready")
        child.expect_exact("vmscope-modules-end")
        assert "virtio_net" in child.before
        child.expect_exact("vmscope-workload-done")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("accel", ["emu", "kvm"])
def test_arm64_host_gdb_multiarch_debugs_a_stub_inside_l1(arm64_lab, accel):
    import re
    import shutil
    import subprocess
    from pathlib import Path

    import vmscope

    gdb = shutil.which("gdb-multiarch")
    if gdb is None:
        pytest.fail("gdb-multiarch is not installed (./dev.sh setup installs it)")
    elf = Path(vmscope.__file__).parent / "guests/aarch64/demo.elf"
    with arm64_lab.spawn(f"python3 -m vmscope run --accel {accel} --gdb 0.0.0.0:{FORWARDED_GUEST_PORT}") as vm:
        vm.wait_for_output("waiting for gdb", timeout=600)
        out = subprocess.run(
            [gdb, "-q", "-batch", "-nx", "-ex",
             f"target remote 127.0.0.1:{arm64_lab.host_port(FORWARDED_GUEST_PORT)}",
             "-ex", "info registers pc", "-ex", "stepi", "-ex", "info registers pc",
             "-ex", "kill", str(elf)], capture_output=True, text=True, timeout=600)
    pcs = [int(m, 16) for m in re.findall(r"^pc\s+(0x[0-9a-f]+)", out.stdout, re.M)]
    assert len(pcs) == 2 and pcs[1] == pcs[0] + 4, f"gdb said:\n{out.stdout}\n{out.stderr}\n{vm.stderr}"
