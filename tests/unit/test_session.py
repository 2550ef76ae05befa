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


def test_stop_reply_carries_pc_sp_fp_and_thread_list_follows_names(session, monkeypatch):
    # the registers gdb needs at a stop ride in the reply (no 'g' round trip),
    # and the cached thread list changes when a thread's name does
    assert session.handle(b"vCont;s:1") is None
    reply = P.parse_stop_reply(_stop(session))
    regs = session.target.read_registers(1)
    arch = session.arch
    for name in (arch.pc, arch.sp, arch.fp):
        assert int.from_bytes(reply.registers[arch.index[name]], "little") == regs[name]
    doc = session.handle(b"qXfer:threads:read::0,1000")
    assert doc.startswith(b"l") and doc.count(b"<thread ") == 2
    assert session.handle(b"qXfer:threads:read::0,1000") == doc
    monkeypatch.setattr(type(session.target), "thread_name", lambda self, tid: f"renamed {tid}")
    assert session.handle(b"vCont;s:1") is None  # names change while the guest runs
    _stop(session)
    assert b'name="renamed 2"' in session.handle(b"qXfer:threads:read::0,1000")


def test_monitor_help_and_unknown_packets(session):
    out = bytes.fromhex(session.handle(b"qRcmd," + b"help".hex().encode()).decode()).decode()
    assert "help" in out
    assert session.handle(b"qNoSuchThing") == b""
    assert session.handle(b"m zz") == P.error(22)


# --- vFile: files the target makes, read by GDB through target: paths ---------------------------

class _FilesTarget:
    """Adds TargetFiles to the emulated CPU's target (the KVM target serves
    the kernel's kallsyms this way; this one serves a fixed blob, which is
    enough for the packet layer)."""

    BLOB = bytes(range(256)) * 40 + b"}$#*"  # bytes the framing must escape


@pytest.fixture
def files_session(session):
    from vmscope.gdbserver.target import TargetError, TargetFiles

    base = type(session.target)

    def file_contents(self, path: str) -> bytes:
        if path == "/vmscope/blob":
            return _FilesTarget.BLOB
        if path == "/vmscope/later":
            raise TargetError("not available yet")
        raise FileNotFoundError(path)

    session.target.__class__ = type("WithFiles", (base, TargetFiles), {"file_contents": file_contents})
    return session


def _vfile(session, op: str, *args) -> bytes:
    return session.handle(b"vFile:" + op.encode() + b":" + b",".join(a if isinstance(a, bytes) else a.encode()
                                                                      for a in args))


def test_vfile_open_pread_fstat_close(files_session):
    s = files_session
    assert _vfile(s, "setfs", "0") == b"F0"
    reply = _vfile(s, "open", b"/vmscope/blob".hex().encode(), "0", "0")
    assert reply.startswith(b"F") and int(reply[1:], 16) > 2
    fd = reply[1:].decode()
    st = _vfile(s, "fstat", fd)
    head, _, stat = st.partition(b";")
    assert head == b"F40" and len(stat) == 64
    assert int.from_bytes(stat[28:36], "big") == len(_FilesTarget.BLOB)  # st_size
    data = b""
    while True:
        head, _, chunk = _vfile(s, "pread", fd, "1000", f"{len(data):x}").partition(b";")
        assert int(head[1:], 16) == len(chunk)
        if not chunk:
            break
        data += chunk
    assert data == _FilesTarget.BLOB
    assert _vfile(s, "close", fd) == b"F0"
    assert _vfile(s, "pread", fd, "10", "0") == b"F-1,9"  # EBADF


def test_vfile_errors(files_session, capfd):
    s = files_session
    assert _vfile(s, "open", b"/etc/passwd".hex().encode(), "0", "0") == b"F-1,2"  # ENOENT
    assert _vfile(s, "open", b"/vmscope/blob".hex().encode(), "1", "0") == b"F-1,d"  # write: EACCES
    assert _vfile(s, "open", b"/vmscope/later".hex().encode(), "0", "0") == b"F-1,5"  # EIO ...
    assert "not available yet" in capfd.readouterr().err  # ... and why, where the VMM runs
    assert _vfile(s, "unlink", b"/vmscope/blob".hex().encode()) == b"F-1,58"  # ENOSYS
    assert _vfile(s, "open", "zz", "0", "0") == P.error(22)  # malformed: EINVAL, no crash


def test_vfile_is_unsupported_without_target_files(session):
    assert _vfile(session, "open", b"/x".hex().encode(), "0", "0") == b""


