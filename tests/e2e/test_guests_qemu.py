"""The embedded guests boot under real QEMU and real gdb debugs them there.

This is the reference behaviour vmscope's own targets are measured against:
the same ELF files, QEMU's ``-kernel`` (PVH on x86_64, the virt board's ELF
loader on arm64) and QEMU's gdbstub driven by stock gdb/gdb-multiarch and lldb.

Every QEMU run is bounded (``timeout``) and killed by a fixture finalizer;
gdb runs in batch mode under a subprocess timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vmscope.guests import guest_elf, guest_symbols, write_guest

PORT_RANGE = range(13000, 14000)  # this file's share of TCP ports
BANNER = {"demo": "vmscope demo guest", "idt": "vmscope idt guest"}
GDB = {"x86_64": "gdb", "aarch64": "gdb-multiarch"}
TCG_GUESTS = [("x86_64", "demo"), ("x86_64", "idt"), ("aarch64", "demo")]


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (CI installs it; see .ci/run)")
    return path


def require_kvm() -> None:
    """Skip without a usable /dev/kvm, except under VMSCOPE_REQUIRE_KVM=1
    (CI on a KVM machine), where a KVM test must fail instead."""
    if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return
    if os.environ.get("VMSCOPE_REQUIRE_KVM") == "1":
        pytest.fail("VMSCOPE_REQUIRE_KVM=1 but /dev/kvm is not usable")
    pytest.skip("needs /dev/kvm")


def free_port() -> int:
    """A port in this file's range that nothing listens on right now."""
    start = os.getpid() % len(PORT_RANGE)
    for i in range(len(PORT_RANGE)):
        port = PORT_RANGE[(start + i) % len(PORT_RANGE)]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {PORT_RANGE}")


class QemuGuest:
    """One QEMU process booting a guest ELF with -kernel, serial to a file
    and (optionally) QEMU's gdbstub on a TCP port."""

    def __init__(self, workdir: Path, arch: str, elf: Path, *, accel: str = "tcg", smp: int = 1,
                 gdb: bool = True, paused: bool = False, lifetime: int = 300):
        self.arch = arch
        self.elf = elf
        self.serial_path = workdir / f"serial-{arch}-{elf.stem}-{accel}.txt"
        self.stderr_path = workdir / f"qemu-{arch}-{elf.stem}-{accel}.log"
        self.port = free_port() if gdb else None
        if arch == "x86_64":
            argv = [require_tool("qemu-system-x86_64"), "-m", "64"]
        else:
            argv = [require_tool("qemu-system-aarch64"), "-M", "virt", "-cpu", "max", "-m", "128"]
        argv += ["-accel", accel, "-smp", str(smp), "-kernel", str(elf), "-nodefaults", "-display", "none",
                 "-no-reboot", "-serial", f"file:{self.serial_path}"]
        if self.port is not None:
            argv += ["-gdb", f"tcp:127.0.0.1:{self.port}"]
        if paused:
            argv.append("-S")
        self.started = time.monotonic()
        # `timeout` bounds the run even if this test process dies.
        self.proc = subprocess.Popen(["timeout", str(lifetime), *argv], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("wb"))

    def serial(self) -> str:
        try:
            return self.serial_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, text: str, timeout: float) -> float:
        """Wait until ``text`` is on the serial port; return seconds since start."""
        deadline = time.monotonic() + timeout
        while text not in self.serial():
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {text!r}; "
                                     f"serial: {self.serial()!r}; stderr: {self.stderr_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout} s; serial: {self.serial()!r}; "
                                     f"stderr: {self.stderr_path.read_text()[-2000:]}")
            time.sleep(0.1)
        return time.monotonic() - self.started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def qemu(tmp_path):
    """Factory for QemuGuest; every QEMU started is killed at teardown."""
    started: list[QemuGuest] = []

    def start(arch: str, elf: Path, **kwargs) -> QemuGuest:
        guest = QemuGuest(tmp_path, arch, elf, **kwargs)
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.close()


