"""KvmTarget (the GDB stub's view of the KVM VMM) driven directly, on the
real /dev/kvm, with the packaged demo and idt guests.

Each test asserts what a debugger user would see: stop kinds and threads,
rip at the breakpoint, the watched variable's new value at a watch stop,
original bytes after detach. Deadlines are upper bounds for waiting only.
"""

from __future__ import annotations

import select
import time

import pytest

from tests.kvm_support import SerialSink, make_machine
from vmscope.gdbserver.target import SIGINT, SIGTRAP, ResumeAction, ResumeActions, StopEvent, TargetError
from vmscope.guests import guest_symbols

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

CONTINUE = ResumeActions(default=ResumeAction("continue"))


def step(tid: int) -> ResumeActions:
    return ResumeActions(per_thread={tid: ResumeAction("step")})


class Debugged:
    """A machine started paused, as ``vmscope run --gdb`` does, plus helpers."""

    def __init__(self, guest: str = "demo", cpus: int = 2):
        from vmscope.guests import guest_elf

        self.out = SerialSink()
        self.m = make_machine(kernel=guest_elf(guest), cpus=cpus, serial_out=self.out)
        self.t = self.m.debug_target()
        self.sym = guest_symbols(guest)
        self.m.start(paused=True)
        assert self.t.initial_stop().kind == "signal"

    def wait_stop(self, deadline: float = 60) -> StopEvent:
        ready, _, _ = select.select([self.t.stop_fd()], [], [], deadline)
        assert ready, "no stop reported"
        ev = self.t.take_stop()
        assert ev is not None
        return ev

    def cont(self) -> StopEvent:
        self.t.resume(CONTINUE)
        return self.wait_stop()

    def run_until_up(self) -> None:
        """Let every vCPU boot (print its line), then stop."""
        self.t.resume(CONTINUE)
        for n in range(len(self.m.vcpus)):
            assert self.out.wait_for(rb"cpu %d up\n" % n)
        ev = self.t.stop()
        assert ev is not None and ev.kind == "signal" and ev.signal == SIGINT

    def u64(self, name: str) -> int:
        return int.from_bytes(self.t.read_memory(self.sym[name], 8, 1), "little")

    def close(self) -> None:
        self.m.shutdown()


@pytest.fixture
def dbg():
    d = Debugged("demo", cpus=2)
    yield d
    d.close()


def test_threads_are_vcpus(dbg):
    assert dbg.t.threads() == [1, 2]
    assert dbg.t.thread_name(2) == "vCPU 1"
    with pytest.raises(TargetError, match="no thread 3"):
        dbg.t.read_registers(3)


def test_registers_at_the_pvh_entry_and_after_boot(dbg):
    regs = dbg.t.read_registers(1)
    assert regs["rip"] == dbg.sym["pvh_entry"]
    assert regs["cr0"] & 1 and not regs["cr0"] & (1 << 31)  # protected mode, paging off
    assert regs["rbx"] == 0x6000  # hvm_start_info
    dbg.run_until_up()
    regs = dbg.t.read_registers(2)
    assert regs["efer"] & 0x500 == 0x500  # long mode active
    assert regs["cr3"] and regs["cs"] == 0x08
    assert set(dbg.t.arch.index) <= set(regs)  # every arch-table register answers


def test_register_write_is_seen_by_the_guest(dbg):
    dbg.run_until_up()
    dbg.t.write_registers(1, {"r13": 0x1122334455667788, "xmm3": 0xABCDEF << 64, "st0": 0x4000C000000000000000})
    regs = dbg.t.read_registers(1)
    assert regs["r13"] == 0x1122334455667788
    assert regs["xmm3"] == 0xABCDEF << 64
    assert regs["st0"] == 0x4000C000000000000000
    # Moving rip: the vCPU continues where the debugger put it.
    dbg.t.write_registers(1, {"rip": dbg.sym["tick"]})
    dbg.t.resume(step(1))
    assert dbg.wait_stop().tid == 1
    assert dbg.t.read_registers(1)["rip"] != dbg.sym["tick"]
    with pytest.raises(TargetError, match="no such register"):
        dbg.t.write_registers(1, {"bogus": 1})


