"""Requests served from the thread of the vCPU that runs alone
(``vmscope/gdbserver/vcpu_serving.py``): once the stub has started a lone
step, or a continue with one vCPU online, that vCPU's thread sends the stop
reply and answers what follows (memory, registers, breakpoints, the next
step or continue), with no hand-off between threads. It must change no
reply, and the connection must come back to the stub's thread for
everything else.

- one vCPU: a session of steps, reads, a breakpoint inserted, a continue to
  it, a step over it, its removal and a detach gets the same replies with
  ``VMSCOPE_STUB_VCPU_SERVING`` on and off
- breakpoint hits as gdb makes them (remove, step over, insert, continue)
  are answered from the vCPU's thread, continues included
- a continue started from a vCPU's thread gives the connection back to the
  stub's, which sees GDB's Ctrl-C while the guest runs
- two vCPUs online: no vCPU's thread serves (only one-vCPU machines do for
  now, see ``KvmTargetBase.offer_debugger``), and steps alternating
  between the vCPUs each move only the stepped one
"""

from __future__ import annotations

import pytest

from tests.support import RawClient, VmProcess, elf_symbols, free_port, require_kvm

pytestmark = pytest.mark.e2e


def _vm(cpus: int, serving: str, *args: str) -> tuple[VmProcess, RawClient]:
    port = free_port()
    vm = VmProcess("--accel", "kvm", "--cpus", str(cpus), *args, gdb_port=port,
                   env={"VMSCOPE_STUB_VCPU_SERVING": serving})
    vm.wait_listening()
    return vm, RawClient(port)


def _one_vcpu_session(serving: str) -> list[bytes]:
    from vmscope.guests import guest_elf

    syms = elf_symbols(guest_elf("demo"))
    tick, counter = syms["tick"], syms["counter"]
    vm, c = _vm(1, serving)
    try:
        out = [c.ask(b"?")]
        for _ in range(4):  # steps from the entry point: each served where the last step ended
            out += [c.ask(b"vCont;s:1;c"), c.ask(b"qXfer:threads:read::0,1000"), c.ask(b"p10")]
        out += [c.ask(b"Z0,%x,1" % tick), c.ask(b"vCont;c")]  # runs to tick: stops there
        out += [c.ask(b"p10"), c.ask(b"m%x,8" % tick)]  # the breakpoint byte hidden
        counts = [c.ask(b"m%x,8" % counter)]  # at tick, before its `lock incq counter`
        out += [c.ask(b"z0,%x,1" % tick), c.ask(b"vCont;s:1"), c.ask(b"p10"), c.ask(b"Z0,%x,1" % tick)]
        counts.append(c.ask(b"m%x,8" % counter))  # the step over ran the increment
        out += [c.ask(b"vCont;c"), c.ask(b"p10"), c.ask(b"z0,%x,1" % tick)]
        counts.append(c.ask(b"m%x,8" % counter))  # once round the loop: back at tick, before the next
        values = [int.from_bytes(bytes.fromhex(v.decode()), "little") for v in counts]
        out.append(b"counts %d %d" % (values[1] - values[0], values[2] - values[1]))
        out.append(c.ask(b"D"))
        c.close()
        return out
    finally:
        vm.close()


def test_serving_from_the_vcpu_changes_no_reply():
    require_kvm()
    served, stub_only = _one_vcpu_session("1"), _one_vcpu_session("0")
    assert served == stub_only
    rips = [int.from_bytes(bytes.fromhex(r.decode()), "little") for r in served[3:13:3]]
    assert len(set(rips)) == 4, rips  # four steps, four places
    assert served[-2] == b"counts 1 0" and served[-1] == b"OK"


