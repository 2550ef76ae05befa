"""Debian's arm64 kernel under vmscope's own arm64 VMM, inside the arm64
nested lab (``qemu-system-aarch64 -M virt,virtualization=on,gic-version=3
-cpu max`` under TCG; L1's KVM is real).

One lab for the module; each test starts ``vmscope run --arch aarch64`` in
L1 on the kernel and busybox initramfs the lab carries (the L2 guest) and
talks to it as a user would: through a terminal (a pty in L1) for the
console. Boot times are printed at the end (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import json
import re
import time

import pytest

from tests.lab_support import (
    RERUN_IF_THE_LAB_DIED, assert_the_guest_reported_no_stalls, ended_with_status_0, kept_lab, require_arm64,
)
from vmscope.lab import LabTimeout

pytestmark = [pytest.mark.lab, pytest.mark.slow, RERUN_IF_THE_LAB_DIED]

PORTS = (17100, 17199)
GDB_GUEST_PORT = 17500
BOOT_TIMEOUT = 600
GUESTS = "$VMSCOPE_LAB_GUESTS/linux"
MEASURED: dict[str, float] = {}

PTY_RUN = ("python3 -c 'import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)' "
           "python3 -m vmscope run --arch aarch64 --accel kvm")


@pytest.fixture(scope="module")
def _module_lab():
    require_arm64()
    from vmscope.lab import Lab

    yield from kept_lab(lambda: Lab(arch="aarch64", cpus=2, mem_mib=2048, forward=[GDB_GUEST_PORT],
                                    port_range=PORTS, boot_timeout=900))
    print("\narm64 Linux VMM measurements: " + json.dumps({k: round(v, 2) for k, v in MEASURED.items()}))


@pytest.fixture
def lab(_module_lab):
    """This module's lab, booted again if it died (see kept_lab)."""
    lab = _module_lab()
    MEASURED.setdefault("lab_start_s", lab.timings["image_s"] + lab.timings["boot_s"])
    return lab


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
    m = expect(vm, rf"(?s)\n{tag}-begin\r*\n(.*?)\n{tag}-end")
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
        result = ended_with_status_0(vm, 180)
    assert "Power down" in result.stdout or "reboot" in result.stdout


def test_reboot_ends_the_vmm_with_status_0(lab):
    with lab.spawn(vm_command(cpus=1)) as vm:
        expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
        vm.write("reboot -f\n")
        result = ended_with_status_0(vm, 180)
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


# --- debugging the live kernel with the host's gdb-multiarch -------------------------------


@contextlib.contextmanager
def arm64_gdb(vm):
    """gdb-multiarch on the host for a `vmscope run --gdb` in L1; on failure
    prints gdb's transcript and vmscope's last output."""
    from tests.support import Gdb

    gdb = Gdb(None, binary="gdb-multiarch", timeout=180)
    try:
        gdb.cmd("set architecture aarch64")
        yield gdb
    except BaseException:
        print("\n".join(gdb.log))
        print("vmscope:", vm.stdout[-2000:], vm.stderr[-3000:])
        raise
    finally:
        gdb.close()


def connect(gdb, lab) -> str:
    return gdb.cmd(f"target remote 127.0.0.1:{lab.host_port(GDB_GUEST_PORT)}", timeout=120)


def resume(gdb) -> None:
    """`continue`, returning once gdb says so."""
    gdb.start("continue")
    gdb.child.expect("Continuing", timeout=60)


def els(gdb) -> list[int]:
    """Each vCPU's exception level at the stop."""
    out = []
    for tid in (1, 2):
        gdb.cmd(f"thread {tid}")
        out.append(gdb.value("$CurrentEL") >> 2 & 3)
    gdb.cmd("thread 1")
    return out


