"""The nested KVM lab as a test fixture: real KVM inside, commands, ports."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.lab_support import FORWARDED_GUEST_PORT, RERUN_IF_THE_LAB_DIED
from vmscope.lab import LabError, LabTimeout

pytestmark = [pytest.mark.lab, pytest.mark.slow, RERUN_IF_THE_LAB_DIED]


def test_l1_has_kvm_amd_and_dev_kvm(lab):
    assert lab.kvm_available, f"no /dev/kvm in L1; console:\n{lab.console}"
    r = lab.run("ls -l /dev/kvm; cat /proc/modules; uname -r", check=True)
    assert r.stdout.startswith("crw")
    assert "kvm_amd " in r.stdout and "virtio_net " in r.stdout
    assert r.stdout.strip().endswith("cloud-amd64")


def test_kvm_api_version_create_vm_and_tiny_run(lab):
    """An L2 guest really runs: three real-mode instructions, one I/O exit, HLT."""
    r = lab.run("python3 tests/lab/kvm_smoke.py", timeout=300, check=True)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["api_version"] == 12
    assert report["vm_fd"] >= 0
    assert report["exits"] == [{"exit": "io", "out": True, "port": 0x10, "value": 0x42},
                               {"exit": "hlt"}]
    assert report["rip"] == 0x1005  # after the hlt


def test_import_vmscope_runs_the_checkout_under_test(lab):
    import vmscope

    r = lab.python("import vmscope, rich, elftools, capstone, unicorn, qemu.qmp; "
                   "print(vmscope.__file__); print(vmscope.__version__)", check=True)
    path, version = r.stdout.split()
    assert path == "/opt/vmscope/src/vmscope/__init__.py"
    assert version == vmscope.__version__


def test_exit_code_stdout_and_stderr_come_back_apart(lab):
    r = lab.run("echo to-out; echo to-err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "to-out\n", "to-err\n")
    assert not r.ok
    with pytest.raises(LabError, match="exited with 3"):
        r.check()
    r = lab.run(["printf", "%s|", "two words", "$HOME"])
    assert r.stdout == "two words|$HOME|"  # argv form: no shell


def test_stdin_and_environment(lab):
    r = lab.run("tr a-z A-Z; echo $GREETING", input="hello lab\n", env={"GREETING": "hi"})
    assert r.stdout == "HELLO LAB\nhi\n"


def test_timeout_kills_the_command_and_keeps_partial_output(lab):
    with pytest.raises(LabTimeout) as info:
        lab.run("echo started; sleep 600", timeout=3)
    assert info.value.result.stdout == "started\n"
    # the lab still works afterwards
    assert lab.run("echo alive").stdout == "alive\n"


def test_port_forwarding_reaches_a_server_in_l1(lab):
    server = ("import socket; s=socket.socket(); "
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              f"s.bind(('0.0.0.0', {FORWARDED_GUEST_PORT})); s.listen(1); print('listening', flush=True); "
              "c,_=s.accept(); c.sendall(b'echo:' + c.recv(100)); c.close()")
    with lab.spawn(["python3", "-c", server]) as proc:
        proc.wait_for_output("listening", timeout=120)
        with socket.create_connection(("127.0.0.1", lab.host_port(FORWARDED_GUEST_PORT)),
                                      timeout=60) as conn:
            conn.sendall(b"ping")
            reply = b""
            while chunk := conn.recv(100):
                reply += chunk
        assert reply == b"echo:ping"
        assert proc.wait(120).returncode == 0
    assert 14000 <= lab.host_port(FORWARDED_GUEST_PORT) <= 14999
    with pytest.raises(LabError, match="not forwarded"):
        lab.host_port(1234)


def test_spawned_process_can_be_signalled(lab):
    with lab.spawn("trap 'echo got-term; exit 9' TERM; echo ready; while true; do sleep 1; done") as p:
        p.wait_for_output("ready", timeout=60)
        p.signal()
        assert p.wait(60).returncode == 9
        assert "got-term" in p.stdout


def test_l2_guest_images_are_in_l1(lab):
    r = lab.run("ls $VMSCOPE_LAB_GUESTS/linux", check=True)
    assert r.stdout.split() == ["initramfs-workload.cpio.gz", "initramfs.cpio.gz", "vmlinuz"]


@pytest.mark.parametrize("accel", ["emu", "kvm"])
def test_host_gdb_debugs_a_vmscope_stub_inside_l1(lab, accel):
    """The lab's purpose: the VMM runs in L1 (real KVM for accel=kvm), the
    host's gdb reaches its stub through the forwarded port."""
    import shutil
    import subprocess
    from pathlib import Path

    import vmscope

    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.fail("gdb is not installed (./dev.sh setup installs it)")
    elf = Path(vmscope.__file__).parent / "guests/x86_64/demo.elf"
    cmd = f"python3 -m vmscope run --accel {accel} --gdb 0.0.0.0:{FORWARDED_GUEST_PORT}"
    with lab.spawn(cmd) as vm:
        vm.wait_for_output("waiting for gdb", timeout=300)
        port = lab.host_port(FORWARDED_GUEST_PORT)
        out = subprocess.run(
            [gdb, "-q", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}",
             "-ex", "info registers rip", "-ex", "stepi", "-ex", "info registers rip",
             "-ex", "kill", str(elf)],
            capture_output=True, text=True, timeout=300)
    rips = [int(m, 16) for m in re.findall(r"^rip\s+(0x[0-9a-f]+)", out.stdout, re.M)]
    assert len(rips) == 2, f"gdb said:\n{out.stdout}\n{out.stderr}\nvmscope said:\n{vm.stderr}"
    assert rips[1] > rips[0]
    # gdb resolved the stop address to one of the ELF's symbols
    assert re.search(r"^rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <(pvh_entry|start64)", out.stdout, re.M), out.stdout


