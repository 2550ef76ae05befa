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


# --- encoders: the client sends the very types the stub parses ------------------

_u64 = st.integers(0, 2**64 - 1)
_tid = st.one_of(st.just(P.ALL_THREADS), st.just(P.ANY_THREAD), st.integers(1, 2**31))
_sig = st.one_of(st.none(), st.integers(0, 255))
_name = st.from_regex(r"[A-Za-z][A-Za-z0-9._]{0,20}", fullmatch=True)
_arg = st.binary(min_size=1, max_size=16).map(lambda b: b.hex().encode())


def _resume():
    vcont = st.lists(st.tuples(st.sampled_from("cst"), _sig, _tid), min_size=1, max_size=4).map(
        lambda acts: P.Resume(tuple((k, None if k == "t" else s, t) for k, s, t in acts)))
    legacy = st.tuples(st.sampled_from("cs"), _sig, st.one_of(st.none(), _u64)).map(
        lambda a: P.Resume(((a[0], a[1], P.ALL_THREADS),), a[2], legacy=True))
    return st.one_of(vcont, legacy)


REQUESTS = st.one_of(
    st.just(P.HaltReason()), st.just(P.ReadRegisters()), st.just(P.VContQuery()),
    st.binary(max_size=64).map(P.WriteRegisters),
    st.integers(0, 2**16).map(P.ReadRegister),
    st.builds(P.WriteRegister, st.integers(0, 2**16), st.binary(max_size=64)),
    st.builds(P.ReadMemory, _u64, st.integers(0, 2**32), st.booleans()),
    st.builds(P.WriteMemory, _u64, st.binary(max_size=64), st.booleans()),
    _resume(),
    st.builds(P.SetThread, st.sampled_from("gc"), _tid),
    st.builds(P.ThreadAlive, st.one_of(st.just(P.ALL_THREADS), st.integers(0, 2**31))),
    st.builds(P.Breakpoint, st.booleans(), st.integers(0, 4), _u64, st.integers(0, 64)),
    st.builds(P.Query, _name, st.one_of(st.just(b""), _arg), st.booleans()),
    st.builds(P.Detach, st.one_of(st.none(), st.integers(0, 2**31))),
    st.builds(P.Kill, st.booleans()),
    st.builds(P.HostIo, st.sampled_from(["open", "pread", "close", "fstat", "setfs"]),
              st.lists(_arg, max_size=3).map(tuple)),
)


@given(REQUESTS)
def test_encode_parse_round_trip(request):
    payload = request.encode()
    assert isinstance(payload, bytes) and payload
    parsed = P.parse_request(payload)
    assert parsed == request
    if isinstance(request, P.WriteMemory):  # not part of equality: check how it travelled
        assert parsed.binary == request.binary


@pytest.mark.parametrize("payload", [
    b"?", b"g", b"p10", b"P10=0100000000000000", b"mffffffff81000000,40", b"x1000,10", b"M1000,2:abcd",
    b"Hg2", b"Hc-1", b"T1", b"Z0,401000,1", b"z2,601040,8", b"vCont?", b"vCont;s:1;c", b"vCont;C05:2", b"c",
    b"s401000", b"D", b"D;1", b"k", b"qRcmd,68656c70", b"qXfer:features:read:target.xml:0,ffb",
    b"QStartNoAckMode", b"qSupported:multiprocess+;swbreak+", b"qfThreadInfo", b"Qqemu.PhyMemMode:1",
])
def test_canonical_packets_encode_to_themselves(payload):
    """What GDB (and the client) send comes back byte for byte."""
    assert P.parse_request(payload).encode() == payload
