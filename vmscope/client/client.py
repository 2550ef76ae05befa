"""A synchronous GDB Remote Serial Protocol client.

It speaks to any stub (vmscope's, QEMU's, gdbserver) over the same
:mod:`vmscope.rsp` framing the stub uses, and adapts to what the stub offers:
``qSupported`` features, no-ack mode, ``target.xml``, ``x`` vs ``m``,
PacketSize. Every wait has a timeout and a closed connection raises
:class:`ConnectionLost`, so a script never hangs on a dead stub.

Requests are the typed ones of :mod:`vmscope.rsp.packets` (the stub parses
the same types), encoded there; the socket, acks and handshake are
:mod:`vmscope.client.connection`'s; this module adds the order of requests
each operation needs and keeps track of the target's state: a request while
it runs raises :class:`TargetRunning` (its reply would be a stop reply), and
:meth:`Client.detach`/:meth:`Client.close` stop it first if needed, then
remove every breakpoint and watchpoint inserted and set QEMU's memory mode
back to virtual, so the next debugger finds the stub as we found it.

Typical use from a Python prompt::

    c = Client.connect("localhost:1234")
    c.registers()["rip"]; c.read_memory(0xffffffff81000000, 64)
    c.set_breakpoint(addr); c.cont()  # -> StopEvent(kind="swbreak", ...)
"""

from __future__ import annotations

import socket
import struct
import xml.etree.ElementTree as ET
from typing import Callable, Literal

from vmscope.client.connection import Connection, Features, _is_hex  # noqa: F401  (Features: public here too)
from vmscope.client.errors import (MemoryReadError, StubError, TargetExited, TargetRunning,  # noqa: F401
                                   TargetStopped, Unsupported)
from vmscope.client.tdesc import RegisterLayout, layout_from_arch, parse_target_xml
from vmscope.client.transport import BadReply, ConnectionLost, StubTimeout, open_socket  # noqa: F401  (BadReply: public here too)
from vmscope.rsp import packets as P
from vmscope.rsp.packets import parse_thread_id
from vmscope.rsp.stops import StopEvent, stop_event

PAGE = 0x1000
WatchKind = Literal["write", "read", "access"]
_WATCH_TYPE = {"write": 2, "read": 3, "access": 4}