def test_a_kernel_held_by_gdb_reports_no_stall_after_the_continue(lab):
    """gdb-multiarch holds the live kernel, both vCPUs busy, past its
    soft-lockup and RCU stall timeouts (20 s and 21 s), then detaches: the
    guest prints no stall report, as under QEMU (vmscope takes the stop
    off the virtual counter: vmscope/kvm/arm64/virtual_time.py)."""
    with lab.spawn(vm_command(extra=f"--gdb 0.0.0.0:{GDB_GUEST_PORT}")) as vm:
        expect(vm, "waiting for gdb", 300)
        with arm64_gdb(vm) as gdb:
            connect(gdb, lab)
            resume(gdb)
            expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
            vm.write("while :; do :; done &\nwhile :; do :; done &\necho loops-$((1 + 1))\n")
            expect(vm, "loops-2")
            gdb.interrupt(120)
            time.sleep(25)
            gdb.cmd("detach")
        assert_the_guest_reported_no_stalls(vm, expect, 180)
        vm.write("poweroff -f\n")
        ended_with_status_0(vm, 180)


def banner_offset() -> int:
    """Where ``linux_banner`` lies in the Image, from the file itself: the
    Image is the kernel's memory image from ``_text`` (Debian's arm64
    kallsyms has text symbols only, no CONFIG_KALLSYMS_ALL)."""
    from vmscope.images.kernel import cloud_kernel
    from vmscope.kvm.arm64.image import read_image

    data = read_image(cloud_kernel("arm64", quiet=True).vmlinuz)
    return data.index(b"Linux version 6.")


def test_gdb_multiarch_debugs_the_live_kernel_with_kaslr(lab):
    """gdb-multiarch on the host, vmscope's arm64 stub in L1, KASLR on: two
    vCPU threads; the kernel's symbols from the stub (target:/vmscope/kallsyms.elf);
    linux_banner and init_task read while both vCPUs are stopped in EL0
    (a TTBR1 walk: KVM has no KVM_TRANSLATE on arm64); a breakpoint on
    the openat syscall hit ten times in a row with both vCPUs in a
    syscall loop; stepi in kernel code. (The watchpoint on jiffies:
    test_kernel_entry_then_hbreak_start_kernel_and_watch_jiffies.)"""
    with lab.spawn(vm_command(extra=f"--gdb 0.0.0.0:{GDB_GUEST_PORT} -v")) as vm:
        expect(vm, "waiting for gdb", 300)
        with arm64_gdb(vm) as gdb:
            connect(gdb, lab)
            threads = gdb.cmd("info threads")
            assert len(re.findall(r"Thread \d+", threads)) == 2, threads
            resume(gdb)
            t0 = time.monotonic()
            expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
            MEASURED["boot_to_ready_under_gdb_s"] = time.monotonic() - t0
            gdb.interrupt(120)
            deadline = time.monotonic() + 300
            while not re.search(r"\d+ kernel symbols", info := gdb.cmd("monitor symbols")):
                assert time.monotonic() < deadline and "still being decoded" in info, info
                time.sleep(2)
            text = int(re.search(r"_text (0x[0-9a-f]+)", info).group(1), 16)
            assert text >> 48 == 0xFFFF and text != 0xFFFF_8000_0800_0000, f"KASLR should move _text: {info}"
            loaded = gdb.cmd("add-symbol-file target:/vmscope/kallsyms.elf", timeout=180)
            assert "Reading symbols" in loaded and "rror" not in loaded, loaded
            openat = gdb.value("(long)&__arm64_sys_openat") & (2**64 - 1)
            assert text < openat < text + (64 << 20), f"__arm64_sys_openat at {openat:#x}, _text at {text:#x}"

            # init_task: the idle task of CPU 0 (SP_EL0 holds `current` in the kernel)
            init_task = None
            for _ in range(20):
                gdb.cmd("thread 1")
                sp_el0 = gdb.value("$SP_EL0") & (2**64 - 1)
                in_kernel = gdb.value("$CurrentEL") >> 2 & 3 == 1 and sp_el0 >> 48 == 0xFFFF
                found = gdb.cmd(f"python print(bytes(gdb.selected_inferior().read_memory({sp_el0:#x}, 0x1800))"
                                ".find(b'swapper/0\\0'))") if in_kernel else "-1"
                if int(found.strip().splitlines()[-1]) > 0:
                    init_task = sp_el0
                    break
                resume(gdb)
                time.sleep(0.5)
                gdb.interrupt(120)
            assert init_task is not None, "vCPU 0 never stopped in its idle task"
            gdb.cmd("detach")

            # both vCPUs busy in user mode (two shell loops), then stopped there
            vm.write("while :; do :; done &\nwhile :; do :; done &\necho loops-$((1 + 1))\n")
            expect(vm, "loops-2")
            connect(gdb, lab)
            for _ in range(20):
                if els(gdb) == [0, 0]:
                    break
                resume(gdb)
                time.sleep(0.5)  # let it run: a stop right after the resume finds it where it was
                gdb.interrupt(120)
            if els(gdb) != [0, 0]:
                stacks = gdb.cmd("thread apply all bt 8")
                pytest.fail(f"both vCPUs never stopped in EL0 together; where they were:\n{stacks}\n"
                            f"console:\n{vm.stdout[-1500:]}")
            banner = gdb.cmd(f"x/s {text + banner_offset():#x}")
            assert "Linux version 6." in banner, banner
            found = gdb.cmd(f"python print(bytes(gdb.selected_inferior().read_memory({init_task:#x}, 0x1800))"
                            ".find(b'swapper/0\\0'))")
            assert int(found.strip().splitlines()[-1]) > 0, found

            # a breakpoint on the openat syscall, hit after hit with both vCPUs in a syscall loop
            vm.write("kill %1 %2\n")
            out = gdb.cmd("break __arm64_sys_openat")
            assert "Breakpoint 1 at" in out, out
            loop = "while :; do cat /proc/version >/dev/null; done &"
            vm.write(f"{loop} p1=$!\n{loop} p2=$!\n")
            for _ in range(10):
                resume(gdb)
                stop = gdb.wait_prompt(300)
                assert re.search(r"Breakpoint 1, 0x[0-9a-f]+ in __arm64_sys_openat", stop), gdb.transcript()
            pc = gdb.value("$pc") & (2**64 - 1)
            vm.write("kill $p1 $p2\n")
            gdb.cmd("delete")
            gdb.cmd("stepi")
            assert gdb.value("$pc") & (2**64 - 1) != pc, "stepi did not move"
            assert gdb.value("$CurrentEL") >> 2 & 3 == 1
            gdb.cmd("detach")
        vm.write("poweroff -f\n")
        ended_with_status_0(vm, 180)