def test_memory_read_write_and_short_reads(dbg):
    dbg.run_until_up()
    addr = dbg.sym["counter"]
    dbg.t.write_memory(addr, (12345).to_bytes(8, "little"), 1)
    assert dbg.u64("counter") == 12345
    assert dbg.t.read_physical(addr, 8) == (12345).to_bytes(8, "little")  # identity-mapped guest
    # Virtual = physical here: a read running past the end of RAM comes back short.
    end = dbg.m.mem.size
    data = dbg.t.read_memory(end - 16, 64, 1)
    assert len(data) == 16
    with pytest.raises(TargetError, match="not mapped"):
        dbg.t.read_memory(end, 8, 1)
    with pytest.raises(TargetError, match="not mapped"):
        dbg.t.write_memory(end - 4, b"12345678", 1)
    assert dbg.t.translate(addr, 2) == addr
    big = dbg.t.read_memory(0x100000, 4 << 20, 1)
    assert len(big) == 4 << 20 and big[: 4] == dbg.m.mem.read(0x100000, 4)


def _demo_page_directory_slot(dbg, va: int) -> int:
    """Guest-physical address of the 2 MiB page-directory entry that maps
    ``va`` in the demo's identity map (pvh_boot.S: PML4[0] -> PDPT[0] -> PD)."""
    def entry(addr):
        return int.from_bytes(dbg.t.read_physical(addr, 8), "little") & 0x000F_FFFF_FFFF_F000

    pd = entry(entry(dbg.t.read_registers(1)["cr3"] & ~0xFFF))
    return pd + (va >> 21) * 8


def test_page_tables_changed_while_the_guest_ran_are_walked_again(dbg):
    """The target keeps its page walks from one stop to the next only
    while the page tables it read are unchanged: an entry the guest (here:
    a write to its RAM from outside, as the guest's own would be) changes
    while running is seen at the next stop."""
    dbg.run_until_up()
    va = (16 << 21) | 0x100000  # 33 MiB: RAM the demo never touches
    slot = _demo_page_directory_slot(dbg, va)
    original = dbg.m.mem.read(slot, 8)
    code = dbg.t.read_physical(0x100000, 16)  # the guest's code at 1 MiB
    plain = dbg.t.read_memory(va, 16, 1)
    assert plain != code
    for entry, expected in ((0x83, code), (int.from_bytes(original, "little"), plain)):
        dbg.m.mem.write(slot, entry.to_bytes(8, "little"))  # maps va's 2 MiB to physical 0, then back
        dbg.t.resume(step(1))  # a stop from a KVM exit: the control registers at hand, the walk in software
        assert dbg.wait_stop().kind == "signal"
        assert dbg.t.read_memory(va, 16, 1) == expected


def test_a_page_table_the_debugger_writes_is_walked_again_in_the_same_stop(dbg):
    dbg.run_until_up()
    va = (16 << 21) | 0x100000
    slot = _demo_page_directory_slot(dbg, va)
    original = dbg.t.read_physical(slot, 8)
    plain = dbg.t.read_memory(va, 16, 1)
    dbg.t.write_physical(slot, (0x83).to_bytes(8, "little"))
    assert dbg.t.read_memory(va, 16, 1) == dbg.t.read_physical(0x100000, 16)
    dbg.t.write_memory(slot, original, 1)  # identity-mapped: the same entry, through a virtual write
    assert dbg.t.read_memory(va, 16, 1) == plain


def test_sw_breakpoint_on_tick_hits_repeatedly(dbg):
    dbg.run_until_up()
    tick = dbg.sym["tick"]
    original = dbg.t.read_memory(tick, 4, 1)
    dbg.t.add_sw_breakpoint(tick, 1)
    if not dbg.t.sw_pages:  # (without an INT3 intercept the page is pulled instead)
        assert dbg.m.mem.read(tick, 1) == b"\xcc"  # patched in guest RAM...
    assert dbg.t.read_memory(tick, 4, 1) == original  # ...but reads show the original
    seen_tids = set()
    before = dbg.u64("counter")
    for _ in range(20):
        ev = dbg.cont()
        assert ev.kind == "swbreak" and ev.signal == SIGTRAP
        assert dbg.t.read_registers(ev.tid)["rip"] == tick
        seen_tids.add(ev.tid)
    assert seen_tids <= {1, 2}
    # GDB's way over a breakpoint: remove, step, re-insert, continue.
    dbg.t.remove_sw_breakpoint(tick, 1)
    assert dbg.m.mem.read(tick, 4) == original
    dbg.t.resume(step(ev.tid))
    assert dbg.wait_stop().kind == "signal"
    dbg.t.add_sw_breakpoint(tick, 1)
    assert dbg.cont().kind == "swbreak"
    assert dbg.u64("counter") > before