class Client(Connection):
    """A debugger on one stub connection. Not thread-safe, except :meth:`interrupt`."""

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0, arch=None):
        self._resume_hooks: list[Callable[[], None]] = []
        self._reg_cache: dict[str, int | None] | None = None
        self.breakpoints: set[int] = set()  # software breakpoints we inserted
        self._inserted: set[tuple[int, int, int]] = set()  # every Z (type, addr, kind), removed on leaving
        # QEMU keeps its physical-memory mode across connections, so a
        # previous client may have left it on: unknown until we set it.
        self._phys_mode: bool | None = None
        self._phys_supported = True
        self.last_stop: StopEvent | None = None
        super().__init__(sock, timeout=timeout)
        # gdbserver needs a general thread before it can describe the target.
        self.request(P.SetThread("g", P.ANY_THREAD))
        self.layout = self._load_layout(arch)
        self._use_x = self.features.has("binary-upload")
        self._vcont = self._query_vcont()
        self.last_stop = self._stop_event(self.request(P.HaltReason()))

    # ------------------------------------------------------------ connection

    @classmethod
    def connect(cls, address: str | tuple[str, int], *, timeout: float = 10.0, arch=None) -> "Client":
        """Connect to ``host:port``, ``unix:/path`` or ``/path``."""
        sock = open_socket(address, timeout)
        try:
            return cls(sock, timeout=timeout, arch=arch)
        except BaseException:
            sock.close()  # a failed handshake must not leak the connection
            raise

    def close(self) -> None:
        """Close the connection, leaving the target stopped or running as
        it is, but without our breakpoints and in virtual-address mode (a
        running target is stopped for that and resumed)."""
        try:
            if self._dirty():
                was_running = self.running
                self._leave_clean()
                if was_running and not self._gone():
                    self.resume()
        except (StubError, ConnectionLost, StubTimeout):
            pass  # the stub is gone or refuses: nothing more we can undo
        finally:
            self._shut()

    def _shut(self) -> None:
        self.sock.close()
        self.running = False

    def detach(self) -> None:
        """Let the target run on without us and close the connection. Works
        whatever state the target is in (running after a :meth:`cont` that
        timed out or was interrupted with Ctrl-C included): it is stopped,
        every breakpoint and watchpoint we inserted is removed and QEMU's
        memory mode is set back to virtual before the ``D``."""
        try:
            self._leave_clean()
            if self._gone():
                raise ConnectionLost("the target has exited: nothing to detach from")
            self._send(P.Detach().encode())
            if self._recv_packet(self.timeout).startswith(b"E"):
                # QEMU's stub keeps "multiprocess" from an earlier GDB's
                # qSupported for good and then wants the pid (else E22,
                # and the guest stays stopped).
                self._send(P.Detach(pid=1).encode())
                self._recv_packet(self.timeout)
        except (StubError, ConnectionLost, StubTimeout):
            pass  # the stub is gone, refuses, or the guest would not stop: close all the same
        finally:
            self._shut()

    def _dirty(self) -> bool:
        return bool(self._phys_mode or self._inserted)

    def _gone(self) -> bool:
        return self.last_stop is not None and self.last_stop.kind in ("exited", "terminated")

    def _leave_clean(self) -> None:
        """Undo what we changed in the stub, stopping the target first if it
        runs: QEMU takes any packet to a running guest as a stop request and
        drops it, so ``Qqemu.PhyMemMode:0`` sent then is never applied and
        the next debugger reads physical memory at virtual addresses."""
        if self.running:  # a D to a running QEMU would be dropped the same way
            self.interrupt()
            self.wait(self.timeout)
        if self._gone():
            self._inserted.clear()
            return
        for ztype, addr, kind in sorted(self._inserted):
            try:
                self._z(False, ztype, addr, kind)
            except StubError:
                pass  # already gone (the stub forgot it): nothing left to undo
        self.breakpoints.clear()
        if self._phys_mode:
            try:
                self.set_physical_mode(False)
            except StubError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def on_resume(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` whenever the target is resumed (caches of guest
        state, e.g. a :class:`~vmscope.vmi.TranslationCache`, register here)."""
        self._resume_hooks.append(hook)

    def _alive(self) -> None:
        if self.last_stop is not None and self.last_stop.kind in ("exited", "terminated"):
            raise TargetExited(self.last_stop)

    def _checked(self, request: P.Request) -> bytes:
        self._alive()
        payload = request.encode()
        reply = self.request(payload)
        if reply == b"":
            raise Unsupported(payload, reply)
        if reply.startswith(b"E") and len(reply) == 3:
            raise StubError(payload, reply)
        return reply

    def _ok(self, request: P.Request) -> None:
        reply = self._checked(request)
        if reply != b"OK":
            raise StubError(request.encode(), reply)

    # ------------------------------------------------------------ what the stub offers

    def _query_vcont(self) -> set[str]:
        reply = self.request(P.VContQuery())
        if not reply.startswith(b"vCont"):
            return set()
        return {a for a in reply.decode().split(";")[1:] if a}

    def read_xfer(self, obj: str, annex: str) -> bytes:
        """A whole ``qXfer:OBJ:read:ANNEX`` object, in PacketSize pieces."""
        out = bytearray()
        chunk = max(256, self.features.packet_size - 16)
        while True:
            reply = self._checked(P.Query("Xfer", f"{obj}:read:{annex}:{len(out):x},{chunk:x}".encode()))
            out += reply[1:]
            if reply[:1] == b"l":
                return bytes(out)
            if reply[:1] != b"m":
                raise StubError(b"qXfer", reply)

    def _load_layout(self, arch) -> RegisterLayout:
        if self.features.has("qXfer:features:read"):
            try:
                return parse_target_xml(lambda annex: self.read_xfer("features", annex))
            except (StubError, ET.ParseError, ValueError):
                pass  # a description we cannot read: fall back to our tables
        if arch is None:
            from vmscope.arch.x86_64 import X86_64
            arch = X86_64
        return layout_from_arch(arch)

    @property
    def arch(self) -> str | None:
        return self.layout.arch

    # ------------------------------------------------------------ registers

    def registers(self) -> dict[str, int | None]:
        """All registers of the selected thread (``g``), cached until resume."""
        if self._reg_cache is None:
            raw = self._checked(P.ReadRegisters())
            try:
                self._reg_cache = self.layout.decode_g(_unhex_regs(raw))
            except (ValueError, IndexError, struct.error) as e:
                raise BadReply(f"the stub's register reply does not parse ({e}); it starts {raw[:40]!r}") from None
        return dict(self._reg_cache)

    def register(self, name: str) -> int:
        """One register by name. Registers outside the ``g`` packet (QEMU's
        system registers on some targets) are read with ``p``."""
        reg = self.layout[name]
        regs = self.registers()
        value = regs.get(name)
        if value is None:
            raw = self._checked(P.ReadRegister(reg.regnum))
            value = int.from_bytes(_unhex_regs(raw), "little")
            self._reg_cache[name] = value  # type: ignore[index]
        return value

    def write_register(self, name: str, value: int) -> None:
        reg = self.layout[name]
        data = (value & ((1 << reg.bitsize) - 1)).to_bytes(reg.size, "little")
        try:
            self._ok(P.WriteRegister(reg.regnum, data))
        except Unsupported:
            regs = self.registers()
            regs[name] = value
            raw = b"".join((regs.get(r.name) or 0).to_bytes(r.size, "little")
                           for r in sorted(self.layout.registers, key=lambda r: r.regnum) if r.name in regs)
            self._ok(P.WriteRegisters(raw))
        self._reg_cache = None

    # ------------------------------------------------------------ memory

    @property
    def max_read(self) -> int:
        """Largest read per packet: the reply must fit PacketSize (hex
        doubles ``m`` data; ``x`` escapes rarely but may)."""
        size = self.features.packet_size - 8
        return max(16, size // 2 if not self._use_x else size * 7 // 8)

    def set_physical_mode(self, on: bool) -> None:
        """QEMU only: make memory packets address guest-physical memory."""
        if self._phys_mode == on:
            return
        try:
            self._ok(P.Query("qemu.PhyMemMode", b"%d" % int(on), set=True))
        except Unsupported:
            self._phys_supported = False
            raise
        self._phys_mode = on

    def _memory_mode(self, physical: bool) -> None:
        if physical:
            self.set_physical_mode(True)
        elif self._phys_mode is not False and self._phys_supported:
            try:
                self.set_physical_mode(False)
            except Unsupported:
                self._phys_mode = False  # a stub without the mode reads virtual memory

    def _read_packet(self, addr: int, size: int) -> bytes:
        if self._use_x:
            # GDB 16's x: "b" then the raw (escaped) bytes; binary halves the traffic.
            reply = self.request(P.ReadMemory(addr, size, binary=True))
            if reply.startswith(b"b"):
                return reply[1:]
            if reply == b"":
                self._use_x = False  # offered but not answered: fall back to m
            else:
                raise MemoryReadError(addr, size, reply)
        reply = self.request(P.ReadMemory(addr, size))
        if (reply.startswith(b"E") and len(reply) == 3) or not reply:
            raise MemoryReadError(addr, size, reply)
        try:
            return bytes.fromhex(reply.decode())
        except ValueError:
            raise MemoryReadError(addr, size, reply) from None

    def _read_run(self, addr: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            want = min(self.max_read, size - len(out))
            data = self._read_packet(addr + len(out), want)
            if not data:
                raise MemoryReadError(addr + len(out), want, b"(empty)")
            out += data[:want]
        return bytes(out)

    def read_memory(self, addr: int, size: int, *, physical: bool = False) -> bytes:
        """``size`` bytes at ``addr``, or :class:`MemoryReadError` naming the
        first unreadable page. Reads split at PacketSize; when a chunk fails
        (QEMU fails a whole ``m`` for one unmapped byte) it is retried page by
        page so the error names the exact page."""
        data, holes = self.read_memory_partial(addr, size, physical=physical)
        if holes:
            hole_addr, hole_len = holes[0]
            raise MemoryReadError(hole_addr, hole_len)
        return data

    def read_memory_partial(self, addr: int, size: int, *, physical: bool = False,
                            fill: bytes = b"\0") -> tuple[bytes, list[tuple[int, int]]]:
        """Like :meth:`read_memory`, but unreadable pages come back as
        ``fill`` and are listed as ``(addr, length)`` holes."""
        self._alive()
        self._memory_mode(physical)
        out = bytearray()
        holes: list[tuple[int, int]] = []
        pos, end = addr, addr + size
        while pos < end:
            n = min(end - pos, self.max_read)
            try:
                out += self._read_run(pos, n)
                pos += n
                continue
            except MemoryReadError:
                pass
            stop = pos + n
            while pos < stop:  # page by page inside the failed chunk
                m = min(stop, (pos | (PAGE - 1)) + 1) - pos
                try:
                    out += self._read_run(pos, m)
                except MemoryReadError:
                    out += fill * m
                    if holes and sum(holes[-1]) == pos:
                        holes[-1] = (holes[-1][0], holes[-1][1] + m)
                    else:
                        holes.append((pos, m))
                pos += m
        return bytes(out), holes

    def write_memory(self, addr: int, data: bytes, *, physical: bool = False) -> None:
        self._memory_mode(physical)
        step = max(16, (self.features.packet_size - 32) // 2)
        for off in range(0, len(data), step):
            piece = data[off : off + step]
            self._ok(P.WriteMemory(addr + off, piece))

    # ------------------------------------------------------------ breakpoints

    def _z(self, insert: bool, ztype: int, addr: int, kind: int) -> None:
        self._ok(P.Breakpoint(insert, ztype, addr, kind))
        if insert:
            self._inserted.add((ztype, addr, kind))
        else:
            self._inserted.discard((ztype, addr, kind))

    def _bp_kind(self) -> int:
        return 4 if self.arch and "aarch64" in self.arch else 1

    def set_breakpoint(self, addr: int, *, hardware: bool = False, kind: int | None = None) -> None:
        self._z(True, 1 if hardware else 0, addr, kind or self._bp_kind())
        if not hardware:
            self.breakpoints.add(addr)

    def remove_breakpoint(self, addr: int, *, hardware: bool = False, kind: int | None = None) -> None:
        self._z(False, 1 if hardware else 0, addr, kind or self._bp_kind())
        if not hardware:
            self.breakpoints.discard(addr)

    def set_watchpoint(self, addr: int, length: int = 8, kind: WatchKind = "write") -> None:
        self._z(True, _WATCH_TYPE[kind], addr, length)

    def remove_watchpoint(self, addr: int, length: int = 8, kind: WatchKind = "write") -> None:
        self._z(False, _WATCH_TYPE[kind], addr, length)

    # ------------------------------------------------------------ execution

    def _resumed(self) -> None:
        self._reg_cache = None
        self.running = True
        for hook in self._resume_hooks:
            hook()

    def resume(self, *, step: bool = False, tid: int | None = None) -> None:
        """Start the target and return at once; :meth:`wait` collects the stop."""
        action = "s" if step else "c"
        if step and tid is None and self.last_stop is not None:
            tid = self.last_stop.tid  # step the thread that stopped, not every vCPU
        if self.running:
            raise TargetRunning(action.encode())
        if self._vcont and action in self._vcont:
            request = P.Resume.simple(step, tid)
        else:
            if tid is not None:
                self._ok(P.SetThread("c", tid))
            request = P.Resume(((action, None, P.ALL_THREADS),), legacy=True)
        self._resumed()
        self._send(request.encode())

    def wait(self, timeout: float | None = None) -> StopEvent:
        """Block until the target stops (``None``: wait for ever, still
        raising :class:`ConnectionLost` if the stub goes away). Raises
        :class:`TargetStopped` at once if it is not running: no stop would
        ever come."""
        if not self.running:
            raise TargetStopped()
        while True:
            reply = self._recv_packet(timeout, "the target to stop")
            if self._console_text(reply):
                continue
            self.running = False
            self.last_stop = self._stop_event(reply)
            return self.last_stop

    def _pc_name(self) -> str:
        for name in ("rip", "pc", "eip"):
            if name in self.layout:
                return name
        raise Unsupported(P.ReadRegisters().encode(), b"no program counter in the register layout")

    def _step_off_breakpoint(self, tid: int | None) -> StopEvent | None:
        """Like GDB: a thread sitting on one of our software breakpoints is
        stepped with that breakpoint lifted, else it would hit it again at
        once (gdbserver does not step over ``Z0`` breakpoints itself)."""
        if not self.breakpoints:
            return None
        pc = self.register(self._pc_name())
        if pc not in self.breakpoints:
            return None
        self.remove_breakpoint(pc)
        self.resume(step=True, tid=tid)
        stop = self.wait(self.timeout)  # if this raises, the target may still run: no Z0 now
        self.set_breakpoint(pc)
        return stop

    def cont(self, timeout: float | None = None) -> StopEvent:
        """Continue until the next stop (stepping off a breakpoint first)."""
        stop = self._step_off_breakpoint(None)
        if stop is not None and (stop.kind != "signal" or stop.signal != 5):
            return stop  # the step itself ended somewhere noteworthy
        self.resume()
        return self.wait(timeout)

    def step(self, tid: int | None = None, timeout: float | None = None) -> StopEvent:
        """Execute one instruction of ``tid`` (default: the current thread)."""
        stop = self._step_off_breakpoint(tid)
        if stop is not None:
            return stop
        self.resume(step=True, tid=tid)
        return self.wait(timeout if timeout is not None else self.timeout)

    def halt(self, timeout: float | None = None) -> StopEvent:
        """Stop a running target; a stopped one is left alone (its last stop
        is returned: a 0x03 to a stopped stub gets no reply to wait for)."""
        if not self.running and self.last_stop is not None:
            return self.last_stop
        self.interrupt()
        return self.wait(timeout if timeout is not None else self.timeout)

    def _stop_event(self, payload: bytes) -> StopEvent:
        if payload.startswith(b"E") and len(payload) == 3:
            raise StubError(P.HaltReason().encode(), payload)
        return stop_event(payload)

    # ------------------------------------------------------------ threads

    def threads(self) -> list[int]:
        tids: list[int] = []
        reply = self._checked(P.Query("fThreadInfo"))
        while reply.startswith(b"m"):
            tids += [parse_thread_id(t) for t in reply[1:].split(b",") if t]
            reply = self._checked(P.Query("sThreadInfo"))
        return tids

    def select_thread(self, tid: int) -> None:
        """Make ``tid`` the thread for register and memory access (``Hg``)."""
        self._ok(P.SetThread("g", tid))
        self._reg_cache = None

    def thread_name(self, tid: int) -> str | None:
        try:
            reply = self._checked(P.Query("ThreadExtraInfo", P.format_thread_id(tid).encode()))
        except StubError:
            return None
        return bytes.fromhex(reply.decode()).decode(errors="replace")

    # ------------------------------------------------------------ monitor

    def monitor(self, command: str) -> str:
        """``monitor COMMAND`` (``qRcmd``); returns the text the stub printed."""
        start = len(self.console)
        reply = self.request(P.Query("Rcmd", command.encode().hex().encode()))
        if reply == b"":
            raise Unsupported(b"qRcmd", reply)
        if reply.startswith(b"E") and len(reply) == 3:
            raise StubError(f"monitor {command}".encode(), reply)
        text = "".join(self.console[start:])
        del self.console[start:]
        if reply != b"OK" and _is_hex(reply):
            text += bytes.fromhex(reply.decode()).decode(errors="replace")
        return text


def _unhex_regs(raw: bytes) -> bytes:
    """Register hex with ``xx`` for unavailable bytes (read as zero)."""
    return bytes.fromhex(raw.replace(b"x", b"0").decode())