def test_pytest_runs_the_checkouts_tests_inside_l1(lab):
    """How KVM tests run where the host has no usable KVM: pytest in L1 on
    the checkout's tests/ (carried in the source archive)."""
    r = lab.run("python3 -m pytest -q -p no:cacheprovider "
                "tests/unit/test_images_initramfs.py -k 'cpio_round_trip or parents_come_before'",
                timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^2 passed", r.stdout, re.M), r.stdout


def test_put_and_get_files_round_trip_binary_data(lab):
    blob = bytes(range(256)) * 64
    lab.put("/tmp/sub/blob.bin", blob, mode=0o600)
    assert lab.get("/tmp/sub/blob.bin") == blob
    assert lab.run("stat -c %a /tmp/sub/blob.bin").stdout.strip() == "600"
    with pytest.raises(LabError, match="cannot read /no/such/file"):
        lab.get("/no/such/file")


@pytest.mark.flaky(reruns=0)  # this test kills the lab on purpose: no second run
def test_a_lab_that_dies_says_so_and_the_next_test_gets_a_new_one(_session_lab):
    """A real L1 kernel panic (sysrq 'c') under a running command: the
    command's error says the lab itself died, with QEMU's status and L1's
    last console lines (the panic), and the suite's next request for the lab
    boots a new one instead of failing with "the lab is not running"."""
    from vmscope.lab.lab import LAB_DIED

    lab = _session_lab()
    with lab.spawn("sleep 2; echo c > /proc/sysrq-trigger; sleep 60") as proc:
        with pytest.raises(LabError) as died:
            proc.wait(300)
    message = str(died.value)
    assert LAB_DIED in message and "QEMU exited with status" in message, message
    assert re.search(r"sysrq|Kernel panic", message), message
    assert not lab.running
    with pytest.raises(LabError, match="the lab is not running; the lab itself died"):
        lab.spawn("true")
    fresh = _session_lab()
    assert fresh is not lab and fresh.running
    assert fresh.run("echo alive").stdout.strip() == "alive"