def test_breakpoint_hits_are_served_from_the_vcpu_thread():
    """gdb's packets for `continue` to a breakpoint, ten times: each hit's
    stop reply comes from vCPU 0's thread (-vv logs each stop a vCPU's
    thread serves: the step over and the hit, so two per round; the stub's
    thread takes the offer back when it finds the vCPU running at the end
    of its 50 ms wait, so a slow round may lose one). Before continues were
    served there, only the step-overs were: ten."""
    from vmscope.guests import guest_elf

    syms = elf_symbols(guest_elf("demo"))
    tick, counter = syms["tick"], syms["counter"]
    require_kvm()
    vm, c = _vm(1, "1", "-vv")
    try:
        c.ask(b"?")
        assert c.ask(b"Z0,%x,1" % tick) == b"OK"
        assert c.ask(b"vCont;c").startswith(b"T05")
        counts = []
        for _ in range(10):
            assert c.ask(b"z0,%x,1" % tick) == b"OK"
            assert c.ask(b"vCont;s:1").startswith(b"T05")
            assert c.ask(b"Z0,%x,1" % tick) == b"OK"
            stop = c.ask(b"vCont;c")
            assert stop.startswith(b"T05") and b"swbreak" in stop, stop
            assert int.from_bytes(bytes.fromhex(c.ask(b"p10").decode()), "little") == tick
            counts.append(int.from_bytes(bytes.fromhex(c.ask(b"m%x,8" % counter).decode()), "little"))
        assert [b - a for a, b in zip(counts, counts[1:])] == [1] * 9  # one lap of the loop per hit
        assert c.ask(b"z0,%x,1" % tick) == b"OK" and c.ask(b"D") == b"OK"
        c.close()
    finally:
        vm.close()
    served = vm.stderr.count("serves the debugger from its stop")
    assert served > 12, vm.stderr[-3000:]  # 20 when no round was slow


def _rip(c: RawClient, tid: int) -> int:
    assert c.ask(b"Hg%x" % tid) == b"OK"
    return int.from_bytes(bytes.fromhex(c.ask(b"p10").decode()), "little")


def test_stepping_one_of_two_vcpus_moves_only_that_one():
    """Steps alternate between the vCPUs; with two vCPUs online the stub's
    own thread answers every request."""
    import re

    from vmscope.guests import guest_elf

    tick = elf_symbols(guest_elf("demo"))["tick"]
    require_kvm()
    vm, c = _vm(2, "1", "-vv")
    try:
        assert c.ask(b"?").startswith(b"T05")
        assert c.ask(b"Z0,%x,1" % tick) == b"OK"
        stop = c.ask(b"vCont;c")
        assert c.ask(b"z0,%x,1" % tick) == b"OK"
        first = int(re.search(rb"thread:([0-9a-f]+);", stop).group(1), 16)
        other = 3 - first
        for stepped, still in [(other, first), (first, other), (other, first), (other, first)]:
            before = {t: _rip(c, t) for t in (1, 2)}
            reply = c.ask(b"vCont;s:%x" % stepped)
            assert re.search(rb"thread:0*%x;" % stepped, reply), (stepped, reply)
            after = {t: _rip(c, t) for t in (1, 2)}
            assert after[stepped] != before[stepped] and after[still] == before[still], (stepped, before, after)
        assert c.ask(b"D") == b"OK"
        c.close()
        assert vm.proc.poll() is None
    finally:
        vm.close()
    assert "serves the debugger from its stop" not in vm.stderr


@pytest.mark.parametrize("serving", ["1", "0"])
def test_ctrl_c_stops_a_continue_that_a_vcpu_thread_started(serving):
    require_kvm()
    vm, c = _vm(1, serving, "-vv")
    try:
        c.ask(b"?")
        for _ in range(3):
            c.ask(b"vCont;s:1;c")
        c.send(b"vCont;c")  # read by vCPU 0's thread, which served the last step's stop
        time_out = vm.proc.poll()
        assert time_out is None
        assert c.interrupt().startswith(b"T02")  # SIGINT
        assert c.ask(b"D") == b"OK"
        c.close()
    finally:
        vm.close()
    served = "serves the debugger from its stop" in vm.stderr
    assert served == (serving == "1"), vm.stderr[-2000:]