def test_hw_breakpoint_hits_and_continues_past(dbg):
    dbg.run_until_up()
    tick = dbg.sym["tick"]
    dbg.t.add_hw_breakpoint(tick, 1)
    counts = []
    for _ in range(4):
        ev = dbg.cont()
        assert ev.kind == "hwbreak"
        assert dbg.t.read_registers(ev.tid)["rip"] == tick
        counts.append(dbg.u64("counter"))
    # RF is ignored on PVM: each continue must still make progress.
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert dbg.m.mem.read(tick, 1) != b"\xcc"  # no patching for hardware breakpoints
    if not dbg.t.hw_pages:  # debug registers: four slots
        for addr in (0x100000, 0x100010, 0x100020):
            dbg.t.add_hw_breakpoint(addr, 1)
        with pytest.raises(TargetError) as err:
            dbg.t.add_hw_breakpoint(0x100030, 1)
        assert "debug registers are in use" in str(err.value)


@pytest.mark.parametrize("kind,stop", [("write", "watch"), ("access", "awatch"), ("read", "rwatch")])
def test_watchpoint_on_counter(kind, stop):
    dbg = Debugged("demo", cpus=1)  # one writer, so each stop is exactly one increment
    try:
        _watch_counter(dbg, kind, stop)
    finally:
        dbg.close()


def test_write_watch_with_two_writers(dbg):
    dbg.run_until_up()
    addr = dbg.sym["counter"]
    dbg.t.add_watchpoint(addr, 8, "write")
    values, tids = [], set()
    for _ in range(8):
        ev = dbg.cont()
        assert ev.kind == "watch" and ev.addr == addr
        values.append(dbg.u64("counter"))
        tids.add(ev.tid)
    assert values == sorted(values) and values[-1] > values[0]
    assert tids <= {1, 2}


def _watch_counter(dbg, kind, stop):
    dbg.run_until_up()
    addr = dbg.sym["counter"]
    dbg.t.add_watchpoint(addr, 8, kind)
    last = dbg.u64("counter")
    for _ in range(4):
        ev = dbg.cont()
        assert ev.kind == stop and ev.addr == addr
        value = dbg.u64("counter")
        if kind != "read":
            # GDB's `watch` needs the stop after the write, new value in memory.
            assert value == last + 1
        # the stop is right after the instruction that touched counter
        rip = dbg.t.read_registers(ev.tid)["rip"]
        assert dbg.sym["tick"] < rip <= dbg.sym["tick"] + 16
        last = value
    dbg.t.remove_watchpoint(addr, 8, kind)
    dbg.t.resume(CONTINUE)
    time.sleep(0.2)
    ev = dbg.t.stop()
    assert ev.kind == "signal" and dbg.u64("counter") > last + 1


def test_many_watchpoints_beyond_four_debug_registers(dbg):
    dbg.run_until_up()
    base = dbg.sym["per_cpu_counter"]
    for i in range(6):
        dbg.t.add_watchpoint(base + 8 * i, 8, "write")
    dbg.t.add_watchpoint(dbg.sym["counter"], 8, "write")
    hits = {dbg.cont().addr for _ in range(6)}
    assert hits <= {dbg.sym["counter"], base, base + 8}
    assert hits & {base, base + 8}  # per-CPU slots 0/1 are written by the two vCPUs


def test_single_step_advances_rip_and_others_stay_parked(dbg):
    dbg.run_until_up()
    other = dbg.t.read_registers(2)["rip"]
    rips = []
    for _ in range(10):
        dbg.t.resume(step(1))
        ev = dbg.wait_stop()
        assert ev.kind == "signal" and ev.signal == SIGTRAP and ev.tid == 1
        rips.append(dbg.t.read_registers(1)["rip"])
    assert len(set(rips)) > 3  # rip moves through the main loop
    # the main loop, tick, and (about once a second) the heartbeat's console code
    ranges = [(dbg.sym["main_loop"], dbg.sym["tick"] + 32)]
    ranges += [(dbg.sym[n], dbg.sym[n] + 0x80) for n in ("heartbeat", "puts", "putc") if n in dbg.sym]
    assert all(any(lo <= r < hi for lo, hi in ranges) for r in rips), [hex(r) for r in rips]
    assert dbg.t.read_registers(2)["rip"] == other  # vCPU 1 never ran


