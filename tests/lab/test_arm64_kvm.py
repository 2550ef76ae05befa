"""vmscope's arm64 KVM back end on a real arm64 KVM: the arm64 nested lab
(``qemu-system-aarch64 -M virt,virtualization=on -cpu max`` under TCG, a
Debian arm64 kernel at EL2 with /dev/kvm, Debian's arm64 Python with
vmscope inside). The host's ``gdb-multiarch`` drives the stub in L1
through the lab's port forward: the same scenario the x86 back ends pass
(tests/e2e/test_gdb_scenario.py), in one lab boot, plus a guest's own BRK
delivered through its VBAR_EL1.

Measured numbers (L1 boot, scenario time, stepi/s) are printed at the end
(``pytest -s``).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.lab_support import require_arm64
from tests.support import Gdb, elf_bytes_at, elf_symbols
from vmscope.arch.aarch64 import AARCH64

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PORTS = (17000, 17999)  # this suite's host ports
GUEST_PORT = 5555
TICK_HITS = 50
MEASURED: dict[str, float] = {}


def _vm_command() -> str:
    """``vmscope run`` once the CLI routes arm64 KVM to this back end, the
    back end's own entry point until then."""
    import inspect

    import vmscope.cli

    if "kvm.arm64" in inspect.getsource(vmscope.cli):
        return "python3 -m vmscope run --arch aarch64 --accel kvm --cpus 2"
    return "python3 -m vmscope.kvm.arm64 --cpus 2"


@pytest.fixture(scope="module")
def lab():
    require_arm64()
    from vmscope.lab import Lab

    t0 = time.monotonic()
    with Lab(arch="aarch64", cpus=2, mem_mib=2048, forward=[GUEST_PORT], port_range=PORTS,
             boot_timeout=900) as lab:
        MEASURED["lab_start_s"] = time.monotonic() - t0
        MEASURED.update({f"lab_{k}": v for k, v in lab.timings.items()})
        yield lab
    print("\narm64 KVM lab measurements: " + json.dumps({k: round(v, 2) for k, v in MEASURED.items()}))


class Scenario:
    def __init__(self, lab):
        from vmscope.guests import guest_elf

        self.lab = lab
        self.elf = guest_elf("demo", "aarch64")
        self.symbols = elf_symbols(self.elf)
        self.vm = lab.spawn(f"cd /opt/vmscope/src && exec {_vm_command()} --gdb 0.0.0.0:{GUEST_PORT}")
        self.vm.wait_for_output("waiting for gdb", timeout=300)
        self.port = lab.host_port(GUEST_PORT)
        self.gdb = Gdb(self.elf, binary="gdb-multiarch", timeout=300)

    def check(self, cond: bool, what: str) -> None:
        assert cond, (f"{what}\n--- gdb transcript ---\n{self.gdb.transcript()}\n"
                      f"--- vmscope in L1 ---\n{self.vm.stdout[-2000:]}\n{self.vm.stderr[-3000:]}")

    def close(self) -> None:
        self.gdb.close()
        self.vm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def sc(lab):
    s = Scenario(lab)
    yield s
    s.close()