def run_gdb(arch: str, elf: Path, *commands: str, port: int | None = None, timeout: float = 120) -> str:
    """Stock gdb in batch mode on ``elf`` (attached to ``port`` if given);
    returns everything it printed."""
    argv = [require_tool(GDB[arch]), "-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off", str(elf)]
    if port is not None:
        argv += ["-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        argv += ["-ex", command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result.stdout + result.stderr


def run_lldb(elf: Path, *commands: str, port: int | None = None, timeout: float = 120) -> str:
    """Stock lldb in batch mode on ``elf`` (connected to ``port`` if given)."""
    argv = [require_tool("lldb"), "--no-lldbinit", "--batch", str(elf)]
    if port is not None:
        argv += ["-o", f"gdb-remote 127.0.0.1:{port}"]
    for command in commands:
        argv += ["-o", command]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result.stdout + result.stderr


def values(output: str, key: str) -> list[int]:
    """Every ``key=<number>`` line gdb printed (from our printf commands)."""
    return [int(v, 0) for v in re.findall(rf"^{key}=(\S+)$", output, re.M)]


@pytest.mark.parametrize("smp", [1, 2])
@pytest.mark.parametrize("arch,name", TCG_GUESTS)
def test_guest_prints_its_line_for_cpu0_only_under_tcg(qemu, arch, name, smp):
    """QEMU starts only the boot CPU at the entry, so even with -smp 2 the
    serial port carries exactly one line, and nothing else (no reset loop)."""
    guest = qemu(arch, guest_elf(name, arch), smp=smp, gdb=False)
    line = f"{BANNER[name]}: cpu 0 up\n"
    guest.wait_serial(line, timeout=60)
    time.sleep(0.5)  # give a second line (or a reboot banner) a chance to show up
    assert guest.serial() == line
    assert guest.proc.poll() is None, "the guest must keep running, not shut the machine down"


@pytest.mark.parametrize("arch,name", TCG_GUESTS)
def test_gdb_breaks_on_tick_and_watches_counter_under_tcg(qemu, arch, name):
    guest = qemu(arch, guest_elf(name, arch))
    guest.wait_serial(f"{BANNER[name]}: cpu 0 up\n", timeout=60)
    out = run_gdb(
        arch, guest.elf,
        'printf "counter=%lu\\n", counter',
        "break tick",
        "continue",
        'printf "pc=%#lx\\n", $pc',
        "backtrace",
        "continue",
        'printf "pc=%#lx\\n", $pc',
        'printf "counter=%lu\\n", counter',
        "delete",
        "watch counter",
        "continue",
        'printf "counter=%lu\\n", counter',
        "kill",
        port=guest.port,
    )
    tick = guest_symbols(name, arch)["tick"]
    assert out.count("Breakpoint 1, ") == 2, out
    assert values(out, "pc") == [tick, tick], out
    # the guests' call frame information ends the backtrace at main_loop
    assert re.search(r"^#0 .* in tick \(\)\n#1 .* in main_loop \(\)\n(?!#2)", out, re.M), out
    before, at_break, after_watch = values(out, "counter")
    assert at_break > before, out
    watch = re.search(r"Hardware watchpoint 2: counter\s+Old value = (\d+)\s+New value = (\d+)", out)
    assert watch, out
    assert int(watch[2]) == int(watch[1]) + 1 == after_watch, out


def test_idt_guest_handles_its_own_int3_while_gdb_has_breakpoints_planted(qemu):
    """The guest's own int3 goes to the guest's #BP handler, not to gdb: with
    a breakpoint on tick passed over 40 times (40 stops and resumes through
    the stub), bp_count rises by at least 2 (one int3 per 16 ticks) and gdb
    never reports a stop outside tick."""
    guest = qemu("x86_64", guest_elf("idt"))
    guest.wait_serial("vmscope idt guest: cpu 0 up\n", timeout=60)
    out = run_gdb(
        "x86_64", guest.elf,
        'printf "bp_count=%lu\\n", bp_count',
        'printf "counter=%lu\\n", counter',
        "break tick",
        "ignore 1 40",
        "continue",
        'printf "pc=%#lx\\n", $pc',
        'printf "bp_count=%lu\\n", bp_count',
        'printf "counter=%lu\\n", counter',
        "delete",
        "break bp_handler",
        "continue",
        "backtrace",
        "kill",
        port=guest.port,
    )
    assert values(out, "pc") == [guest_symbols("idt")["tick"]], out
    # gdb unwinds through the interrupt frame to the int3 in main_loop
    assert re.search(r"^#0 .* in bp_handler \(\)\n#1 .* in main_loop \(\)\n(?!#2)", out, re.M), out
    bp_before, bp_after = values(out, "bp_count")
    counter_before, counter_after = values(out, "counter")
    assert counter_after - counter_before >= 40, out
    assert bp_after - bp_before >= 2, out
    assert "SIGTRAP" not in out, out


@pytest.mark.parametrize("arch,name", TCG_GUESTS)
def test_gdb_knows_tick_and_counter_from_the_written_file(tmp_path, arch, name):
    """`vmscope guest demo --out DIR` users run `gdb DIR/demo.elf`: symbols
    and the counter's type come from the file alone."""
    elf = write_guest(tmp_path / "out", name, arch)
    symbols = guest_symbols(name, arch)
    out = run_gdb(arch, elf, "info address tick", "ptype counter", "ptype per_cpu_counter",
                  'printf "size=%d\\n", sizeof(counter)', 'printf "initial=%lu\\n", counter',
                  'printf "long=%ld\\n", (long)counter', "x/i tick")
    assert f'Symbol "tick" is at {symbols["tick"]:#x}' in out, out
    assert "type = unsigned long\n" in out, out
    assert re.search(r"type = unsigned long \[\d+\]", out), out
    assert values(out, "size") == [8], out
    assert values(out, "initial") == [0] and values(out, "long") == [0], out
    assert re.search(rf"{symbols['tick']:#x} <tick>:", out), out


def test_demo_boots_under_qemu_kvm_and_gdb_debugs_it(qemu):
    """QEMU with KVM boots the same ELF (through SeaBIOS and its PVH option
    ROM). Software breakpoints: on hardware KVM QEMU reports SIGTRAP; this
    lab's software KVM (PVM) cannot emulate int3 and QEMU reports SIGABRT
    with pc at the breakpoint, so the test checks where gdb stopped, and
    checks the trap itself with a hardware breakpoint, which works on both."""
    require_kvm()
    guest = qemu("x86_64", guest_elf("demo"), accel="kvm")
    guest.wait_serial("vmscope demo guest: cpu 0 up\n", timeout=180)
    first = values(run_gdb("x86_64", guest.elf, 'printf "counter=%lu\\n", counter', "detach", port=guest.port),
                   "counter")
    assert len(first) == 1
    later = first
    for _ in range(60):  # the guest runs between attaches; stop as soon as it has moved
        time.sleep(0.5)
        later = values(run_gdb("x86_64", guest.elf, 'printf "counter=%lu\\n", counter', "detach",
                               port=guest.port), "counter")
        if later and later[0] > first[0]:
            break
    assert later and later[0] > first[0], f"counter stuck at {first} under KVM"
    tick = guest_symbols("demo")["tick"]
    out = run_gdb(
        "x86_64", guest.elf,
        "hbreak tick",
        "continue",
        'printf "pc=%#lx\\n", $pc',
        "delete",
        "break tick",
        "continue",
        'printf "pc=%#lx\\n", $pc',
        "kill",
        port=guest.port,
    )
    assert re.search(r"Breakpoint 1, 0x0*%x in tick \(\)" % tick, out), out
    assert values(out, "pc") == [tick, tick], out


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_lldb_knows_tick_and_counter_from_the_written_file(tmp_path, arch):
    elf = write_guest(tmp_path, "demo", arch)
    out = run_lldb(elf, "target variable counter", "target variable per_cpu_counter", "image lookup -n tick")
    assert "(unsigned long) counter = 0" in out, out
    assert re.search(r"\(unsigned long\[\d+\]\) per_cpu_counter = \{", out), out
    assert re.search(rf"Address: demo.elf\[0x0*{guest_symbols('demo', arch)['tick']:x}\]", out), out


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_lldb_breaks_on_tick_from_reset_under_tcg(qemu, arch):
    """lldb through QEMU's gdbstub, from the first instruction (-S): QEMU
    sends an unsolicited stop reply when a client connects to a running VM,
    which lldb 14's handshake does not accept, so lldb attaches to a paused
    one. The first tick sees counter 0, the second 1."""
    guest = qemu(arch, guest_elf("demo", arch), paused=True)
    out = run_lldb(
        guest.elf,
        "breakpoint set -n tick",
        "continue",
        "target variable counter",
        "bt",
        "continue",
        "target variable counter",
        "process kill",
        port=guest.port,
    )
    assert out.count("stop reason = breakpoint 1.1") >= 3, out  # two stops, plus bt's header
    assert out.index("(unsigned long) counter = 0") < out.index("(unsigned long) counter = 1"), out
    assert re.search(r"frame #0: 0x0*[0-9a-f]+ demo.elf`tick\n\s+frame #1: .* demo.elf`main_loop \+ \d+\n(?!\s+frame #2)",
                     out), out
    assert guest.serial() == "vmscope demo guest: cpu 0 up\n"


def test_walk_guest_boots_under_tcg_and_gdb_breaks_on_visit_and_watches_visits(qemu):
    """The standard PVH guest (no vmscope note, entry _start) boots through
    QEMU's own PVH loader, finds QEMU's hvm_start_info through ebx, and gdb
    breaks on its per-node function and watches its counter there too: the
    reference run for the same guest under vmscope's KVM and emulated targets."""
    guest = qemu("x86_64", guest_elf("walk"), smp=2)
    guest.wait_serial("walk guest: hvm_start_info ok\n", timeout=60)
    out = run_gdb(
        "x86_64", guest.elf,
        "break visit",
        "continue",
        'printf "pc=%#lx\\n", $pc',
        "backtrace",
        "delete",
        "watch visits",
        "continue",
        'printf "visits=%lu\\n", visits',
        "kill",
        port=guest.port,
    )
    assert values(out, "pc") == [guest_symbols("walk")["visit"]], out
    assert re.search(r"^#0 .* in visit \(\)\n#1 .* in walk_loop \(\)\n(?!#2)", out, re.M), out
    watch = re.search(r"Hardware watchpoint 2: visits\s+Old value = (\d+)\s+New value = (\d+)", out)
    assert watch and int(watch[2]) == int(watch[1]) + 1 == values(out, "visits")[0], out
    assert guest.serial() == "walk guest: hvm_start_info ok\n"