def test_internal_errors_are_logged_counted_and_raised_in_strict_mode(session, caplog, monkeypatch):
    """A bug (any exception but a TargetError or a malformed packet) still
    gets E05, so a stub survives it, but it is visible: logged at ERROR with
    the traceback and counted; strict mode (the fuzz test's) raises it."""
    import logging

    assert session.handle(b"m-1,4") == P.error(22)  # malformed: a real error reply
    assert session.handle(b"mffffffffffff0000,4").startswith(b"E")  # bad address: a real error reply
    assert session.internal_errors == 0

    def broken_read(*args):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(session.target, "read_memory", broken_read)
    with caplog.at_level(logging.ERROR, logger="vmscope.gdbserver"):
        assert session.handle(b"m100000,4") == P.error(5)
    assert session.internal_errors == 1
    assert "planted bug" in caplog.text and "Traceback" in caplog.text
    strict = Session(session.target, strict=True)
    with pytest.raises(RuntimeError, match="planted bug"):
        strict.handle(b"m100000,4")
    assert strict.internal_errors == 1


# --- reads GDB repeats within one stop are answered once ---------------------------------------


@pytest.fixture
def counted_reads(session, monkeypatch):
    """How many reads reach the target."""
    calls = []
    read_memory, read_registers = session.target.read_memory, session.target.read_registers
    monkeypatch.setattr(session.target, "read_memory", lambda *a: calls.append("m") or read_memory(*a))
    monkeypatch.setattr(session.target, "read_registers", lambda *a: calls.append("g") or read_registers(*a))
    return calls


def test_a_read_repeated_within_a_stop_reaches_the_target_once(session, counted_reads):
    pc = session.target.read_registers(1)["rip"]
    counted_reads.clear()
    first = [session.handle(p) for p in (b"m%x,1" % pc, b"g", b"qXfer:threads:read::0,1000")]
    again = [session.handle(p) for p in (b"m%x,1" % pc, b"g", b"qXfer:threads:read::0,1000", b"m%x,1" % pc)]
    assert again == first + [first[0]]
    assert counted_reads == ["m", "g"], "the repeats were answered without the target"


@pytest.mark.parametrize("between", [b"M%x,1:5a", b"Hg2", b"qRcmd,68656c70"])
def test_any_other_request_makes_the_next_read_ask_the_target(session, counted_reads, between):
    addr = session.target.read_registers(1)["rip"] + 0x40
    session.handle(b"m%x,1" % addr)
    counted_reads.clear()
    assert session.handle(between % addr if b"%" in between else between) not in (None, b"")
    reply = session.handle(b"m%x,1" % addr)
    assert counted_reads == ["m"]
    if between.startswith(b"M"):
        assert reply == b"5a", "the byte just written, not the one read before"
    session.cleanup()


def test_a_stop_makes_every_read_ask_the_target_again(session):
    before = session.handle(b"g")
    assert session.handle(b"vCont;s:1") is None
    _stop(session)
    assert session.handle(b"g") != before, "the step moved rip: the registers read afresh"


def test_a_change_made_elsewhere_is_seen_once_the_reuse_age_has_passed(session, monkeypatch):
    """Another program writing guest RAM (through the memfd ``monitor
    memory`` names) is seen by a read more than REUSE_SECONDS later."""
    import time

    from vmscope.gdbserver import kept_reads

    addr = session.target.read_registers(1)["rip"] + 0x40
    old = session.handle(b"m%x,1" % addr)
    session.target.write_memory(addr, bytes([int(old, 16) ^ 0xFF]), 1)  # not through the session
    assert session.handle(b"m%x,1" % addr) == old, "within the age limit: the kept reply"
    time.sleep(kept_reads.REUSE_SECONDS * 2)
    assert session.handle(b"m%x,1" % addr) == b"%02x" % (int(old, 16) ^ 0xFF)


# --- reads GDB sends after every stop are answered ahead --------------------------------------


def _step_and_stop(session: Session) -> int:
    """Step, take the stop as the stub does, and return the pc its reply
    reports (rip is register 16: ``10:`` and 8 little-endian bytes)."""
    import re

    assert session.handle(b"vCont;s:1") is None
    reply = _stop(session)
    session.prefetch()  # what the stub does once the stop reply is sent
    return int.from_bytes(bytes.fromhex(re.search(rb"10:([0-9a-f]{16});", reply).group(1).decode()), "little")


def test_the_reads_of_the_last_stop_are_answered_ahead_at_the_next(session, counted_reads):
    """GDB reads the thread list and the instruction at pc after every
    stop: read at one stop, they are prepared at the next (at its new pc),
    and GDB's requests then reach no target; the replies are the target's."""
    pc = _step_and_stop(session)
    session.handle(b"qXfer:threads:read::0,1000")
    session.handle(b"m%x,1" % pc)
    counted_reads.clear()
    new_pc = _step_and_stop(session)
    assert new_pc != pc
    assert counted_reads == ["m"], "the read at the new pc was made ahead"
    counted_reads.clear()
    assert session.handle(b"m%x,1" % new_pc) == b"%02x" % session.target.read_memory(new_pc, 1, 1)[0]
    assert session.handle(b"qXfer:threads:read::0,1000").startswith(b"l<?xml")
    assert counted_reads == ["m"], "only the check's own read reached the target"
    assert session.target.read_registers(1)["rip"] == new_pc


