"""Typed request parsing and reply formatting."""

import pytest
from hypothesis import given, strategies as st

from vmscope.rsp import packets as P


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"?", P.HaltReason()),
        (b"g", P.ReadRegisters()),
        (b"p10", P.ReadRegister(16)),
        (b"P10=0100000000000000", P.WriteRegister(16, bytes([1, 0, 0, 0, 0, 0, 0, 0]))),
        (b"mffffffff81000000,40", P.ReadMemory(0xFFFFFFFF81000000, 0x40)),
        (b"x1000,10", P.ReadMemory(0x1000, 0x10, binary=True)),
        (b"M1000,2:abcd", P.WriteMemory(0x1000, b"\xab\xcd")),
        (b"X1000,0:", P.WriteMemory(0x1000, b"")),
        (b"Hg2", P.SetThread("g", 2)),
        (b"Hc-1", P.SetThread("c", -1)),
        (b"Hgp1.2", P.SetThread("g", 2)),
        (b"T1", P.ThreadAlive(1)),
        (b"Z0,401000,1", P.Breakpoint(True, 0, 0x401000, 1)),
        (b"z2,601040,8", P.Breakpoint(False, 2, 0x601040, 8)),
        (b"vCont?", P.VContQuery()),
        (b"vCont;s:1;c", P.Resume((("s", None, 1), ("c", None, -1)))),
        (b"vCont;C05:2", P.Resume((("c", 5, 2),))),
        (b"c", P.Resume((("c", None, -1),), None, legacy=True)),
        (b"s401000", P.Resume((("s", None, -1),), 0x401000, legacy=True)),
        (b"D", P.Detach()),
        (b"k", P.Kill()),
        (b"qRcmd,68656c70", P.Query("Rcmd", b"68656c70")),
        (b"qXfer:features:read:target.xml:0,ffb", P.Query("Xfer", b"features:read:target.xml:0,ffb")),
        (b"QStartNoAckMode", P.Query("StartNoAckMode", b"", set=True)),
        (b"qSupported:multiprocess+;swbreak+", P.Query("Supported", b"multiprocess+;swbreak+")),
        (b"bogus", P.Unknown(b"bogus")),
    ],
)
def test_parse(payload, expected):
    assert P.parse_request(payload) == expected


@pytest.mark.parametrize("payload", [b"mzz,4", b"m1000", b"M1000,4:ab", b"Z0,1", b"P1", b"H", b"vCont;q", b"p", b"m-1,4"])
def test_malformed_raises_protocol_error(payload):
    with pytest.raises(P.ProtocolError):
        P.parse_request(payload)


def test_stop_reply_roundtrip():
    raw = P.stop_reply(5, 2, [(0x10, b"\x00\x10\x40\x00\x00\x00\x00\x00")], "watch", 0x601040)
    assert raw == b"T0510:0010400000000000;thread:2;watch:601040;"
    s = P.parse_stop_reply(raw)
    assert (s.signal, s.tid, s.reason, s.addr) == (5, 2, "watch", 0x601040)
    assert s.registers[0x10] == b"\x00\x10\x40\x00\x00\x00\x00\x00"
    assert P.parse_stop_reply(b"W00").kind == "exited"
    assert P.parse_stop_reply(P.stop_reply(5, 1, [], "swbreak")).reason == "swbreak"


@given(st.binary(max_size=64))
def test_parse_never_raises_anything_but_protocol_error(payload):
    try:
        P.parse_request(payload)
    except P.ProtocolError:
        pass
