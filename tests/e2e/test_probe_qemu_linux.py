"""Probes, ``vmscope trace`` and the kernel helpers against a real Debian
cloud kernel under ``qemu-system-x86_64 -accel tcg -smp 2`` (KASLR on, no
vmlinux, shared RAM through QMP). What a probe reports must match what the
guest prints about the process the test starts; whatever way a probing
script ends, a stock gdb must then read the same kernel text as before and
the guest must run on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.support import ROOT, free_port, require_tool

from vmscope.client.helpers.qemu_launch import QemuGuest
from vmscope.client.inspect_cli import main as inspect_main
from vmscope.client.session import Inspector
from vmscope.vmi.errors import VmiError
from vmscope.vmi.linux.user import UserMemoryError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OPENAT = "__x64_sys_openat"


@pytest.fixture(scope="module")
def guest():
    require_tool("qemu-system-x86_64")
    from vmscope.images.linux import READY_MARKER, build_linux_guest

    image = build_linux_guest(mode="shell", quiet=True)
    # KASLR stays on: no nokaslr on the command line.
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), free_port(), free_port(), extra=["-smp", "2"]) as vm:
        vm.console.wait_for(READY_MARKER.encode())
        vm.console.run("true")  # the shell is up
        yield vm


def in_guest_soon(vm: QemuGuest, command: str, delay: float = 1.0) -> dict:
    """Run ``command`` in the guest's shell from another thread after
    ``delay`` (the probe loop holds this one); the output lands in the dict."""
    result: dict = {}

    def go():
        time.sleep(delay)
        try:
            result["out"] = vm.console.run(command, timeout=180)
        except Exception as e:  # reported by the test that reads result
            result["error"] = e

    result["thread"] = threading.Thread(target=go, daemon=True)
    result["thread"].start()
    return result


def kallsyms(vm: QemuGuest, name: str) -> int:
    """A symbol's address as the guest's own /proc/kallsyms says."""
    line = vm.console.run(f"grep -w {name} /proc/kallsyms | head -n 1")
    return int(line.split()[0], 16)


def stock_gdb_read(vm: QemuGuest, addr: int, length: int) -> bytes:
    """Bytes at a virtual address as a stock gdb (batch mode) reads them."""
    out = subprocess.run(
        [require_tool("gdb"), "-nx", "-batch", "-ex", "set confirm off", "-ex", f"target remote {vm.gdb}",
         "-ex", f"x/{length}xb {addr:#x}", "-ex", "detach"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    values = re.findall(r"\t0x([0-9a-f]{2})", out.stdout)
    assert len(values) == length, f"gdb did not read {length} bytes:\n{out.stdout}\n{out.stderr}"
    return bytes(int(v, 16) for v in values)


def started_process(out: str) -> int:
    m = re.search(r"pid=(\d+)", out)
    assert m, out
    return int(m.group(1))


def test_probe_reports_the_process_that_opens_a_file(guest):
    marker = f"/tmp/vmscope-probe-{uuid.uuid4().hex[:8]}"
    guest.console.run(f"echo hello > {marker}")
    seen = []
    # sh prints its pid, then becomes cat (same pid) and opens the file.
    job = in_guest_soon(guest, f"sh -c 'echo pid=$$; exec cat {marker}'")
    with Inspector(guest.gdb, guest.qmp, timeout=30) as vm:
        assert vm.memory_path == "qemu-shared-ram"

        @vm.probe([OPENAT, "do_sys_openat2"], condition=lambda hit: hit.decoded_args()["filename"] == marker)
        def opened(hit):
            seen.append((hit.symbol, hit.task.pid, hit.task.tgid, hit.task.comm, hit.cpu, hit.args["filename"],
                         hit.read(hit.args["filename"], len(marker))))

        result = vm.run(hits=2, seconds=120)
    job["thread"].join(60)
    assert "error" not in job, job.get("error")
    assert "hello" in job["out"]
    pid = started_process(job["out"])
    assert result.reason == "hits", (result, seen)
    # the syscall wrapper first, then the function it calls: same task, same file
    assert [s[0] for s in seen] == [OPENAT, "do_sys_openat2"]
    for _symbol, hit_pid, tgid, comm, cpu, _ptr, raw in seen:
        assert (hit_pid, tgid, comm) == (pid, pid, "cat")
        assert cpu in (0, 1)
        assert raw == marker.encode()  # hit.read of a user pointer: the calling process's memory


def test_vmscope_trace_prints_the_hit_and_a_summary(guest):
    marker = f"/tmp/vmscope-trace-{uuid.uuid4().hex[:8]}"
    job = in_guest_soon(guest, f"sh -c 'echo pid=$$; exec cat {marker}'", delay=3)
    cmd = [sys.executable, "-m", "vmscope", "trace", OPENAT, "--gdb", guest.gdb, "--qmp", guest.qmp,
           "--comm", "cat", "--count", "1", "--seconds", "120"]
    json_run = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    job["thread"].join(60)
    assert json_run.returncode == 0, json_run.stderr
    pid = started_process(job["out"])
    *hits, summary = [json.loads(line) for line in json_run.stdout.splitlines()]
    assert [(h["pid"], h["comm"], h["function"], h["args"]["filename"], h["args"]["dfd"]) for h in hits] == \
           [(pid, "cat", OPENAT, marker, -100)]  # AT_FDCWD, signed as the syscall's int says
    assert summary["summary"]["hits"] == 1 and summary["summary"]["by_comm"] == {"cat": 1}

    job = in_guest_soon(guest, f"sh -c 'echo pid=$$; exec cat {marker}'", delay=3)
    text_run = subprocess.run(cmd + ["--args", "filename,flags:x"], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
    job["thread"].join(60)
    assert text_run.returncode == 0, text_run.stderr
    pid = started_process(job["out"])
    line, summary_line = text_run.stdout.splitlines()
    assert re.fullmatch(rf"\s*\d+\.\d+ cpu[01]\s+{pid} cat\s+{OPENAT}\(filename=\"{marker}\", flags=0x0\)", line), line
    assert summary_line.startswith("1 hits") and "cat 1" in summary_line


def test_current_task_and_cpu_on_every_vcpu(guest):
    with Inspector(guest.gdb, guest.qmp, timeout=30) as vm:
        kernel = vm.kernel()
        from vmscope.vmi.linux.current import task_cpu

        cpus = {}
        for tid in vm.client.threads():
            vm.client.select_thread(tid)
            regs = vm.client.registers()
            cpu = kernel.cpu_from_registers(regs)  # from the GS base, not the thread number
            task = kernel.task_from_address(kernel.current_task(regs))
            assert task_cpu(kernel, task) == cpu  # the kernel's own record of where it runs
            cpus[tid] = cpu
        assert sorted(cpus.values()) == [0, 1]


def test_find_task_and_its_memory(guest):
    # wait for the exec: between fork and exec the child is still "sh"
    out = guest.console.run('sleep 3600 & p=$!; while [ "$(cat /proc/$p/comm)" != sleep ]; do :; done; echo pid=$p')
    pid = started_process(out)
    try:
        with Inspector(guest.gdb, guest.qmp, timeout=30) as vm:
            kernel = vm.kernel()
            task = kernel.find_task(pid)
            assert (task.pid, task.comm) == (pid, "sleep")
            assert kernel.task_from_address(task.address) == task
            mm = kernel.member(task.address, "task_struct", "mm")
            start, end = (kernel.member(mm, "mm_struct", f) for f in ("arg_start", "arg_end"))
            assert kernel.user_read(task, start, end - start) == b"sleep\x003600\x00"
            assert kernel.user_string(task, start) == "sleep"
            with pytest.raises(UserMemoryError, match=rf"pid {pid} \(sleep\): 0x1000 .*not mapped in its user "
                                                      "address space"):
                kernel.user_read(task, 0x1000, 8)
            with pytest.raises(VmiError, match="user-space address"):
                kernel.read(0x1000, 8)
            assert kernel.symbol(OPENAT) == kernel.address_of(OPENAT) == kernel.symbols[OPENAT]
    finally:
        guest.console.run(f"kill {pid}")


def test_inspect_options_after_the_subcommand(guest, capsys):
    rc = inspect_main(["ps", "--gdb", guest.gdb, "--qmp", guest.qmp, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)[0]["comm"] == "swapper/0"


PROBING_SCRIPT = r"""
import sys
from vmscope.client.session import Inspector
gdb, qmp, ending, memory = sys.argv[1:5]
vm = Inspector(gdb, qmp, memory=memory, timeout=30)  # no with: the script's ending alone must clean up
vm.probe("do_sys_openat2", lambda hit: None, hardware=True)