def test_interrupt_stops_a_running_guest(dbg):
    dbg.t.resume(CONTINUE)
    assert dbg.t.is_running()
    assert dbg.out.wait_for(rb"cpu 1 up")
    dbg.t.interrupt()
    ev = dbg.wait_stop()
    assert ev.kind == "signal" and ev.signal == SIGINT
    assert not dbg.t.is_running()
    c1 = dbg.u64("counter")
    time.sleep(0.1)
    assert dbg.u64("counter") == c1  # really stopped


def test_detach_restores_bytes_and_the_guest_runs_on(dbg):
    dbg.run_until_up()
    tick = dbg.sym["tick"]
    original = dbg.m.mem.read(tick, 1)
    dbg.t.add_sw_breakpoint(tick, 1)
    dbg.t.add_watchpoint(dbg.sym["counter"], 8, "access")
    dbg.t.add_hw_breakpoint(dbg.sym["main_loop"], 1)
    dbg.t.detach()
    assert dbg.m.mem.read(tick, 1) == original
    assert dbg.m.slots.protected == {}
    before = dbg.m.mem.read_u64(dbg.sym["counter"])
    deadline = time.monotonic() + 30
    while dbg.m.mem.read_u64(dbg.sym["counter"]) < before + 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dbg.m.mem.read_u64(dbg.sym["counter"]) >= before + 1000
    assert dbg.m.wait(0) is None  # no stop, no end: the guest just runs


def test_monitor_commands(dbg):
    dbg.run_until_up()
    assert "translate ADDR" in dbg.t.monitor("help")
    cpus = dbg.t.monitor("cpus")
    assert "vCPU 0: long rip=0x" in cpus and "vCPU 1: long" in cpus and "cr3=0x" in cpus
    assert f"{dbg.sym['counter']:#x} -> {dbg.sym['counter']:#x}" in dbg.t.monitor(f"translate {dbg.sym['counter']:#x}")
    assert "not mapped" in dbg.t.monitor("translate 0x7fff00000000")
    assert "not a number" in dbg.t.monitor("translate zz")
    assert "efer=0x500" in dbg.t.monitor("regs")
    assert "unknown monitor command" in dbg.t.monitor("frobnicate")


