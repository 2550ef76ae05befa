"""The lab's parts that need no L1: the agent protocol (agent.py run on the
host, driven by LabProcess), port picking, the image recipe, ELF parsing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import vmscope.lab.agent as agent_module
from vmscope.lab import LabError, LabTimeout
from vmscope.lab.foreign import RootSet, elf_needed
from vmscope.lab.image import INIT_SCRIPT, LabImageError, distributions_closure
from vmscope.lab.lab import Lab, LabProcess, free_ports, parse_port_range

AGENT_TEST_PORTS = (14900, 14949)


@pytest.fixture(scope="module")
def agent_port():
    """The real agent script, on the host, on a port from this suite's range."""
    port = free_ports(1, AGENT_TEST_PORTS)[0]
    proc = subprocess.Popen([sys.executable, agent_module.__file__, "--port", str(port),
                             "--ready-marker", "agent-ready"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("agent-ready port=")
        yield port
    finally:
        proc.kill()
        proc.wait()


def _spawn(port: int, cmd, **request) -> LabProcess:
    import json

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(None)
    sock.sendall(json.dumps({"cmd": cmd, **request}).encode() + b"\n")
    return LabProcess(sock, cmd)


def test_agent_returns_exit_status_and_separate_streams(agent_port):
    with _spawn(agent_port, "echo out; echo err >&2; exit 7") as p:
        p.close_stdin()
        r = p.wait(60)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert p.pid and p.pid > 0


def test_agent_passes_stdin_env_cwd_and_binary_output(agent_port, tmp_path):
    with _spawn(agent_port, "cat; echo $X; pwd; printf '\\377\\000'", env={"X": "y"},
                cwd=str(tmp_path)) as p:
        p.write("in\n")
        p.close_stdin()
        r = p.wait(60)
    assert r.stdout.startswith(f"in\ny\n{tmp_path}\n")
    assert p._out.endswith(b"\xff\x00")


def test_agent_signals_reach_the_process_group(agent_port):
    with _spawn(agent_port, "sleep 300 & wait") as p:
        p.signal(15)
        r = p.wait(60)
    assert r.returncode == -15


def test_agent_reports_commands_that_cannot_start(agent_port):
    with _spawn(agent_port, ["/no/such/program"]) as p:
        r = p.wait(60)
    assert r.returncode == 127
    assert "FileNotFoundError" in r.stderr


def test_timeout_kills_and_keeps_partial_output(agent_port):
    with _spawn(agent_port, "echo first; sleep 300") as p:
        p.wait_for_output("first", timeout=60)
        with pytest.raises(LabTimeout) as info:
            p.wait(0.5)
    assert info.value.result.stdout == "first\n"


def test_host_disconnect_kills_the_command(agent_port, tmp_path):
    marker = tmp_path / "still-running"
    p = _spawn(agent_port, f"sleep 2; touch {marker}")
    p._sock.shutdown(socket.SHUT_RDWR)  # what the kernel does when the host process dies
    p._sock.close()
    # the command would create the marker after 2 s; the agent kills it first
    p2 = _spawn(agent_port, "sleep 4; echo done")
    p2.close_stdin()
    assert p2.wait(60).stdout == "done\n"
    assert not marker.exists()


def test_port_ranges():
    assert parse_port_range("14000-14999") == (14000, 14999)
    for bad in ("14000", "2-1", "0-10", "a-b", "1-70000"):
        with pytest.raises(LabError, match="bad port range"):
            parse_port_range(bad)
    ports = free_ports(3, (14950, 14999))
    assert len(set(ports)) == 3 and all(14950 <= p <= 14999 for p in ports)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        busy.listen()
        with pytest.raises(LabError, match="no 1 free TCP ports"):
            free_ports(1, (taken, taken))


def test_lab_rejects_bad_arguments():
    with pytest.raises(LabError, match="no lab for architecture 'sparc'"):
        Lab(arch="sparc")
    with pytest.raises(LabError, match="agent"):
        Lab(forward=[7100])
    with pytest.raises(LabError, match="not running"):
        Lab().spawn("true")


def test_distribution_closure_follows_requirements():
    names = {d.metadata["Name"].lower() for d in distributions_closure(["rich"])}
    assert {"rich", "pygments", "markdown-it-py", "mdurl"} <= names
    with pytest.raises(LabImageError, match="pip install no-such-dist-xyz"):
        distributions_closure(["no-such-dist-xyz"])


def test_l1_init_script_is_valid_shell_and_sets_up_kvm_and_network():
    proc = subprocess.run(["/bin/busybox", "sh", "-n"], input=INIT_SCRIPT.encode(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    for must in ("insmod", "ip addr add 10.0.2.15/24 dev eth0", "agent.py --port 7100",
                 "vmscope-lab-kvm"):
        assert must in INIT_SCRIPT


def test_elf_needed_and_rootset_symlinks(tmp_path):
    needed, interp = elf_needed(Path("/usr/bin/python3.11"))
    assert "libc.so.6" in needed and interp == "/lib64/ld-linux-x86-64.so.2"
    assert elf_needed(Path("/bin/busybox")) == ([], None)
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "lib").mkdir(parents=True)
    (b / "usr/lib").mkdir(parents=True)
    (a / "lib/ld.so").symlink_to("../usr/lib/real-ld.so")  # crosses into the other root
    (b / "usr/lib/real-ld.so").write_text("x")
    roots = RootSet([a, b])
    assert roots.find("/lib/ld.so") == b / "usr/lib/real-ld.so"
    assert roots.find("/lib/missing.so") is None


def test_a_qemu_that_dies_at_once_is_reported_with_its_output(tmp_path):
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: could not load kernel' >&2\nexit 1\n")
    fake.chmod(0o755)
    lab = Lab(qemu=str(fake), port_range=(14950, 14999))
    with pytest.raises(LabError, match=r"(?s)did not boot: QEMU exited \(1\).*could not load kernel"):
        lab.start()
    with pytest.raises(LabError, match="needs at least"):
        Lab(mem_mib=16)


def test_extra_files_go_into_the_small_source_archive(tmp_path):
    from vmscope.images.cpio import read_cpio
    from vmscope.lab.image import source_image

    host = tmp_path / "tool.py"
    host.write_text("print('hi')\n")
    image = source_image(extra_files={"/root/tool.py": host, "/etc/flag": b"1"})
    out = tmp_path / "src.cpio.gz"
    image.write(out)
    entries = {e.name: e for e in read_cpio(out.read_bytes())}
    assert entries["root/tool.py"].data == b"print('hi')\n"
    assert entries["etc/flag"].data == b"1"
    assert "opt/vmscope/src/vmscope/lab/agent.py" in entries
    assert "opt/vmscope/src/tests/lab/kvm_smoke.py" in entries


def test_a_lost_agent_connection_says_how_the_lab_fared():
    """When L1 dies under a command, the agent's socket just closes: the
    error must carry the lab's own account (QEMU's status, the console's
    last lines) so a CI log shows the panic or OOM kill, not only "lost"."""
    host, agent = socket.socketpair()
    proc = LabProcess(host, "poweroff -f", post_mortem=lambda: "; QEMU exited with status 0; "
                      "L1 console, last lines:\nKernel panic - not syncing")
    agent.close()  # L1 gone: the connection ends with no exit frame
    with pytest.raises(LabError, match=r"(?s)was lost; QEMU exited with status 0.*Kernel panic"):
        proc.wait(10)
    with pytest.raises(LabError, match=r"(?s)did not appear.*was lost.*Kernel panic"):
        proc.wait_for_output("never", 5)
    proc.__exit__()


def test_a_lab_guest_whose_clock_stood_still_gets_the_rerun_and_no_other_failure_does():
    """The rerun rule of tests/lab_support.py: only a guest whose jiffies
    read the same at the last three or more stops; its error matches the rerun
    marker's pattern, a plain assertion's does not."""
    import re

    from tests.lab_support import LAB_GUEST_STALLED, GuestStalledInLab, raise_if_the_guest_clock_stood_still

    raise_if_the_guest_clock_stood_still([5, 5], "two stops say too little")
    raise_if_the_guest_clock_stood_still([5, 5, 6], "the clock moved: a real failure")
    raise_if_the_guest_clock_stood_still([5, 5, 5, 6, 6], "moving again at the end: a real failure")
    with pytest.raises(GuestStalledInLab) as exc:
        raise_if_the_guest_clock_stood_still([7, 7, 7, 7], "stuck")
    assert re.search(LAB_GUEST_STALLED, str(exc.value)) and "0x7 at the last 4 of 4 stops" in str(exc.value)
    with pytest.raises(GuestStalledInLab) as exc:  # stalled part-way
        raise_if_the_guest_clock_stood_still([5, 5, 5, 9, 9, 9], "stuck later")
    assert "0x9 at the last 3 of 6 stops" in str(exc.value)
    assert not re.search(LAB_GUEST_STALLED, str(AssertionError("both vCPUs stayed in the kernel")))


def test_a_vmm_whose_lab_guest_triple_faulted_gets_the_rerun_and_other_bad_endings_do_not():
    """ended_with_status_0 (tests/lab_support.py): status 0 passes; a
    non-zero status fails with both streams; one whose output reports a
    triple fault (the lab's emulated SVM under console load, which cannot
    be caused on demand: a finished ``LabResult`` stands in for the lab
    process) raises the error the rerun marker matches."""
    import re

    from tests.lab_support import LAB_GUEST_TRIPLE_FAULT, GuestTripleFaultInLab, ended_with_status_0
    from vmscope.lab.process import LabResult, LabTimeout

    class Ended:
        def __init__(self, status: int, stdout: str) -> None:
            self.result = LabResult("vmscope run", status, stdout, "")

        def wait(self, timeout: float) -> LabResult:
            return self.result

    assert ended_with_status_0(Ended(0, "Power down"), 1).stdout == "Power down"
    with pytest.raises(AssertionError) as exc:
        ended_with_status_0(Ended(1, "guest kernel panicked"), 1)
    assert not isinstance(exc.value, GuestTripleFaultInLab) and "guest kernel panicked" in str(exc.value)
    assert not re.search(LAB_GUEST_TRIPLE_FAULT, str(exc.value))
    with pytest.raises(GuestTripleFaultInLab) as exc:
        ended_with_status_0(Ended(1, "vmscope: guest stopped: triple fault (shutdown exit)"), 1)
    assert re.search(LAB_GUEST_TRIPLE_FAULT, str(exc.value)) and "status 1" in str(exc.value)

    class Hung(Ended):  # did not end: the partial output is what a test needs to see
        def wait(self, timeout: float) -> LabResult:
            raise LabTimeout("lab command 'vmscope run' did not finish", self.result)

    with pytest.raises(AssertionError) as exc:
        ended_with_status_0(Hung(-9, "# poweroff -f\n"), 1)
    assert not isinstance(exc.value, GuestTripleFaultInLab)
    assert "did not end within 1 s" in str(exc.value) and "# poweroff -f" in str(exc.value)
    with pytest.raises(GuestTripleFaultInLab):
        ended_with_status_0(Hung(-9, "vmscope: guest stopped: triple fault (shutdown exit)"), 1)


def test_a_lab_whose_agent_stopped_starting_commands_is_called_wedged_and_replaced(monkeypatch):
    """An L1 can stay up and still run nothing (CI once saw a guest's boot
    stall, then three tests fail with "the lab agent did not start"). A
    wedged L1 cannot be made on demand, so the real agent script stands in
    for L1's, stopped with SIGSTOP, and ``sleep`` for its QEMU. A timeout
    then says the lab is wedged (the rerun marker), the lab refuses further
    commands, and kept_lab boots a new one; while the agent answers, a
    timeout is the command's own."""
    import os
    import signal

    import vmscope.lab.lab as lab_module
    from tests.lab_support import kept_lab
    from vmscope.lab.lab import AGENT_PORT, LAB_WEDGED

    monkeypatch.setattr(lab_module, "AGENT_START_SECONDS", 2)
    port = free_ports(1, AGENT_TEST_PORTS)[0]
    agent = subprocess.Popen([sys.executable, agent_module.__file__, "--port", str(port),
                              "--ready-marker", "agent-ready"], stdout=subprocess.PIPE, text=True)
    qemu = subprocess.Popen(["sleep", "600"], start_new_session=True)  # close() kills its group
    lab = Lab()
    lab._proc, lab._ports = qemu, {AGENT_PORT: port}
    try:
        assert agent.stdout.readline().startswith("agent-ready port=")
        assert lab.run("true", timeout=30).returncode == 0 and lab.usable
        with lab.spawn("sleep 30") as slow:
            with pytest.raises(LabTimeout) as answered:
                slow.wait_for_output("never", 0.5)
            assert LAB_WEDGED not in str(answered.value) and lab.usable
            os.kill(agent.pid, signal.SIGSTOP)
            with pytest.raises(LabTimeout, match=f"{LAB_WEDGED}: its agent did not start"):
                slow.wait_for_output("never", 0.5)
            os.kill(agent.pid, signal.SIGCONT)  # so that leaving the block can kill the sleep
        assert lab.running and not lab.usable
        with pytest.raises(LabError, match=f"{LAB_WEDGED} before 'true'"):
            lab.spawn("true")

        class NewLab:
            usable = running = True
            started = closed = False
            console_log = None

            def start(self):
                self.started = True

            def close(self):
                self.closed = True

        made = iter([lab, NewLab()])
        fixture = kept_lab(lambda: next(made))
        lab.start = lambda: None  # already "started" above
        running = next(fixture)
        assert running() is lab  # the first call makes the (now wedged) lab
        fresh = running()
        assert fresh is not lab and fresh.started
    finally:
        os.kill(agent.pid, signal.SIGCONT)
        agent.kill()
        agent.wait()
        qemu.kill()
        qemu.wait()
