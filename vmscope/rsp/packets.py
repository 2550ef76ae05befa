"""Typed RSP requests and reply formatting, without I/O.

:func:`parse_request` turns a packet payload from GDB into one of the request
dataclasses below (or raises :class:`ProtocolError` for a malformed one and
returns :class:`Unknown` for one we do not implement). Every request also
``encode()``s itself back to a payload, so the client sends the very types
the stub parses (``parse_request(r.encode()) == r``; a property test holds
the two directions together). The reply helpers build payloads; framing is
:mod:`vmscope.rsp.framing`'s job. The client side parses replies with
``parse_stop_reply`` and friends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Union


class ProtocolError(ValueError):
    """A packet whose syntax is wrong (answered with ``E16``: EINVAL)."""


# --- thread ids --------------------------------------------------------------

ALL_THREADS = -1
ANY_THREAD = 0


def parse_thread_id(text: bytes) -> int:
    """``1f`` / ``-1`` / ``0`` / ``p1.2`` (multiprocess form) -> tid."""
    if text.startswith(b"p"):
        _, _, text = text[1:].partition(b".")
        if not text:
            return ALL_THREADS
    if text == b"-1":
        return ALL_THREADS
    return _hex(text, "thread id")


def format_thread_id(tid: int) -> str:
    return "-1" if tid == ALL_THREADS else f"{tid:x}"


def _hex(text: bytes, what: str) -> int:
    try:
        if not text or text.startswith((b"-", b"+")) or text.strip() != text:
            raise ValueError
        return int(text, 16)
    except ValueError:
        raise ProtocolError(f"bad {what}: {text[:32]!r}") from None


def _addr_len(text: bytes) -> tuple[int, int]:
    addr, sep, length = text.partition(b",")
    if not sep:
        raise ProtocolError(f"expected ADDR,LENGTH, got {text[:32]!r}")
    return _hex(addr, "address"), _hex(length, "length")


def _unhex(text: bytes, what: str = "hex data") -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"bad {what}: {text[:32]!r}") from None


# --- requests -------------------------------------------------------------------


@dataclass(frozen=True)
class HaltReason:  # ?
    def encode(self) -> bytes:
        return b"?"


@dataclass(frozen=True)
class ReadRegisters:  # g
    def encode(self) -> bytes:
        return b"g"


@dataclass(frozen=True)
class WriteRegisters:  # G
    data: bytes

    def encode(self) -> bytes:
        return b"G" + self.data.hex().encode()


@dataclass(frozen=True)
class ReadRegister:  # p n
    regnum: int

    def encode(self) -> bytes:
        return b"p%x" % self.regnum


@dataclass(frozen=True)
class WriteRegister:  # P n=v
    regnum: int
    data: bytes

    def encode(self) -> bytes:
        return b"P%x=%s" % (self.regnum, self.data.hex().encode())


@dataclass(frozen=True)
class ReadMemory:  # m addr,len / x addr,len
    addr: int
    length: int
    binary: bool = False

    def encode(self) -> bytes:
        return b"%s%x,%x" % (b"x" if self.binary else b"m", self.addr, self.length)


@dataclass(frozen=True)
class WriteMemory:  # M addr,len:hex / X addr,len:bin
    addr: int
    data: bytes
    binary: bool = field(default=False, compare=False)  # how it travels, not what it asks

    def encode(self) -> bytes:
        """``M`` (hex) or, with ``binary``, ``X`` (raw bytes; framing escapes them)."""
        if self.binary:
            return b"X%x,%x:%s" % (self.addr, len(self.data), self.data)
        return b"M%x,%x:%s" % (self.addr, len(self.data), self.data.hex().encode())


@dataclass(frozen=True)
class Resume:
    """``c``/``s``/``C``/``S``/``vCont``: per-thread actions.

    ``actions`` is a list of ``(kind, signal, tid)`` with kind ``"c"``,
    ``"s"`` or ``"t"``; ``tid`` ``ALL_THREADS`` means "every thread not named
    before", as in vCont. ``addr`` (old-style packets only) sets the pc of
    the selected thread first.
    """

    actions: tuple[tuple[str, int | None, int], ...]
    addr: int | None = None
    legacy: bool = False  # c/s/C/S: applies to the Hc thread

    def encode(self) -> bytes:
        if self.legacy:
            (kind, sig, _), = self.actions
            head = kind.encode() if sig is None else b"%s%02x" % (kind.upper().encode(), sig)
            if self.addr is None:
                return head
            return head + (b";%x" if sig is not None else b"%x") % self.addr
        parts = []
        for kind, sig, tid in self.actions:
            part = kind if sig is None else f"{kind.upper()}{sig:02x}"
            parts.append(part if tid == ALL_THREADS else f"{part}:{format_thread_id(tid)}")
        return ("vCont;" + ";".join(parts)).encode()

    @classmethod
    def simple(cls, step: bool = False, tid: int | None = None) -> "Resume":
        """``vCont;c`` / ``vCont;s:TID``: one action for one thread or all."""
        return cls((("s" if step else "c", None, ALL_THREADS if tid is None else tid),))


@dataclass(frozen=True)
class VContQuery:  # vCont?
    def encode(self) -> bytes:
        return b"vCont?"


@dataclass(frozen=True)
class SetThread:  # Hg tid / Hc tid
    op: str
    tid: int

    def encode(self) -> bytes:
        return b"H%s%s" % (self.op.encode(), format_thread_id(self.tid).encode())


@dataclass(frozen=True)
class ThreadAlive:  # T tid
    tid: int

    def encode(self) -> bytes:
        return b"T" + format_thread_id(self.tid).encode()


@dataclass(frozen=True)
class Breakpoint:  # Z/z type,addr,kind
    insert: bool
    type: int
    addr: int
    kind: int

    def encode(self) -> bytes:
        return b"%s%x,%x,%x" % (b"Z" if self.insert else b"z", self.type, self.addr, self.kind)


@dataclass(frozen=True)
class Query:
    """``qName[:args]`` / ``QName[:args]``; ``args`` is the text after the
    first ``:`` (or ``,`` for qRcmd/qThreadExtraInfo)."""

    name: str
    args: bytes = b""
    set: bool = False  # Q packet

    def encode(self) -> bytes:
        head = (b"Q" if self.set else b"q") + self.name.encode("ascii")
        if not self.args:
            return head
        return head + (b"," if self.name in _COMMA_QUERIES else b":") + self.args


@dataclass(frozen=True)
class Detach:  # D / D;pid
    """``pid`` is for stubs in multiprocess mode (QEMU keeps it on once an
    earlier GDB asked for it and then refuses a bare ``D``)."""

    pid: int | None = None

    def encode(self) -> bytes:
        return b"D" if self.pid is None else b"D;%x" % self.pid


@dataclass(frozen=True)
class Kill:  # k / vKill
    vkill: bool = False

    def encode(self) -> bytes:
        return b"vKill;1" if self.vkill else b"k"


@dataclass(frozen=True)
class HostIo:
    """``vFile:op:arg,arg...``: GDB's file I/O on the target's side
    (``target:`` paths). ``args`` are raw (open's file name is hex)."""

    op: str
    args: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        return b"vFile:" + self.op.encode("ascii") + (b":" + b",".join(self.args) if self.args else b"")


@dataclass(frozen=True)
class Unknown:
    payload: bytes

    def encode(self) -> bytes:
        return self.payload


Request = Union[
    HaltReason, ReadRegisters, WriteRegisters, ReadRegister, WriteRegister, ReadMemory, WriteMemory,
    Resume, VContQuery, SetThread, ThreadAlive, Breakpoint, Query, Detach, Kill, HostIo, Unknown,
]


def parse_request(payload: bytes) -> Request:
    """Parse one packet payload from a debugger."""
    if not payload:
        return Unknown(payload)
    cmd, rest = payload[:1], payload[1:]
    if cmd == b"?":
        return HaltReason()
    if cmd == b"g":
        return ReadRegisters()
    if cmd == b"G":
        return WriteRegisters(_unhex(rest, "register data"))
    if cmd == b"p":
        return ReadRegister(_hex(rest, "register number"))
    if cmd == b"P":
        num, sep, val = rest.partition(b"=")
        if not sep:
            raise ProtocolError("expected P n=value")
        return WriteRegister(_hex(num, "register number"), _unhex(val, "register value"))
    if cmd == b"m":
        return ReadMemory(*_addr_len(rest))
    if cmd == b"x":
        addr, length = _addr_len(rest)
        return ReadMemory(addr, length, binary=True)
    if cmd in (b"M", b"X"):
        head, sep, data = rest.partition(b":")
        if not sep:
            raise ProtocolError(f"expected {cmd.decode()} addr,length:data")
        addr, length = _addr_len(head)
        if cmd == b"M":
            data = _unhex(data, "memory data")
        if len(data) != length:
            raise ProtocolError(f"length {length} does not match {len(data)} data bytes")
        return WriteMemory(addr, data, binary=cmd == b"X")
    if cmd in (b"c", b"s"):
        addr = _hex(rest, "address") if rest else None
        return Resume(((cmd.decode(), None, ALL_THREADS),), addr, legacy=True)
    if cmd in (b"C", b"S"):
        sig, _, addr = rest.partition(b";")
        return Resume(
            ((cmd.decode().lower(), _hex(sig, "signal"), ALL_THREADS),),
            _hex(addr, "address") if addr else None,
            legacy=True,
        )
    if cmd == b"H":
        if not rest[:1] or rest[:1] not in b"gcm":
            raise ProtocolError(f"bad H packet {payload[:32]!r}")
        return SetThread(rest[:1].decode(), parse_thread_id(rest[1:]))
    if cmd == b"T":
        return ThreadAlive(parse_thread_id(rest))
    if cmd in (b"Z", b"z"):
        parts = rest.split(b";")[0].split(b",")
        if len(parts) != 3:
            raise ProtocolError(f"expected {cmd.decode()}type,addr,kind")
        return Breakpoint(cmd == b"Z", _hex(parts[0], "type"), _hex(parts[1], "address"), _hex(parts[2], "kind"))
    if cmd == b"D":
        _, sep, pid = rest.partition(b";")
        return Detach(_hex(pid, "process id") if sep and pid else None)
    if cmd == b"k":
        return Kill()
    if cmd in (b"q", b"Q"):
        return _parse_query(payload)
    if cmd == b"v":
        return _parse_v(payload)
    return Unknown(payload)


#: queries whose arguments follow a ',' (qRcmd,HEX and qThreadExtraInfo,ID), not a ':'
_COMMA_QUERIES = ("Rcmd", "ThreadExtraInfo")


def _parse_query(payload: bytes) -> Query:
    text = payload[1:]
    for name in (b"Rcmd", b"ThreadExtraInfo", b"Xfer", b"Supported", b"Symbol", b"Attached"):
        if text.startswith(name) and text[len(name) : len(name) + 1] in (b",", b":", b""):
            return Query(name.decode(), text[len(name) + 1 :], set=payload[:1] == b"Q")
    name, _, args = text.partition(b":")
    try:
        return Query(name.decode("ascii"), args, set=payload[:1] == b"Q")
    except UnicodeDecodeError:
        raise ProtocolError("non-ASCII query name") from None


def _parse_v(payload: bytes) -> Request:
    if payload == b"vCont?":
        return VContQuery()
    if payload.startswith(b"vCont;"):
        actions = []
        for item in payload[6:].split(b";"):
            act, _, tid_text = item.partition(b":")
            if not act or act[:1] not in b"cCsSt":
                raise ProtocolError(f"bad vCont action {item[:32]!r}")
            kind = act[:1].decode().lower()
            sig = _hex(act[1:], "signal") if act[:1] in (b"C", b"S") else None
            if act[:1] in (b"c", b"s", b"t") and len(act) != 1:
                raise ProtocolError(f"bad vCont action {item[:32]!r}")
            tid = parse_thread_id(tid_text) if tid_text else ALL_THREADS
            actions.append((kind, sig, tid))
        return Resume(tuple(actions))
    if payload.startswith(b"vKill"):
        return Kill(vkill=True)
    if payload.startswith(b"vFile:"):
        op, _, args = payload[6:].partition(b":")
        try:
            return HostIo(op.decode("ascii"), tuple(args.split(b",")) if args else ())
        except UnicodeDecodeError:
            raise ProtocolError("non-ASCII vFile operation") from None
    return Unknown(payload)


# --- replies ----------------------------------------------------------------------

OK = b"OK"
EMPTY = b""


def fileio_reply(result: int, attachment: bytes | None = None, errno: int | None = None) -> bytes:
    """``F result[,errno][;attachment]`` for vFile (GDB's File-I/O numbers)."""
    head = (f"F{result:x}" if result >= 0 else f"F-{-result:x}") + (f",{errno:x}" if errno is not None else "")
    return head.encode() + (b";" + attachment if attachment is not None else b"")


def error(errno: int) -> bytes:
    """``Exx``: GDB shows xx; the two hex digits carry an errno value."""
    return b"E%02x" % (errno & 0xFF)


def hexbytes(data: bytes) -> bytes:
    return data.hex().encode()


def stop_reply(
    signal: int,
    tid: int | None = None,
    registers: Iterable[tuple[int, bytes]] = (),
    reason: str | None = None,
    addr: int | None = None,
) -> bytes:
    """A ``T`` stop reply: signal, expedited registers, thread, stop reason.

    ``reason`` is ``swbreak``/``hwbreak`` (no value) or ``watch``/``rwatch``/
    ``awatch`` (with the data address).
    """
    parts = [b"T%02x" % (signal & 0xFF)]
    for num, raw in registers:
        parts.append(b"%02x:%s;" % (num, raw.hex().encode()))
    if tid is not None:
        parts.append(b"thread:%s;" % format_thread_id(tid).encode())
    if reason in ("swbreak", "hwbreak"):
        parts.append(reason.encode() + b":;")
    elif reason in ("watch", "rwatch", "awatch"):
        parts.append(b"%s:%x;" % (reason.encode(), addr or 0))
    return b"".join(parts)


def exit_reply(code: int) -> bytes:
    return b"W%02x" % (code & 0xFF)


def terminated_reply(signal: int) -> bytes:
    return b"X%02x" % (signal & 0xFF)


def console_output(text: str) -> bytes:
    """An ``O`` packet: text GDB prints while the target runs."""
    return b"O" + text.encode().hex().encode()


# --- the client side ----------------------------------------------------------------


@dataclass(frozen=True)
class StopReply:
    """A parsed ``S``/``T``/``W``/``X`` reply."""

    kind: str  # "signal" | "exited" | "terminated"
    signal: int = 0
    code: int = 0
    tid: int | None = None
    registers: dict[int, bytes] = field(default_factory=dict)
    reason: str | None = None
    addr: int | None = None
    extra: dict[str, bytes] = field(default_factory=dict)


def parse_stop_reply(payload: bytes) -> StopReply:
    if not payload:
        raise ProtocolError("empty stop reply")
    kind = payload[:1]
    if kind in (b"W", b"X"):
        value = _hex(payload[1:3], "exit status")
        return StopReply("exited" if kind == b"W" else "terminated", signal=value if kind == b"X" else 0,
                         code=value if kind == b"W" else 0)
    if kind == b"S":
        return StopReply("signal", signal=_hex(payload[1:3], "signal"))
    if kind != b"T":
        raise ProtocolError(f"not a stop reply: {payload[:32]!r}")
    sig = _hex(payload[1:3], "signal")
    regs: dict[int, bytes] = {}
    extra: dict[str, bytes] = {}
    tid = reason = addr = None
    for item in payload[3:].split(b";"):
        if not item:
            continue
        key, _, value = item.partition(b":")
        try:
            num = int(key, 16)
        except ValueError:
            num = None
        if num is not None and key.strip() == key:
            regs[num] = _unhex(value, "register value")
        elif key == b"thread":
            tid = parse_thread_id(value)
        elif key in (b"swbreak", b"hwbreak"):
            reason = key.decode()
        elif key in (b"watch", b"rwatch", b"awatch"):
            reason, addr = key.decode(), _hex(value, "watch address")
        else:
            extra[key.decode(errors="replace")] = value
    return StopReply("signal", signal=sig, tid=tid, registers=regs, reason=reason, addr=addr, extra=extra)