@vm.probe("__x64_sys_openat")
def opened(hit):
    print("hit", hit.task.pid, hit.task.comm, flush=True)
    if ending == "exception":
        raise RuntimeError("boom in a probe callback")

vm.run(seconds=300)
"""


def assert_guest_runs(guest: QemuGuest) -> None:
    """The guest answers on its console, with the loop's opens going on:
    no breakpoint of ours stops it any more."""
    started = time.monotonic()
    assert "alive" in guest.console.run("cat /etc/passwd >/dev/null; echo alive", timeout=60)
    assert time.monotonic() - started < 30


# The RSP memory path puts QEMU in physical-memory mode while it reads: the
# endings the script sees must restore it. A SIGKILL can restore nothing, so
# that one reads through shared RAM, as a user who wants that safety would.
@pytest.mark.parametrize("ending,memory", [("exception", "rsp"), ("sigterm", "rsp"), ("sigkill", "auto")])
def test_any_ending_of_a_probing_script_leaves_the_guest_clean(guest, ending, memory, tmp_path):
    text = kallsyms(guest, OPENAT)
    before = stock_gdb_read(guest, text, 32)
    guest.console.run("(while :; do head -c1 /etc/passwd >/dev/null; sleep 0.3; done) & echo $! > /tmp/loop.pid")
    try:
        script = tmp_path / "probing.py"
        script.write_text(PROBING_SCRIPT)
        proc = subprocess.Popen([sys.executable, str(script), guest.gdb, guest.qmp, ending, memory], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        first = proc.stdout.readline()
        assert first.startswith("hit "), (first, proc.stderr.read() if proc.poll() is not None else "")
        if ending == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif ending == "sigkill":
            proc.kill()
        _out, err = proc.communicate(timeout=120)
        expected = {"exception": 1, "sigterm": 128 + signal.SIGTERM, "sigkill": -signal.SIGKILL}[ending]
        assert proc.returncode == expected, err
        if ending == "exception":
            assert "boom in a probe callback" in err
        if ending != "sigkill":
            # The script left the guest running by itself (QEMU keeps a VM
            # stopped when its debugger just vanishes).
            assert_guest_runs(guest)
        # A stock gdb reads the kernel text as it was (QEMU's breakpoints do
        # not patch it, but a memory mode left physical would show zeros)...
        assert stock_gdb_read(guest, text, 32) == before
        # ... and the guest runs on.
        assert_guest_runs(guest)
    finally:
        guest.console.run("kill $(cat /tmp/loop.pid)")


def doc_examples() -> list[str]:
    text = (ROOT / "docs" / "python-api.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_documented_examples_run(guest):
    """docs/python-api.md's examples, as printed there but for the addresses,
    while the guest runs cat now and then."""
    blocks = doc_examples()
    assert len(blocks) == 4
    guest.console.run("(while :; do sh -c 'exec cat /etc/passwd' >/dev/null; sleep 0.3; done) & "
                      "echo $! > /tmp/doc-loop.pid")
    outputs = []
    try:
        for block in blocks:
            code = block.replace("localhost:1234", guest.gdb).replace("localhost:4444", guest.qmp)
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert run.returncode == 0, f"{block}\n{run.stderr}"
            outputs.append(run.stdout)
    finally:
        guest.console.run("kill $(cat /tmp/doc-loop.pid)")
    counter, condition, memory, vcpus = outputs
    assert re.search(r"^\d+ opens in", counter) and re.search(r"\s\d+\s+\d+ cat\s+/etc/passwd$", counter, re.M), counter
    assert re.search(r"cpu[01] \d+ __x64_sys_openat \{'dfd': -100, 'filename': '/etc/passwd'", condition), condition
    assert re.search(r"cpu[01] \d+ do_sys_openat2 ", condition) and "reason='stopped'" in condition, condition
    assert "init [b'/bin/sh', b'/init', b'']" in memory and "pid 1 (init): 0x1000 (+8) is not mapped" in memory
    assert sorted(re.findall(r"Linux CPU (\d+)", vcpus)) == ["0", "1"], vcpus


def test_cont_waits_the_inspectors_timeout_by_default(guest):
    from vmscope.client.transport import StubTimeout

    vm = Inspector(guest.gdb, guest.qmp, timeout=2)
    started = time.monotonic()
    with pytest.raises(StubTimeout):
        vm.cont()  # no breakpoint: nothing stops the guest
    assert 1.5 < time.monotonic() - started < 10
    vm.close()  # stops the running guest, cleans up, detaches
    assert "alive" in guest.console.run("echo alive", timeout=60)


def test_stops_that_are_not_hits_are_counted_apart(guest):
    with Inspector(guest.gdb, guest.qmp, timeout=30) as vm:
        calls = []
        vm.probe("__x64_sys_reboot", calls.append)  # never called while the test runs
        with pytest.raises(ValueError, match="__x64_sys_reboot .* already has a probe"):
            vm.probe(["__x64_sys_sync", "__x64_sys_reboot"], calls.append)
        threading.Timer(1.0, vm.client.interrupt).start()  # another stop: a debugger's Ctrl-C
        result = vm.run(seconds=4)
    assert (result.hits, result.reason, calls) == (0, "seconds", [])
    assert result.other_stops == 1
    assert "alive" in guest.console.run("echo alive", timeout=60)


def test_vmscope_trace_ends_on_ctrl_c_with_its_summary(guest):
    guest.console.run("(while :; do head -c1 /etc/passwd >/dev/null; sleep 0.3; done) & echo $! > /tmp/loop.pid")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vmscope", "trace", OPENAT, "--gdb", guest.gdb, "--qmp",
                                 guest.qmp], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        assert f" {OPENAT}(dfd=-100, filename=" in first, (first, proc.stderr.read() if proc.poll() else "")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        summary = out.splitlines()[-1]
        assert re.match(r"\d+ hits \(signal\)", summary), out
        assert_guest_runs(guest)
    finally:
        guest.console.run("kill $(cat /tmp/loop.pid)")