def test_kernel_entry_then_hbreak_start_kernel_and_watch_jiffies(lab):
    """gdb-multiarch attaches before the kernel's first instruction (KASLR
    not yet decided), `monitor kernel-entry` stops where the kernel first
    runs at its randomized address with its symbols ready, `hbreak
    start_kernel` set there hits, and a watchpoint on `jiffies` (a data
    symbol Debian's arm64 kallsyms lacks: read off do_timer's code)
    triggers once the timer ticks."""
    with lab.spawn(vm_command(extra=f"--gdb 0.0.0.0:{GDB_GUEST_PORT}")) as vm:
        expect(vm, "waiting for gdb", 300)
        with arm64_gdb(vm) as gdb:
            connect(gdb, lab)
            early = gdb.cmd("monitor symbols")
            assert "kernel-entry" in early, early  # nothing relocated yet: says what to do
            armed = gdb.cmd("monitor kernel-entry")
            assert "armed" in armed, armed
            resume(gdb)
            stop = gdb.wait_prompt(600)
            assert "SIGTRAP" in stop, gdb.transcript()
            pc = gdb.value("$pc") & (2**64 - 1)
            assert pc >> 48 == 0xFFFF, f"the kernel-entry stop is at a kernel virtual address, got {pc:#x}"
            info = gdb.cmd("monitor symbols")
            m = re.search(r"(\d+) kernel symbols from kallsyms: _text (0x[0-9a-f]+)", info)
            assert m and int(m.group(1)) > 30_000, info
            assert int(m.group(2), 16) != 0xFFFF_8000_0800_0000, f"KASLR should move _text: {info}"
            loaded = gdb.cmd("add-symbol-file target:/vmscope/kallsyms.elf", timeout=300)
            assert "Reading symbols" in loaded and "rror" not in loaded, loaded
            assert "__primary_switched" in gdb.cmd("info symbol $pc")
            late = gdb.cmd("monitor kernel-entry")
            assert "behind us" in late, late
            gdb.cmd("hbreak start_kernel")
            resume(gdb)
            stop = gdb.wait_prompt(600)
            assert re.search(r"[Bb]reakpoint \d+, 0x[0-9a-f]+ in start_kernel \(\)", stop), gdb.transcript()
            banner = gdb.cmd(f"x/s {int(m.group(2), 16) + banner_offset():#x}")
            assert "Linux version 6." in banner, banner
            gdb.cmd("delete")
            jiffies = gdb.value("(long)&jiffies") & (2**64 - 1)
            assert jiffies >> 48 == 0xFFFF, f"jiffies at {jiffies:#x}"
            gdb.cmd("watch *(long *)&jiffies")
            resume(gdb)
            stop = gdb.wait_prompt(600)
            assert re.search(r"[Ww]atchpoint \d+: \*\(long \*\)&jiffies\s*\n+Old value = (-?\d+)\nNew value = (-?\d+)",
                             stop), gdb.transcript()
            old, new = map(int, re.search(r"Old value = (-?\d+)\nNew value = (-?\d+)", stop).groups())
            assert new > old, stop
            gdb.cmd("delete")
            gdb.cmd("detach")
        expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
        vm.write("poweroff -f\n")
        ended_with_status_0(vm, 180)


