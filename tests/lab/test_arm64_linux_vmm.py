"""Debian's arm64 kernel under vmscope's own arm64 VMM, inside the arm64
nested lab (``qemu-system-aarch64 -M virt,virtualization=on,gic-version=3
-cpu max`` under TCG; L1's KVM is real).

One lab for the module; each test starts ``vmscope run --arch aarch64`` in
L1 on the kernel and busybox initramfs the lab carries (the L2 guest) and
talks to it as a user would: through a terminal (a pty in L1) for the
console. Boot times are printed at the end (``pytest -s``).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.lab.conftest import require_arm64
from vmscope.lab import LabTimeout

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PORTS = (17100, 17199)
GDB_GUEST_PORT = 17500
BOOT_TIMEOUT = 600
GUESTS = "$VMSCOPE_LAB_GUESTS/linux"
MEASURED: dict[str, float] = {}

PTY_RUN = ("python3 -c 'import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)' "
           "python3 -m vmscope run --arch aarch64 --accel kvm")


@pytest.fixture(scope="module")
def lab():
    require_arm64()
    from vmscope.lab import Lab

    t0 = time.monotonic()
    with Lab(arch="aarch64", cpus=2, mem_mib=2048, forward=[GDB_GUEST_PORT], port_range=PORTS,
             boot_timeout=900) as lab:
        MEASURED["lab_start_s"] = time.monotonic() - t0
        yield lab
    print("\narm64 Linux VMM measurements: " + json.dumps({k: round(v, 2) for k, v in MEASURED.items()}))


def vm_command(append: str = "console=ttyS0 quiet panic=-1", cpus: int = 2, extra: str = "",
               pty: bool = True) -> str:
    run = PTY_RUN if pty else "python3 -m vmscope run --arch aarch64 --accel kvm"
    return (f"{run} --kernel {GUESTS}/vmlinuz --initrd {GUESTS}/initramfs.cpio.gz "
            f"--cpus {cpus} --mem 512 --append '{append}' {extra}")


def expect(vm, pattern: str, timeout: float = 180) -> re.Match:
    try:
        return vm.wait_for_output(pattern, timeout=timeout)
    except LabTimeout:
        pytest.fail(f"no {pattern!r} on the console; it said:\n{vm.stdout[-3000:]}\nstderr:\n{vm.stderr[-3000:]}")


def interrupt_counts(text: str) -> dict[str, int]:
    """Total count per interrupt name from one /proc/interrupts listing
    (columns: number, one count per CPU, controller, hwirq, type, name)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\w+):((?:\s+\d+)+)\s+(.*)$", line)
        if m:
            counts[m.group(3).split()[-1]] = sum(int(n) for n in m.group(2).split())
    return counts


def read_interrupts(vm, tag: str) -> dict[str, int]:
    vm.write(f"echo {tag}-begin; cat /proc/interrupts; echo {tag}-end\n")
    m = expect(vm, rf"\n{tag}-begin\r?\n(.*?)\n{tag}-end")
    return interrupt_counts(m.group(1))


def test_shell_session_two_cpus_interrupts_and_poweroff(lab):
    """Boot with 2 vCPUs to the ready marker (the second comes up through
    PSCI CPU_ON), type at the shell, see the timer and UART interrupts
    counting, then `poweroff -f` ends vmscope with status 0."""
    t0 = time.monotonic()
    with lab.spawn(vm_command()) as vm:
        expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
        MEASURED["boot_to_ready_s"] = time.monotonic() - t0
        vm.write("echo round-$((6 * 7))-trip\n")
        expect(vm, r"round-42-trip")
        vm.write("echo nproc=$(nproc)\n")
        assert expect(vm, r"nproc=(\d+)").group(1) == "2", vm.stdout[-2000:]
        first = read_interrupts(vm, "irqs1")
        time.sleep(2)
        second = read_interrupts(vm, "irqs2")
        timer = next((k for k in first if "timer" in k), None)
        uart = next((k for k in first if k in ("ttyS0", "serial")), None)
        assert timer is not None and uart is not None, f"no timer or UART line in /proc/interrupts: {first}"
        assert second[timer] > first[timer] > 0, (first, second)
        assert second[uart] > first[uart] > 0, (first, second)  # our typing and its echo
        vm.write("poweroff -f\n")
        result = vm.wait(180)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    assert "Power down" in result.stdout or "reboot" in result.stdout


def test_reboot_ends_the_vmm_with_status_0(lab):
    with lab.spawn(vm_command(cpus=1)) as vm:
        expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
        vm.write("reboot -f\n")
        result = vm.wait(180)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr


def test_kernel_panic_is_reported_with_console_lines_and_a_nonzero_status(lab):
    """A panic (init exits at once: ``rdinit=/bin/true``) reboots the guest
    (panic=-1) through PSCI SYSTEM_RESET; vmscope reports it with the last
    console lines and status 1."""
    cmd = vm_command(append="console=ttyS0 quiet panic=-1 rdinit=/bin/true", cpus=1, pty=False)
    r = lab.run(f"timeout 500 {cmd} </dev/null", timeout=600)
    assert r.returncode == 1, f"stdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-2000:]}"
    assert "guest kernel panicked" in r.stderr
    assert "Attempted to kill init" in r.stderr