def test_guest_own_int3_is_delivered_to_the_guest():
    d = Debugged("idt", cpus=1)
    try:
        d.run_until_up()
        start = d.u64("bp_count")
        # A breakpoint of ours elsewhere, to prove both kinds coexist.
        d.t.add_sw_breakpoint(d.sym["tick"], 1)
        ev = d.cont()
        assert ev.kind == "swbreak" and d.t.read_registers(1)["rip"] == d.sym["tick"]
        d.t.remove_sw_breakpoint(d.sym["tick"], 1)
        d.t.resume(CONTINUE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if d.m.mem.read_u64(d.sym["bp_count"]) > start + 10:
                break
        ev = d.t.stop()
        assert ev.kind == "signal"  # the guest's int3s never became stops
        bp, ticks = d.u64("bp_count"), d.u64("counter")
        assert bp > start + 10
        assert abs(ticks // 16 - bp) <= 1  # one guest int3 per 16 ticks, all handled
    finally:
        d.close()


def test_guest_end_is_reported_as_exit(tmp_path):
    from tests.kvm_support import EXIT_42, tiny_guest

    m = make_machine(kernel=tiny_guest(tmp_path, EXIT_42), serial_out=SerialSink())
    t = m.debug_target()
    try:
        m.start(paused=True)
        t.resume(CONTINUE)
        ready, _, _ = select.select([t.stop_fd()], [], [], 60)
        assert ready
        ev = t.take_stop()
        assert ev.kind == "exited" and ev.code == 42
    finally:
        m.shutdown()


def test_detach_while_running_cleans_up(dbg):
    """A vanished client: the session removes breakpoints and detaches while
    the guest runs; the vCPUs must not block and the guest runs on clean."""
    dbg.run_until_up()
    tick = dbg.sym["tick"]
    original = dbg.m.mem.read(tick, 1)
    dbg.t.add_watchpoint(dbg.sym["counter"], 8, "read")
    dbg.t.add_sw_breakpoint(0x100000, 1)  # never executed again: the guest keeps running
    dbg.t.resume(CONTINUE)
    assert dbg.t.is_running()
    dbg.t.remove_watchpoint(dbg.sym["counter"], 8, "read")
    dbg.t.remove_sw_breakpoint(0x100000, 1)
    dbg.t.detach()
    assert dbg.m.slots.protected == {} and dbg.m.mem.read(tick, 1) == original
    before = dbg.m.mem.read_u64(dbg.sym["counter"])
    deadline = time.monotonic() + 30
    while dbg.m.mem.read_u64(dbg.sym["counter"]) < before + 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dbg.m.mem.read_u64(dbg.sym["counter"]) >= before + 1000
    assert dbg.t.take_stop() is None  # no stray stop reported


def test_halted_vcpu_stops_and_resumes_under_the_debugger(tmp_path):
    """sti; hlt with no interrupt source: the vCPU idles (the VM does not
    end); the debugger can still stop it, and a step runs it past the hlt."""
    from tests.kvm_support import tiny_guest

    sti_hlt_exit7 = bytes.fromhex("fbf4b007e6f4")  # sti; hlt; mov $7,%al; out %al,$0xf4
    m = make_machine(kernel=tiny_guest(tmp_path, sti_hlt_exit7), serial_out=SerialSink())
    t = m.debug_target()
    try:
        m.start(paused=True)
        t.initial_stop()
        t.resume(CONTINUE)
        time.sleep(0.2)
        assert m.wait(0) is None  # idle, not ended
        ev = t.stop()
        assert ev is not None and ev.kind == "signal" and ev.signal == SIGINT
        assert t.read_registers(1)["rip"] == 0x100002  # just past the hlt
        t.resume(step(1))
        ready, _, _ = select.select([t.stop_fd()], [], [], 60)
        assert ready and t.take_stop().kind == "signal"
        assert t.read_registers(1)["rip"] == 0x100004
        t.resume(CONTINUE)
        assert m.wait(60) == 7
    finally:
        m.shutdown()


def test_register_access_while_running_is_refused_not_hung(dbg):
    dbg.t.resume(CONTINUE)
    with pytest.raises(TargetError, match="running"):
        dbg.t.read_registers(1)
    assert "running" in dbg.t.monitor("cpus")
    assert dbg.t.stop().kind == "signal"
    assert dbg.t.read_registers(1)["rip"]


def test_page_breakpoint_on_tick_from_the_entry(monkeypatch):
    """Page-protection breakpoints (what the nested lab uses), set at the
    entry stop: the demo's page-table loop, its GDT (descriptor loads write
    the accessed bit) and its data all share tick's page, and both vCPUs
    run there. Every hit must stop exactly at tick, counters moving on."""
    monkeypatch.setenv("VMSCOPE_KVM_BREAKPOINTS", "pages")
    d = Debugged("demo", cpus=2)
    try:
        assert d.t.sw_pages
        tick = d.sym["tick"]
        d.t.add_sw_breakpoint(tick, 1)
        counts = []
        tids = set()
        for _ in range(6):
            ev = d.cont()
            assert ev.kind == "swbreak", ev
            assert d.t.read_registers(ev.tid)["rip"] == tick
            tids.add(ev.tid)
            counts.append(d.u64("counter"))
        assert counts == sorted(counts) and counts[-1] > counts[0], counts
        d.t.remove_sw_breakpoint(tick, 1)
        d.t.detach()
        assert d.out.wait_for(rb"cpu 1 up")
    finally:
        d.close()


def test_the_console_ring_is_drained_slowly_only_while_the_debugger_holds_the_machine(dbg):
    """The coalesced-port drain thread wakes every 5 ms while vCPUs run and
    every 50 ms while a debugger has them stopped (each wake-up takes the
    interpreter lock from the vCPU thread that serves gdb): it asks the run
    control at each wake-up."""
    ring = dbg.m.coalesced
    if ring is None:
        pytest.skip("this KVM does not coalesce port writes")
    dbg.run_until_up()
    assert ring.machine_stopped()
    dbg.t.resume(CONTINUE)
    assert not ring.machine_stopped()
    assert dbg.t.stop() is not None and ring.machine_stopped()
    dbg.t.resume(step(1))
    dbg.wait_stop()
    assert ring.machine_stopped()