def test_l1_has_kvm_and_the_back_end_boots_two_vcpus(lab):
    assert lab.kvm_available, lab.console
    r = lab.run("cd /opt/vmscope/src && timeout -k 5 120 python3 tests/lab/arm64_kvm_probe.py 2", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["serial"] == "vmscope demo guest: cpu 0 up\nvmscope demo guest: cpu 1 up\n", report
    assert report["mpidr"] == [0x8000_0000, 0x8000_0001]  # Aff0 = vCPU index
    assert "signal=2" in report["stop"]  # the interrupt stopped both vCPUs
    assert all(n > 0 for n in report["per_cpu"]) and report["counter"] > 0
    assert report["cpsr"] & 0xF == 0b0101  # EL1h
    assert report["slots"][0] >= 2 and report["slots"][1] >= 2
    MEASURED["vm_create_s"] = report["create_s"]
    MEASURED["guest_to_both_banners_s"] = report["boot_s"]


def test_every_register_reads_back_what_was_written(lab):
    """The register round trip of the other back ends (tests/support.py), on
    the arm64 KVM target in L1: every table line reaches its ONE_REG."""
    r = lab.run("cd /opt/vmscope/src && timeout -k 5 150 python3 tests/lab/arm64_kvm_registers.py", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    for tid in ("1", "2"):
        assert report[tid]["refused"] == {} and report[tid]["missing"] == [], report
        assert report[tid]["took"] == len(AARCH64.registers), report


class TestGdbScenarioOnArm64Kvm:
    @pytest.fixture(autouse=True)
    def _no_leftover_breakpoints(self, sc):
        """A failed step must not leave its breakpoints to confuse the next."""
        yield
        if sc.gdb.child.isalive():
            try:
                sc.gdb.cmd("delete", timeout=60)
            except Exception:
                pass

    def test_attach_stops_before_first_instruction(self, sc):
        MEASURED["scenario_start"] = time.monotonic()
        out = sc.gdb.cmd(f"target remote 127.0.0.1:{sc.port}")
        sc.check("Remote debugging using" in out, "target remote failed")
        sc.check(sc.gdb.value("$pc") == sc.symbols["_start"], "pc is not at _start")
        sc.check("cpu 0 up" not in sc.vm.stdout, "guest ran before the debugger continued")

    def test_info_registers(self, sc):
        out = sc.gdb.cmd("info registers")
        for name in ("x0", "x30", "sp", "pc", "cpsr"):
            sc.check(re.search(rf"^{name}\s", out, re.M) is not None, f"{name} missing")
        sc.check(re.search(r"^cpsr\s+0x3c5\s", out, re.M) is not None, "reset PSTATE is not EL1h with DAIF masked")
        sc.check(sc.gdb.value("$MPIDR_EL1") & 0xFF == 0, "thread 1 is not vCPU 0")
        sc.check(sc.gdb.value("$CurrentEL") == 4, "CurrentEL is not EL1")

    def test_single_step_masks_interrupts_and_gives_daif_back(self, sc):
        """Steps run with IRQ/FIQ/SError masked; afterwards PSTATE.DAIF is
        the guest's again, unless the stepped instruction set it itself."""
        sc.check(sc.gdb.value("$pc") == sc.symbols["_start"], "not at _start (msr daifset, #0xf)")
        sc.gdb.cmd("set $cpsr = 0x5")  # EL1h, nothing masked
        sc.gdb.cmd("stepi")
        sc.check(sc.gdb.value("$cpsr") & 0x3C0 == 0x3C0, "msr daifset's own masking was undone")
        sc.gdb.cmd("set $cpsr = 0x5")
        sc.gdb.cmd("stepi")  # mrs x19, mpidr_el1
        sc.check(sc.gdb.value("$cpsr") & 0x3C0 == 0, "the step's interrupt mask was left in PSTATE")
        sc.gdb.cmd("set $cpsr = 0x3c5")

    def test_virtual_addresses_walk_ttbr1_and_ttbr0(self, sc):
        """KVM_TRANSLATE does not exist on arm64: reads at virtual addresses
        go through a software walk of the guest's tables. One 4 KiB-granule
        L1 table, 39-bit VAs: entry 0 maps TTBR1's lowest GiB
        (0xffffff8000000000) and entry 1 maps VA 0x40000000 (TTBR0), both
        as 1 GiB blocks onto RAM at 0x40000000."""
        saved = {r: sc.gdb.value(f"${r}") for r in ("SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1")}
        table, block = 0x4030_0000, 0x4000_0000 | 1 << 10 | 0b01  # AF, block descriptor
        sc.gdb.cmd(f"set var *(unsigned long long *){table:#x} = {block:#x}")
        sc.gdb.cmd(f"set var *(unsigned long long *){table + 8:#x} = {block:#x}")
        sc.gdb.cmd(f"set var *(unsigned long long *){table + 16:#x} = 0")
        sc.gdb.cmd(f"set $TCR_EL1 = {25 | 25 << 16 | 0b10 << 30:#x}")  # T0SZ=T1SZ=25, TG1=4K
        sc.gdb.cmd(f"set $TTBR0_EL1 = {table:#x}")
        sc.gdb.cmd(f"set $TTBR1_EL1 = {table:#x}")
        sc.gdb.cmd(f"set $SCTLR_EL1 = {saved['SCTLR_EL1'] | 1:#x}")
        try:
            high = 0xFFFF_FF80_0000_0000 + (sc.symbols["counter"] - 0x4000_0000)
            sc.gdb.cmd("set var counter = 0x5eed")
            sc.check(sc.gdb.value(f"*(unsigned long long *){high:#x}") == 0x5EED, "TTBR1 walk read the wrong bytes")
            out = sc.gdb.cmd(f"monitor translate {high:#x}")
            sc.check(f"-> {sc.symbols['counter']:#x}" in out, f"translate said {out!r}")
            sc.check(sc.gdb.value(f"*(unsigned long long *){sc.symbols['counter']:#x}") == 0x5EED, "TTBR0 walk failed")
            out = sc.gdb.cmd("x/xg 0xffffff8080000000")  # L1 entry 2: invalid
            sc.check("Cannot access memory" in out, f"an unmapped address read as {out!r}")
        finally:
            for r, value in saved.items():
                sc.gdb.cmd(f"set ${r} = {value:#x}")
            sc.gdb.cmd("set var counter = 0")

    def test_memory_roundtrip(self, sc):
        out = sc.gdb.cmd("x/8xg &counter")
        sc.check(len(re.findall(r"0x[0-9a-f]{16}", out)) == 8, "x/8xg did not show 8 quadwords")
        sc.gdb.cmd("set var counter = 0x1122334455667788")
        sc.check(sc.gdb.value("counter") == 0x1122334455667788, "set var did not round-trip")
        sc.gdb.cmd("set var counter = 0")
        sc.check(sc.gdb.value("counter") == 0, "set var 0 did not round-trip")

    def test_break_tick_hits_repeatedly(self, sc):
        sc.check("Breakpoint 1 at" in sc.gdb.cmd("break tick"), "break tick failed")
        values = []
        t0 = time.monotonic()
        for i in range(TICK_HITS):
            out = sc.gdb.cmd("continue", timeout=300)
            sc.check("Breakpoint 1," in out and "tick" in out, f"hit {i} not reported")
            sc.check(sc.gdb.value("$pc") == sc.symbols["tick"], "stopped outside tick")
            values.append(sc.gdb.value("counter"))
        MEASURED["break_hits_per_s"] = TICK_HITS / (time.monotonic() - t0)
        sc.check(values == sorted(values) and values[-1] > values[0], f"counter did not advance: {values}")
        sc.check(sc.gdb.value("*(unsigned int *)tick") == int.from_bytes(elf_bytes_at(sc.elf, sc.symbols["tick"], 4), "little"),
                 "reads show the BRK instead of the original instruction")
        sc.gdb.cmd("delete")

    def test_hbreak(self, sc):
        sc.check("Hardware assisted breakpoint" in sc.gdb.cmd("hbreak tick"), "hbreak not accepted")
        for _ in range(3):
            out = sc.gdb.cmd("continue", timeout=300)
            sc.check("tick" in out and "Breakpoint" in out, "hbreak did not hit")
        sc.gdb.cmd("delete")

    def test_watch_counter_reports_old_and_new(self, sc):
        # counter is updated by an ldxr/stxr loop: the back end completes
        # the exclusive sequence natively, or the store would fail forever
        sc.check("atchpoint" in sc.gdb.cmd("watch counter"), "watch not accepted")
        for _ in range(3):
            out = sc.gdb.cmd("continue", timeout=300)
            m = re.search(r"Old value = (\d+)\s+New value = (\d+)", out)
            sc.check(m is not None, "watchpoint hit without old/new values")
            old, new = int(m.group(1)), int(m.group(2))
            sc.check(new == old + 1, f"counter went {old} -> {new}")
            sc.check(new == sc.gdb.value("counter"), "memory does not hold the new value at the stop")
        sc.gdb.cmd("delete")

    def test_rwatch_and_awatch(self, sc):
        sc.check("read watchpoint" in sc.gdb.cmd("rwatch counter"), "rwatch not accepted")
        out = sc.gdb.cmd("continue", timeout=300)
        sc.check("read watchpoint" in out and "Value = " in out, "rwatch did not trigger")
        sc.gdb.cmd("delete")
        sc.check("access" in sc.gdb.cmd("awatch per_cpu_counter[1]"), "awatch not accepted")
        out = sc.gdb.cmd("continue", timeout=300)
        sc.check("access (read/write) watchpoint" in out and 'Thread 2 "vCPU 1"' in out,
                 "awatch on vCPU 1's counter did not stop vCPU 1")
        sc.gdb.cmd("delete")
        sc.gdb.cmd("thread 1")

    def test_stepi_1000(self, sc):
        seen = {sc.gdb.value("$pc")}
        for _ in range(5):
            sc.gdb.cmd("stepi")
            seen.add(sc.gdb.value("$pc"))
        sc.check(len(seen) > 1, "stepi does not move the pc")
        t0 = time.monotonic()
        out = sc.gdb.cmd("stepi 1000", timeout=600)
        MEASURED["stepi_per_s"] = 1000 / (time.monotonic() - t0)
        sc.check("Cannot" not in out and "error" not in out.lower(), f"stepi 1000 failed: {out[-300:]}")
        pc = sc.gdb.value("$pc")
        sc.check(sc.symbols["main_loop"] <= pc < sc.symbols["tick"] + 0x28, f"after 1000 steps pc {pc:#x} left the loop")
        sc.check(sc.gdb.value("$cpsr") & 0x3C0 == 0x3C0, "DAIF not restored to the guest's (all masked) after steps")

    def test_threads(self, sc):
        out = sc.gdb.cmd("info threads")
        sc.check(len(re.findall(r"^\*?\s+\d+\s+Thread", out, re.M)) == 2, "info threads does not list 2 vCPUs")
        sc.check("Switching to thread 2" in sc.gdb.cmd("thread 2"), "cannot select thread 2")
        sc.check(sc.gdb.value("$MPIDR_EL1") & 0xFF == 1, "thread 2 is not vCPU 1")
        sc.check(sc.gdb.value("$x19") == 1, "vCPU 1's x19 (its CPU index) is not 1")
        sc.gdb.cmd("thread 1")

    def test_guest_brk_goes_to_its_vbar_el1_vector(self, sc):
        """A BRK the guest placed itself is not the debugger's: it is taken
        through VBAR_EL1 + 0x200 (current EL, SP_ELx), where the handler
        records ESR_EL1/ELR_EL1 and returns past the BRK."""
        code, vectors = 0x4010_0000, 0x4020_0000
        for i, word in enumerate((0xD420_0EE0, 0x1400_0000)):  # brk #0x77; b .
            sc.gdb.cmd(f"set var *(unsigned int *){code + 4 * i:#x} = {word:#x}")
        handler = (0xD538_5214, 0xD538_4035, 0x9100_12B6, 0xD518_4036, 0xD69F_03E0)
        # mrs x20, esr_el1; mrs x21, elr_el1; add x22, x21, #4; msr elr_el1, x22; eret
        for i, word in enumerate(handler):
            sc.gdb.cmd(f"set var *(unsigned int *){vectors + 0x200 + 4 * i:#x} = {word:#x}")
        sc.gdb.cmd(f"set $VBAR_EL1 = {vectors:#x}")
        sc.gdb.cmd(f"set $pc = {code:#x}")
        sc.gdb.cmd(f"hbreak *{code + 4:#x}")
        out = sc.gdb.cmd("continue", timeout=300)
        sc.check("Breakpoint" in out and sc.gdb.value("$pc") == code + 4, "did not come back past the guest's BRK")
        sc.check(sc.gdb.value("$x20") == 0xF200_0077, "ESR_EL1 is not BRK #0x77 (EC 0x3c, IL)")
        sc.check(sc.gdb.value("$x21") == code, "ELR_EL1 is not the BRK's address")
        sc.gdb.cmd("delete")
        sc.gdb.cmd(f"set $pc = {sc.symbols['main_loop']:#x}")

    def test_ctrl_c_stops_running_guest(self, sc):
        sc.gdb.start("continue")
        time.sleep(1.0)
        out = sc.gdb.interrupt(timeout=120)
        sc.check("SIGINT" in out, "Ctrl-C did not stop the guest")

    def test_detach_leaves_guest_running_unpatched(self, sc):
        sc.gdb.cmd("break tick")
        sc.gdb.cmd("hbreak main_loop")
        at_detach = sc.gdb.value("counter")
        out = sc.gdb.cmd("detach")
        sc.check("Detaching" in out or "detached" in out.lower(), "detach failed")
        time.sleep(0.5)
        gdb2 = Gdb(sc.elf, binary="gdb-multiarch", timeout=300)
        try:
            out = gdb2.cmd(f"target remote 127.0.0.1:{sc.port}")
            assert "Remote debugging using" in out, out
            tick = sc.symbols["tick"]
            raw = gdb2.cmd(f"x/8xb {tick}")
            got = bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", raw.split(":", 1)[1]))
            assert got == elf_bytes_at(sc.elf, tick, 8), f"tick bytes {got.hex()} differ from the ELF"
            phys = int(gdb2.cmd("monitor translate 0x40080038").split("->")[1], 16)
            assert phys == tick, "MMU off: virtual is physical"
            assert gdb2.value("counter") > at_detach, "guest did not run after detach"
            gdb2.cmd("detach")
        finally:
            gdb2.close()

    def test_kill_ends_vmm_with_status_0(self, sc):
        out = sc.gdb.cmd(f"target remote 127.0.0.1:{sc.port}")
        sc.check("Remote debugging using" in out, "re-attach failed")
        sc.gdb.cmd("kill")
        result = sc.vm.wait(120)
        MEASURED["scenario_s"] = time.monotonic() - MEASURED.pop("scenario_start")
        sc.check(result.returncode == 0, f"vmscope exited with {result.returncode}")