def test_a_write_before_the_read_makes_gdb_get_the_written_byte(session, counted_reads):
    pc = _step_and_stop(session)
    session.handle(b"m%x,1" % pc)
    new_pc = _step_and_stop(session)
    old = session.target.read_memory(new_pc, 1, 1)[0]
    assert session.handle(b"M%x,1:%02x" % (new_pc, old ^ 0xFF)) == b"OK"
    assert session.handle(b"m%x,1" % new_pc) == b"%02x" % (old ^ 0xFF)
    session.handle(b"M%x,1:%02x" % (new_pc, old))


def test_nothing_is_answered_ahead_that_gdb_did_not_read_at_the_last_stop(session, counted_reads):
    _step_and_stop(session)
    counted_reads.clear()
    _step_and_stop(session)
    assert counted_reads == [], "no read was asked at the stop before: none is made ahead"


def test_a_breakpoint_keeps_the_kept_reads_and_reads_never_show_it(session, counted_reads):
    """Z0/z0 change nothing a read returns (the stub hides its INT3), so
    GDB's reads at pc after it removes a breakpoint are still answered from
    the kept replies; a fresh read agrees."""
    pc = _step_and_stop(session)
    addr = pc + 0x10
    before = session.handle(b"m%x,1" % addr)
    counted_reads.clear()
    assert session.handle(b"Z0,%x,1" % addr) == b"OK"
    assert session.handle(b"m%x,1" % addr) == before
    assert counted_reads == [], "the kept reply answered"
    assert session.target.read_memory(addr, 1, 1) == bytes.fromhex(before.decode()), "the target hides its INT3"
    assert session.handle(b"z0,%x,1" % addr) == b"OK"
    assert session.handle(b"m%x,1" % addr) == before


# --- a dump's next chunk is read while GDB decodes the last one -------------------------------

CHUNK = 0x80000  # what GDB's `dump memory` asks for at a time (PacketSize 1 MiB)...
GOT = 0x7FFF0  # ... and gets (the reply's hex and framing fit the PacketSize): it asks next at A+GOT
DUMP_BASE = 0x100000


def _dump_chunk(session: Session, addr: int) -> bytes:
    """One chunk as the stub serves it: the reply, then (once it is sent) the read ahead."""
    reply = session.handle(b"m%x,%x" % (addr, CHUNK))
    session.read_ahead()
    return reply


def test_a_dumps_next_chunk_is_read_ahead_and_is_what_the_target_answers(session, counted_reads):
    from vmscope.rsp.framing import frame, hex_rle

    _dump_chunk(session, DUMP_BASE)
    assert counted_reads == ["m", "m"], "the chunk asked for, then the next one ahead"
    counted_reads.clear()
    reply = _dump_chunk(session, DUMP_BASE + GOT)
    assert counted_reads == ["m"], "the chunk came from the read ahead; only the one after it was read"
    fresh = hex_rle(session.target.read_memory(DUMP_BASE + GOT, GOT, 1))
    assert reply == fresh
    assert frame(reply) == frame(fresh), "the checksum computed ahead is the packet's"


def test_a_write_drops_the_chunk_read_ahead(session, counted_reads):
    _dump_chunk(session, DUMP_BASE)
    addr = DUMP_BASE + GOT + 5
    old = session.target.read_memory(addr, 1, 1)[0]
    assert session.handle(b"M%x,1:%02x" % (addr, old ^ 0xFF)) == b"OK"
    reply = session.handle(b"m%x,%x" % (DUMP_BASE + GOT, CHUNK))
    session.handle(b"M%x,1:%02x" % (addr, old))
    assert bytes.fromhex(reply[10:12].decode()) == bytes([old ^ 0xFF]), "the byte written, not the one read ahead"


def test_small_reads_and_stale_chunks_are_not_answered_ahead(session, counted_reads, monkeypatch):
    from vmscope.gdbserver import kept_reads

    pc = session.target.read_registers(1)["rip"]
    counted_reads.clear()
    session.handle(b"m%x,40" % pc)
    session.read_ahead()
    assert counted_reads == ["m"], "a read at pc is not a dump: nothing read ahead"
    monkeypatch.setattr(kept_reads, "READ_AHEAD_SECONDS", 0.0)
    _dump_chunk(session, DUMP_BASE)
    counted_reads.clear()
    session.handle(b"m%x,%x" % (DUMP_BASE + GOT, CHUNK))
    assert counted_reads == ["m"], "a chunk read ahead too long ago is read afresh"


