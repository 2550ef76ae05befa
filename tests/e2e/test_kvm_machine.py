"""The KVM micro-VMM end to end on the real /dev/kvm: booting, SMP, serial
in and out, and how a guest's end is reported.

Skipped without /dev/kvm, failed instead when VMSCOPE_REQUIRE_KVM=1.
Deadlines below are generous upper bounds for waiting, never assertions
about speed.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import time

import pytest

from tests.unit.test_kvm_boot import make_pvh_elf
from vmscope.guests import guest_symbols
from vmscope.machine import MachineConfig, MachineUnavailable

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

# 32-bit guests, hand-assembled (see each comment).
CLI_HLT = bytes.fromhex("faf4")  # cli; hlt
EXIT_42 = bytes.fromhex("b02ae6f4f4")  # mov $42,%al; out %al,$0xf4; hlt
UD2 = bytes.fromhex("0f0b")  # ud2 with no IDT: #UD -> ... -> triple fault
# loop: wait for LSR.DR, read a byte, 'q' -> out 0 to port 0xf4, else echo byte+1
ECHO_PLUS_ONE = bytes.fromhex("66bafd03eca80174f766baf803ec3c717405fec0eeebe9b000e6f4")


class SerialSink:
    """A thread-safe serial_out that tests can wait on."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._cond = threading.Condition()

    def write(self, b: bytes) -> int:
        with self._cond:
            self.data += b
            self._cond.notify_all()
        return len(b)

    def flush(self) -> None:
        pass

    def wait_for(self, pattern: bytes, deadline: float = 120.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: re.search(pattern, bytes(self.data)) is not None, deadline)


