"""StopEvent, the stop type both ends share: the stub's reply for an event
reads back as the same event on the client's side, and the targets that
import it do not load the protocol code with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmscope.rsp import packets as P
from vmscope.rsp.stops import StopEvent, stop_event


@pytest.mark.parametrize("event", [
    StopEvent("signal", tid=2, signal=2),
    StopEvent("swbreak", tid=1, signal=5),
    StopEvent("hwbreak", tid=3, signal=5),
    StopEvent("watch", tid=2, signal=5, addr=0x601040),
    StopEvent("awatch", tid=1, signal=5, addr=0x1000),
])
def test_stop_reply_reads_back_as_the_same_event(event):
    reason = event.kind if event.kind != "signal" else None
    assert stop_event(P.stop_reply(event.signal, event.tid, [], reason, event.addr)) == event


def test_exit_and_termination_read_back():
    assert stop_event(P.exit_reply(3)) == StopEvent("exited", tid=1, code=3)
    assert stop_event(P.terminated_reply(9)) == StopEvent("terminated", tid=1, signal=9)


def test_importing_the_target_interface_does_not_load_the_protocol_core():
    code = ("import sys, vmscope.gdbserver.target as t; "
            "assert t.StopEvent is __import__('vmscope.rsp.stops', fromlist=['x']).StopEvent; "
            "print(sorted(m for m in sys.modules if m.startswith('vmscope.rsp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['vmscope.rsp', 'vmscope.rsp.stops']"