# --- a kept reply is sent as a whole packet, without parsing the request ----------------------


@pytest.fixture
def kept_long(monkeypatch):
    """Kept replies stay good for the whole test (they live 2 ms; a slow CI machine takes longer)."""
    from vmscope.gdbserver import kept_reads

    monkeypatch.setattr(kept_reads, "REUSE_SECONDS", 60.0)


def test_a_kept_read_is_the_packet_the_long_way_makes_and_asks_no_target(session, counted_reads, kept_long):
    from vmscope.rsp.framing import frame

    pc = _step_and_stop(session)
    reads = (b"m%x,1" % pc, b"qXfer:threads:read::0,1000", b"g")
    assert all(session.kept_packet(p) is None for p in reads), "nothing is kept yet"
    replies = [session.handle(p) for p in reads]
    counted_reads.clear()
    assert [session.kept_packet(p) for p in reads] == [frame(r, rle=True) for r in replies]
    assert counted_reads == [], "answered from the kept replies"
    assert session.kept_packet(b"m%x,1" % (pc + 1)) is None, "a read not made before"
    assert session.kept_packet(b"vCont;c") is None and session.kept_packet(b"M%x,1:90" % pc) is None
    _step_and_stop(session)
    assert session.kept_packet(b"g") is None, "a stop drops what was kept"


@pytest.fixture
def wire(session):
    """(answer, close): send raw bytes to a GdbServer's request handling
    with ``session`` and get back everything it wrote to the socket."""
    import socket
    import threading

    from vmscope.gdbserver.transport import GdbServer
    from vmscope.rsp.framing import Endpoint

    server = GdbServer(session.target, port=0)
    stub_side, gdb_side = socket.socketpair()
    stub_side.setblocking(False)
    endpoint = Endpoint(rle_replies=True)
    endpoint.disable_acks()
    received = bytearray()

    def drain() -> None:  # GDB's side: a 1 MiB reply does not fit a socket's buffer
        while chunk := gdb_side.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def answer(data: bytes, packets: int = 1) -> bytes:
        import re
        import time

        received.clear()
        server._answer(stub_side, endpoint, session, data)
        deadline = time.monotonic() + 10
        while len(re.findall(rb"#[0-9a-f]{2}", bytes(received))) < packets:
            assert time.monotonic() < deadline, f"no reply to {data[:40]!r}"
            time.sleep(0.001)
        return bytes(received)

    yield answer
    stub_side.close()
    reader.join(5)
    gdb_side.close()
    server.listener.close()


def test_the_stub_sends_a_kept_read_byte_for_byte_as_before(session, counted_reads, wire, kept_long, monkeypatch):
    from vmscope.rsp.framing import frame

    handled = []
    handle = session.handle
    monkeypatch.setattr(session, "handle", lambda payload: handled.append(payload) or handle(payload))
    pc = _step_and_stop(session)
    handled.clear()
    for payload in (b"m%x,1" % pc, b"qXfer:threads:read::0,1000", b"g"):
        counted_reads.clear()
        first = wire(frame(payload))
        assert counted_reads == ([] if payload.startswith(b"q") else [payload[:1].decode()])
        assert handled == [payload], "the first time: parsed and handled"
        counted_reads.clear()
        handled.clear()
        assert wire(frame(payload)) == first
        assert counted_reads == [] and handled == [], f"{payload!r} again: the kept packet, sent as it is"
    two = wire(frame(b"m%x,1" % pc) + frame(b"m%x,2" % pc), packets=2)
    assert counted_reads == ["m"], "two requests in one read: the second (not kept) asked the target"
    assert two == wire(frame(b"m%x,1" % pc)) + frame(session.target.read_memory(pc, 2, 1).hex().encode(), rle=True)


def test_a_dumps_chunk_sent_from_the_read_ahead_reads_the_next_one_ahead(session, counted_reads, wire):
    from vmscope.rsp.framing import frame, hex_rle

    wire(frame(b"m%x,%x" % (DUMP_BASE, CHUNK)))
    counted_reads.clear()
    reply = wire(frame(b"m%x,%x" % (DUMP_BASE + GOT, CHUNK)))
    assert reply == frame(hex_rle(session.target.read_memory(DUMP_BASE + GOT, GOT, 1)))
    assert counted_reads == ["m", "m"], "the chunk after it was read ahead (then the check's own read)"
    counted_reads.clear()
    wire(frame(b"m%x,%x" % (DUMP_BASE + 2 * GOT, CHUNK)))
    assert counted_reads == ["m"], "the third chunk came from the read ahead too"