def require_kvm() -> None:
    """Skip without a usable /dev/kvm, fail instead under VMSCOPE_REQUIRE_KVM=1.
    (Kept here rather than in tests.support so the file runs inside the
    nested lab, which carries no pexpect.)"""
    if not (os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        if os.environ.get("VMSCOPE_REQUIRE_KVM") == "1":
            pytest.fail("VMSCOPE_REQUIRE_KVM=1 but /dev/kvm is missing or not accessible")
        pytest.skip("needs /dev/kvm")


def make_machine(**config):
    """A KvmMachine, or skip/fail per VMSCOPE_REQUIRE_KVM when KVM is unusable."""
    require_kvm()
    from vmscope.kvm.vm import KvmMachine

    try:
        return KvmMachine(MachineConfig(**config))
    except MachineUnavailable as e:
        if os.environ.get("VMSCOPE_REQUIRE_KVM") == "1":
            pytest.fail(f"VMSCOPE_REQUIRE_KVM=1 but KVM is unusable: {e}")
        pytest.skip(str(e))


def tiny_guest(tmp_path, code: bytes, name: str = "tiny.elf"):
    path = tmp_path / name
    path.write_bytes(make_pvh_elf(code))
    return path


def test_demo_guest_boots_on_two_vcpus():
    out = SerialSink()
    m = make_machine(cpus=2, serial_out=out)
    try:
        m.start()
        assert out.wait_for(rb"cpu 0 up\n[\s\S]*cpu 1 up\n|cpu 1 up\n[\s\S]*cpu 0 up\n"), out.data
        assert m.wait(0) is None  # still running
    finally:
        m.shutdown()
    assert m.wait(5) == 0  # torn down by the host: no error status


def test_every_vcpu_runs_the_demo_loop():
    out = SerialSink()
    m = make_machine(cpus=2, serial_out=out)
    sym = guest_symbols("demo")
    try:
        m.start()
        assert out.wait_for(rb"cpu 1 up")
        base = sym["per_cpu_counter"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if m.mem.read_u64(base) > 0 and m.mem.read_u64(base + 8) > 0:
                break
            time.sleep(0.05)
        assert m.mem.read_u64(base) > 0 and m.mem.read_u64(base + 8) > 0
    finally:
        m.shutdown()


def test_guest_ram_is_a_shareable_memfd():
    out = SerialSink()
    m = make_machine(cpus=1, serial_out=out, mem_mib=64)
    sym = guest_symbols("demo")
    try:
        m.start()
        assert out.wait_for(rb"cpu 0 up")
        # Another mapper (as vmscope inspect would) sees the guest's counter move.
        with mmap.mmap(m.mem.fd, m.mem.size, mmap.MAP_SHARED, mmap.PROT_READ) as other:
            first = int.from_bytes(other[sym["counter"] : sym["counter"] + 8], "little")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if int.from_bytes(other[sym["counter"] : sym["counter"] + 8], "little") > first:
                    break
                time.sleep(0.05)
            assert int.from_bytes(other[sym["counter"] : sym["counter"] + 8], "little") > first
        assert m.mem.size == 64 << 20
    finally:
        m.shutdown()


def test_halt_with_interrupts_off_ends_the_vm_with_a_report(tmp_path, capfd):
    m = make_machine(kernel=tiny_guest(tmp_path, CLI_HLT), serial_out=SerialSink())
    try:
        m.start()
        assert m.wait(60) == 1
    finally:
        m.shutdown()
    err = capfd.readouterr().err
    assert "halted with interrupts off" in err
    assert "vCPU 0: rip=0x100002" in err  # the report carries the registers


def test_triple_fault_ends_the_vm_with_a_report(tmp_path, capfd):
    m = make_machine(kernel=tiny_guest(tmp_path, UD2), serial_out=SerialSink())
    try:
        m.start()
        assert m.wait(60) == 1
    finally:
        m.shutdown()
    err = capfd.readouterr().err
    assert re.search(r"vmscope: guest stopped: (triple fault|emulation failure).*vCPU 0: rip=", err), err


def test_exit_port_sets_the_status(tmp_path):
    m = make_machine(kernel=tiny_guest(tmp_path, EXIT_42), serial_out=SerialSink())
    try:
        m.start()
        assert m.wait(60) == 42
    finally:
        m.shutdown()


def test_serial_input_reaches_the_guest(tmp_path):
    out = SerialSink()
    r, w = os.pipe()
    m = make_machine(kernel=tiny_guest(tmp_path, ECHO_PLUS_ONE), serial_out=out, serial_in=r)
    try:
        m.start()
        os.write(w, b"HAL")
        assert out.wait_for(rb"IBM"), out.data  # each byte came back +1 through the guest
        os.write(w, b"q")
        assert m.wait(60) == 0
    finally:
        m.shutdown()
        os.close(w)
        os.close(r)


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


def test_only_vcpu0_starts_without_the_vmscope_note(tmp_path):
    m = make_machine(kernel=tiny_guest(tmp_path, EXIT_42), cpus=2, serial_out=SerialSink())
    try:
        assert not m.plan.all_cpus_at_entry
        m.start()
        assert m.wait(60) == 42
        assert [s.online for s in m.vcpus] == [True, False]
    finally:
        m.shutdown()


def test_debugger_kill_ends_with_status_zero():
    m = make_machine(cpus=2, serial_out=SerialSink())
    try:
        m.start()
        m.debug_target().kill()
        assert m.wait(30) == 0
    finally:
        m.shutdown()


def test_missing_kvm_device_is_explained():
    from vmscope.kvm.vm import open_kvm

    with pytest.raises(MachineUnavailable, match="/nonexistent/kvm does not exist"):
        open_kvm("/nonexistent/kvm")
    with pytest.raises(MachineUnavailable, match="not a KVM device"):
        open_kvm("/dev/null")


def test_bad_kernel_is_an_image_error(tmp_path):
    from vmscope.machine import ImageError

    require_kvm()
    from vmscope.kvm.vm import KvmMachine

    with pytest.raises(ImageError, match="missing.elf: no such file"):
        KvmMachine(MachineConfig(kernel=tmp_path / "missing.elf"))


def test_debug_capability_probe_classifies_this_kvm():
    """The probe that picks debug registers or page protection. Known
    answers: hardware KVM (True, True, "debug"); PVM (False, True,
    "emulation-failure"); KVM nested under QEMU TCG SVM (False, False,
    "guest")."""
    require_kvm()
    from vmscope.kvm.probe import probe

    caps = probe()
    print(caps)
    assert isinstance(caps.dr_write_watch, bool) and isinstance(caps.dr_exec, bool)
    assert caps.int3 in ("debug", "emulation-failure", "guest"), caps
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert (caps.dr_write_watch, caps.int3) == (False, "emulation-failure")


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
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None, "SIGUSR1 ended vmscope"
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    text = err.decode(errors="replace")
    assert "Thread 0x" in text and "_vcpu_loop" in text, text[-3000:]
