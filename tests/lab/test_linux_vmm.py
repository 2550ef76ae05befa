"""A stock Debian kernel under vmscope's own KVM VMM, inside the nested lab.

One lab for the module (L1 with real KVM); each test starts `vmscope run`
in L1 on Debian's cloud kernel and the project's busybox initramfs (the L2
guest) and talks to it the way a user would: through a terminal (a pty in
L1, so `vmscope run` sees a tty and forwards keys to COM1) or through stock
gdb on the host via a forwarded port.
"""

from __future__ import annotations

import re

import pytest

from vmscope.lab import LabTimeout

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PORTS = (19000, 19099)
GDB_GUEST_PORT = 19500
BOOT_TIMEOUT = 300
GUESTS = "$VMSCOPE_LAB_GUESTS/linux"

# `vmscope run` on a pty: pty.spawn copies our stdin (a pipe) to the
# terminal and the terminal to our stdout, as a user's terminal would.
PTY_RUN = ("python3 -c 'import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)' "
           "python3 -m vmscope run --accel kvm")


@pytest.fixture(scope="module")
def lab():
    from tests.lab.conftest import _require
    from vmscope.lab import Lab

    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "/usr/bin/python3.11"):
        _require(tool)
    with Lab(cpus=2, mem_mib=2048, forward=[GDB_GUEST_PORT], port_range=PORTS) as lab:
        yield lab


def vm_command(initrd: str = "initramfs.cpio.gz", append: str = "console=ttyS0 quiet panic=-1",
               cpus: int = 2, extra: str = "", pty: bool = True) -> str:
    run = PTY_RUN if pty else "python3 -m vmscope run --accel kvm"
    return (f"{run} --kernel {GUESTS}/vmlinuz --initrd {GUESTS}/{initrd} "
            f"--cpus {cpus} --mem 512 --append '{append}' {extra}")


def expect(vm, pattern: str, timeout: float = 120) -> re.Match:
    try:
        return vm.wait_for_output(pattern, timeout=timeout)
    except LabTimeout:
        pytest.fail(f"no {pattern!r} on the console; it said:\n{vm.stdout[-3000:]}\nstderr:\n{vm.stderr[-3000:]}")


def test_shell_session_over_the_console_and_poweroff(lab):
    """Boot with 2 vCPUs to the ready marker, type commands at the shell,
    read their output back, then `poweroff -f` ends vmscope with status 0."""
    with lab.spawn(vm_command()) as vm:
        expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
        vm.write("echo round-$((6 * 7))-trip\n")
        expect(vm, r"round-42-trip")
        vm.write("echo nproc=$(nproc)\n")
        m = expect(vm, r"nproc=(\d+)")
        assert m.group(1) == "2", vm.stdout[-2000:]
        vm.write("echo cpus=$(grep -c ^processor /proc/cpuinfo); grep -m1 '^model name' /proc/cpuinfo\n")
        m = expect(vm, r"cpus=(\d+)")
        assert m.group(1) == "2"
        expect(vm, r"model name\s*:")
        vm.write("poweroff -f\n")
        result = vm.wait(120)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    assert "Power down" in result.stdout or "reboot" in result.stdout


def test_reboot_ends_the_vmm_with_status_0(lab):
    with lab.spawn(vm_command(cpus=1)) as vm:
        expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
        vm.write("reboot -f\n")
        result = vm.wait(120)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr


def test_kernel_panic_is_reported_with_console_lines_and_a_nonzero_status(lab):
    """A panic (here: init exits at once, `rdinit=/bin/true`) reboots the
    guest (panic=-1); vmscope reports it with the last console lines."""
    cmd = vm_command(append="console=ttyS0 quiet panic=-1 rdinit=/bin/true", cpus=1, pty=False)
    r = lab.run(f"timeout 280 {cmd} </dev/null", timeout=300)
    assert r.returncode == 1, f"stdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-2000:]}"
    assert "guest kernel panicked" in r.stderr
    assert "Attempted to kill init" in r.stderr
