"""The KVM micro-VMM in this process on the real /dev/kvm: booting, SMP,
serial in and out, and how a guest's end is reported (``vmscope run`` as a
process: tests/e2e/test_kvm_run.py).

Skipped without /dev/kvm, failed instead when VMSCOPE_REQUIRE_KVM=1.
Deadlines below are generous upper bounds for waiting, never assertions
about speed.
"""

from __future__ import annotations

import mmap
import os
import re
import time

import pytest

from tests.kvm_support import CLI_HLT, ECHO_PLUS_ONE, EXIT_42, UD2, SerialSink, make_machine, require_kvm, tiny_guest
from vmscope.guests import guest_symbols
from vmscope.machine import MachineConfig, MachineUnavailable

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


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
    from vmscope.kvm.system import open_kvm

    with pytest.raises(MachineUnavailable, match="/nonexistent/kvm does not exist"):
        open_kvm("/nonexistent/kvm")
    with pytest.raises(MachineUnavailable, match="not a KVM device"):
        open_kvm("/dev/null")


def test_bad_kernel_is_an_image_error(tmp_path):
    from vmscope.machine import ImageError

    require_kvm()
    from vmscope.kvm.x86.machine import KvmMachine

    with pytest.raises(ImageError, match="missing.elf: no such file"):
        KvmMachine(MachineConfig(kernel=tmp_path / "missing.elf"))


def test_debug_capability_probe_classifies_this_kvm():
    """The probe that picks debug registers or page protection. Known
    answers: hardware KVM (True, True, "debug"); PVM (False, True,
    "emulation-failure"); KVM nested under QEMU TCG SVM (False, False,
    "guest")."""
    require_kvm()
    from vmscope.kvm.x86.probe import probe

    caps = probe()
    print(caps)
    assert isinstance(caps.dr_write_watch, bool) and isinstance(caps.dr_exec, bool)
    assert caps.int3 in ("debug", "emulation-failure", "guest"), caps
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert (caps.dr_write_watch, caps.int3) == (False, "emulation-failure")
