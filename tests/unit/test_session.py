"""The stub's session over a real (emulated-CPU) target: packets in, replies out."""

from __future__ import annotations

import io
import select

import pytest

from vmscope.gdbserver.session import Session
from vmscope.machine import MachineConfig
from vmscope.rsp import packets as P


@pytest.fixture
def session():
    from vmscope.emu import EmuMachine

    machine = EmuMachine(MachineConfig(arch="x86_64", cpus=2, serial_out=io.BytesIO()))
    machine.start(paused=True)
    yield Session(machine.debug_target())
    machine.shutdown()


def _stop(session: Session) -> bytes:
    target = session.target
    r, _, _ = select.select([target.stop_fd()], [], [], 10)
    assert r, "no stop within 10 s"
    return session.on_stop(target.take_stop())


def test_qsupported_comes_from_capabilities(session):
    feats = session.handle(b"qSupported:multiprocess+;swbreak+;hwbreak+").split(b";")
    assert b"swbreak+" in feats and b"hwbreak+" in feats and b"qXfer:features:read+" in feats
    assert any(f.startswith(b"PacketSize=") and int(f.split(b"=")[1], 16) >= 0x10000 for f in feats)


@pytest.mark.parametrize("packet", [b"vCont;s", b"vCont;s:1", b"s", b"vCont;s:2;c"])
def test_every_step_form_gets_a_stop_reply(session, packet):
    pc_before = session.target.read_registers(1)["rip"]
    assert session.handle(packet) is None
    reply = P.parse_stop_reply(_stop(session))
    assert reply.signal == 5 and reply.tid in (1, 2)
    if packet != b"vCont;s:2;c":
        assert session.target.read_registers(1)["rip"] != pc_before


def test_breakpoints_are_removed_by_cleanup(session):
    addr = session.target.read_registers(1)["rip"] + 0x40
    original = session.target.read_memory(addr, 1, 1)
    assert session.handle(b"Z0,%x,1" % addr) == P.OK
    assert session.handle(b"Z0,%x,1" % addr) == P.OK  # a second insert is harmless
    session.cleanup()
    assert session.target.read_memory(addr, 1, 1) == original
    assert session.inserted == set()


def test_monitor_help_and_unknown_packets(session):
    out = bytes.fromhex(session.handle(b"qRcmd," + b"help".hex().encode()).decode()).decode()
    assert "help" in out
    assert session.handle(b"qNoSuchThing") == b""
    assert session.handle(b"m zz") == P.error(22)