def test_inspect_ps_through_vmscopes_own_arm64_stub(lab):
    """`vmscope inspect ps` on the host, through the lab's port forward to
    vmscope's own arm64 stub on a live Debian kernel (KASLR on, no vmlinux),
    lists the pids, parents and names the guest's own `ps` prints."""
    import json
    import subprocess
    import sys

    from tests.support import ROOT, guest_ps

    with lab.spawn(vm_command(extra=f"--gdb 0.0.0.0:{GDB_GUEST_PORT}")) as vm:
        expect(vm, "waiting for gdb", 300)
        with arm64_gdb(vm) as gdb:  # a `run --gdb` holds the guest for a debugger: attach once and detach
            connect(gdb, lab)
            gdb.cmd("detach")
        expect(vm, "vmscope-linux-ready", BOOT_TIMEOUT)
        vm.write("sleep 600 &\nsleep 1; ps -o pid,ppid,comm; echo ps-$((40 + 2))\n")
        expect(vm, "ps-42")
        console = vm.stdout
        theirs = guest_ps(console[console.rfind("PID") : console.rfind("ps-42")])
        assert len(theirs) > 10, console[-3000:]
        r = subprocess.run([sys.executable, "-m", "vmscope", "inspect", "--gdb",
                            f"127.0.0.1:{lab.host_port(GDB_GUEST_PORT)}", "--timeout", "120", "--json", "ps"],
                           capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        ours = {row["pid"]: row for row in json.loads(r.stdout)}
        for pid, (ppid, comm) in theirs.items():
            if comm == "ps" or comm.startswith("kworker"):
                continue  # ps has exited since; kworkers come and go
            assert pid in ours, f"the guest has pid {pid} ({comm}), vmscope inspect does not"
            assert (ours[pid]["comm"], ours[pid]["ppid"]) == (comm, ppid)
        assert any(row["comm"] == "sleep" and row["kind"] == "user" for row in ours.values())
        vm.write("echo still-$((6 * 7))\n")
        expect(vm, "still-42")  # the guest runs on after the inspection
        vm.write("poweroff -f\n")
        ended_with_status_0(vm, 180)
