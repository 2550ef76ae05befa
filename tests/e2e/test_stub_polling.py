"""The stub polls for GDB's next request while the guest is stopped
(``VMSCOPE_STUB_POLL_US``, docs/performance.md). Polling changes when a
request is read, never what is answered, and must not make the stub deaf
to its own shutdown while a client talks without pause.

- the same requests get the same replies with polling on and off, on KVM
  and on the emulated CPU (stop reply, memory, registers, a step)
- a client sending requests back to back, with no gap for the stub to
  sleep in, still sees the VMM end (SIGTERM) and its connection close
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support import RawClient, VmProcess, elf_symbols, free_port, require_kvm

pytestmark = pytest.mark.e2e


def _session(accel: str, poll_us: str) -> list[bytes]:
    from vmscope.guests import guest_elf

    tick = elf_symbols(guest_elf("demo"))["tick"]
    port = free_port()
    vm = VmProcess("--accel", accel, gdb_port=port, env={"VMSCOPE_STUB_POLL_US": poll_us})
    try:
        vm.wait_listening()
        c = RawClient(port)
        replies = [c.ask(b"?"), c.ask(b"m%x,10" % tick), c.ask(b"g")]
        for _ in range(5):
            replies += [c.ask(b"vCont;s:1;c"), c.ask(b"p10")]  # a step, then rip
        c.close()
        return replies
    finally:
        vm.close()


@pytest.mark.parametrize("accel", ["kvm", "emu"])
def test_polling_changes_no_reply(accel):
    if accel == "kvm":
        require_kvm()
    polled, slept = _session(accel, "300"), _session(accel, "0")
    assert polled == slept
    assert polled[0].startswith(b"T05") and len({r for r in polled[4::2]}) == 5  # five steps, five rips


def test_a_client_that_never_pauses_still_sees_the_vmm_end():
    """The VMM waits 5 s for the stub's thread at exit (so GDB gets the last
    stop reply) and then leaves without it: a stub deaf to its shutdown
    shows as an exit that takes those 5 s instead of well under them."""
    require_kvm()
    port = free_port()
    vm = VmProcess("--accel", "kvm", gdb_port=port, env={"VMSCOPE_STUB_POLL_US": "1000000"})  # a 1 s window
    try:
        vm.wait_listening()
        c = RawClient(port)
        c.ask(b"?")
        answered = 0
        sent = time.monotonic()
        vm.proc.send_signal(signal.SIGTERM)
        with pytest.raises((ConnectionError, OSError)):
            while time.monotonic() < sent + 10:
                c.ask(b"m100000,8")
                answered += 1
        closed = time.monotonic() - sent
        vm.proc.wait(10)
        ended = time.monotonic() - sent
        assert closed < 4 and ended < 4, f"connection closed after {closed:.1f} s, VMM ended after {ended:.1f} s " \
                                         f"({answered} replies meanwhile)"
    finally:
        vm.close()
