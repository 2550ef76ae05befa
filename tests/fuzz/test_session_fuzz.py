"""Random and mutated packets never hit a bug in the stub's session or hang it.

The session runs over a real target (the emulated CPU running the demo
guest; no KVM needed), so what the fuzzer reaches is real target code:
register and memory access, breakpoints, resume and stop.

A reply alone proves nothing (the session answers ``E05`` to its own bugs),
so the session runs in strict mode, where an internal error raises, and
anything logged at ERROR under ``vmscope`` (cleanup logs and goes on) fails
the example too. Real error replies (``E16`` for a malformed packet, ``E0e``
for a bad address...) are answers, not bugs.
"""

from __future__ import annotations

import io
import logging
import select

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmscope.gdbserver.session import Session
from vmscope.machine import MachineConfig

VALID = [
    b"?", b"g", b"p10", b"p0", b"P0=0100000000000000", b"m100000,40", b"x100000,40", b"M100000,2:9090",
    b"X100000,1:\x90", b"Hg1", b"Hg2", b"Hc-1", b"T2", b"qC", b"qAttached", b"qfThreadInfo", b"qsThreadInfo",
    b"qSupported:multiprocess+;swbreak+;hwbreak+", b"qXfer:features:read:target.xml:0,ffb",
    b"qXfer:threads:read::0,1000", b"qRcmd,68656c70", b"vCont?", b"vCont;s:1", b"vCont;s:2;c", b"s", b"c",
    b"Z0,100000,1", b"z0,100000,1", b"Z1,100000,1", b"z1,100000,1", b"Z2,100000,8", b"z2,100000,8",
    b"Z4,100000,4", b"z4,100000,4", b"qThreadExtraInfo,1", b"G" + b"00" * 8,
    # corners: host I/O, monitor commands, odd thread and size forms, out-of-range numbers
    b"vFile:open:2f766d73636f70652f6b616c6c73796d732e656c66,0,0", b"vFile:pread:3,100,0", b"vFile:fstat:3",
    b"vFile:close:3", b"vFile:setfs:0", b"qRcmd,6d656d6f7279", b"qHostInfo", b"vCont;t:1", b"vCont;c:1;s:2", b"T0",
    b"Hg0", b"C05", b"S05;100000", b"m0,0", b"x0,0", b"M0,0:", b"p999", b"P99=00", b"G" + b"00" * 600,
    b"qXfer:features:read:foo.xml:0,10", b"qXfer:threads:read::ffff,10", b"Z0,ffffffffffffffff,1", b"Z3,100000,3",
]


def mutate(data: bytes, draw) -> bytes:
    ops = draw(st.lists(st.tuples(st.sampled_from("fdit"), st.integers(0, 200), st.integers(0, 255)), max_size=4))
    buf = bytearray(data)
    for op, pos, val in ops:
        if not buf:
            buf.append(val)
            continue
        pos %= len(buf)
        if op == "f":
            buf[pos] = val
        elif op == "d":
            del buf[pos]
        elif op == "i":
            buf.insert(pos, val)
        else:
            del buf[pos:]
    return bytes(buf)


@st.composite
def packets(draw):
    if draw(st.booleans()):
        return mutate(draw(st.sampled_from(VALID)), draw)
    return draw(st.binary(max_size=40))


class ErrorLog(logging.Handler):
    """Collects ERROR records of the ``vmscope`` loggers."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def report(self) -> str:
        return "\n".join(self.format(r) for r in self.records)


@pytest.fixture(scope="module")
def errors():
    handler = ErrorLog()
    logger = logging.getLogger("vmscope")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def target():
    from vmscope.emu import EmuMachine

    machine = EmuMachine(MachineConfig(arch="x86_64", cpus=2, serial_out=io.BytesIO()))
    machine.start(paused=True)
    yield machine.debug_target()
    machine.shutdown()


def _settle(session: Session, target) -> None:
    """A resume must end: interrupt and require the stop within 10 s."""
    if not session.running:
        return
    target.interrupt()
    r, _, _ = select.select([target.stop_fd()], [], [], 10)
    assert r, "target did not stop after an interrupt"
    event = target.take_stop()
    if event is not None:
        session.on_stop(event)
    session.running = False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(packets(), min_size=1, max_size=12))
def test_random_packets_never_raise_or_hang(target, errors, payloads):
    errors.records.clear()
    session = Session(target, strict=True)
    try:
        for payload in payloads:
            if payload[:1] == b"k" or payload.startswith(b"vKill") or payload[:1] == b"D":
                continue  # ending the guest or the session is tested elsewhere
            reply = session.handle(payload)
            assert reply is None or isinstance(reply, bytes)
            if reply is None:
                assert session.running or session.closed
            _settle(session, target)
    finally:
        _settle(session, target)
        session.cleanup()
    assert not errors.records, f"the session logged errors:\n{errors.report()}"
    assert session.internal_errors == 0
