"""One debugger session: packets from GDB in, calls on a Target, replies out.

The session does no I/O of its own (the transport feeds it payloads and
sends what it returns), so protocol behaviour is testable with plain bytes
and any Target. What it answers is derived from the target's capabilities
(:mod:`vmscope.gdbserver.target`), never from fixed lists.

Guarantees the transport relies on:

- :meth:`Session.handle` never raises: a target error becomes ``Exx``, a
  malformed packet ``E16`` (EINVAL), an unknown one the empty reply. Any
  other exception is a bug: it is logged at ERROR with its traceback,
  counted in :attr:`Session.internal_errors` and answered ``E05``, or, with
  ``strict=True`` (the tests' mode), raised, so a fuzzer sees it.
- Every breakpoint and watchpoint GDB inserted is remembered, so
  :meth:`Session.cleanup` can restore the guest whatever way the debugger
  leaves (``D``, ``k``, a closed socket).
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from typing import Callable

from vmscope.gdbserver.kept_reads import REUSABLE_READS, KeptReads
from vmscope.gdbserver.target import (
    HwBreakpoints,
    MonitorCommands,
    PhysicalMemory,
    ResumeAction,
    ResumeActions,
    StopEvent,
    SwBreakpoints,
    Target,
    TargetError,
    TargetFiles,
    ThreadNames,
    Watchpoints,
)
from vmscope.rsp import packets as P
from vmscope.rsp.framing import Encoded, hex_rle

log = logging.getLogger("vmscope.gdbserver")

#: Our PacketSize: big, so GDB reads memory in 512 KiB chunks per round trip.
PACKET_SIZE = 0x100000
_MAX_MEMORY = (PACKET_SIZE - 32) // 2

_WATCH_KINDS = {2: "write", 3: "read", 4: "access"}

# GDB's File-I/O errno values (protocol constants, not the host's)
FILEIO_ENOENT, FILEIO_EIO, FILEIO_EBADF, FILEIO_EACCES, FILEIO_EINVAL, FILEIO_ENOSYS = 2, 5, 9, 13, 22, 88
_S_IFREG = 0o100000


class Session:
    def __init__(self, target: Target, *, on_output: Callable[[str], None] | None = None,
                 strict: bool = False) -> None:
        self.target = target
        self.strict = strict  # re-raise internal errors instead of answering E05
        self.internal_errors = 0
        self.arch = target.arch
        self.running = False
        self.closed = False  # the transport should close the connection
        self.killed = False
        self.noack_pending = False  # the transport must stop acking after this reply
        self.binary_upload = False  # GDB >= 16 "x" replies start with 'b'
        self.g_thread = 0
        self.c_thread = 0
        # Thread ids and the qXfer:threads document, cached: gdb asks for the
        # thread list at every stop (update_thread_list in normal_stop), and
        # every packet naming a thread checks it. vCPUs only appear or come
        # online while the guest runs, so the cache is refreshed per stop.
        self._threads: tuple[int, ...] = tuple(target.threads())
        self._threads_doc: tuple[tuple, bytes] | None = None
        self.current = self._threads[0]
        # (register number, name, bit mask, size) of the stop reply's registers
        self._expedited = [
            (self.arch.index[name], name, (1 << self.arch.register(name).bitsize) - 1, self.arch.register(name).size)
            for name in self.arch.expedited
        ]
        self.inserted: set[tuple[int, int, int]] = set()  # (Z type, addr, kind)
        self.last_stop: StopEvent | None = None
        self._on_output = on_output
        self._files: dict[int, bytes] = {}  # vFile descriptors -> contents
        # QEMU's physical-memory mode (Qqemu.PhyMemMode:1): m/M address
        # guest-physical memory. Clients written for QEMU's stub (vmscope
        # inspect over RSP, Stackdb-style tools) read the guest this way;
        # per connection here, so no later debugger inherits it (QEMU keeps it).
        self.phys_mode = False
        # Replies to reads, kept while the guest stays stopped, and made ahead (handle, prefetch)
        self.kept = KeptReads()

    # --- entry points ------------------------------------------------------

    def handle(self, payload: bytes) -> bytes | None:
        """The reply payload, or None when the target is now running (the
        reply is the stop reply from :meth:`on_stop`) or none is due.

        A read GDB repeats within one stop is answered with the reply it
        got REUSE_SECONDS ago at most, and the reads GDB makes after every
        stop are answered ahead (:meth:`prefetch`); what may be kept and
        when it goes: :mod:`vmscope.gdbserver.kept_reads`."""
        if not payload.startswith(REUSABLE_READS):
            self.kept.other_request(payload)
            reply = self._handle(payload)
            if self.running:
                self.kept.resumed(payload)
            return reply
        self.kept.read_asked(payload)
        return self._read(payload)

    def kept_packet(self, payload: bytes) -> bytes | None:
        """The whole packet answering the read ``payload`` from the kept
        replies, or None (then :meth:`handle` it). What :meth:`handle`
        would answer, framed as the stub sends it; the transport sends it
        without parsing the request (docs/performance.md, item 14)."""
        if not payload.startswith(REUSABLE_READS):
            return None
        self.kept.read_asked(payload)
        return self.kept.packet(payload, time.monotonic())

    def _read(self, payload: bytes) -> bytes | None:
        """A read: the kept reply if there is one, else the target's, kept."""
        now = time.monotonic()
        kept = self.kept.reply(payload, now)
        if kept is not None:
            return kept
        reply = self._handle(payload)
        if reply is not None and not self.running:
            self.kept.keep(payload, reply, now)
        return reply

    def _handle(self, payload: bytes) -> bytes | None:
        try:
            req = P.parse_request(payload)
            if self.running and not isinstance(req, (P.Query, P.Kill, P.Detach)):
                return P.error(errno.EBUSY)
            return self._dispatch(req)
        except P.ProtocolError as e:
            log.debug("malformed packet %r: %s", payload[:64], e)
            return P.error(errno.EINVAL)
        except TargetError as e:
            log.debug("target error for %r: %s", payload[:64], e)
            return P.error(e.errno)
        except Exception:  # a bug in a target must not kill the stub
            log.exception("internal error handling %r", payload[:64])
            self.internal_errors += 1
            if self.strict:
                raise
            return P.error(errno.EIO)

    def interrupt(self) -> None:
        """The 0x03 byte arrived."""
        if self.running:
            self.target.interrupt()

    def on_stop(self, event: StopEvent) -> bytes:
        """The target stopped: the stop reply to send."""
        self.running = False
        self.kept.forget()
        if event.kind == "exited":
            self.closed = True
            return P.exit_reply(event.code)
        if event.kind == "terminated":
            self.closed = True
            return P.terminated_reply(event.signal)
        self._threads = tuple(self.target.threads())
        self.current = event.tid
        self.last_stop = event
        self.g_thread = self.c_thread = 0
        reply, pc = self._stop_reply(event)
        self.kept.stopped(event.kind, event.signal, pc)
        return reply

    def prefetch(self) -> None:
        """Answer ahead the reads GDB is expected to send after the stop
        just reported (:meth:`KeptReads.stopped`), into the kept replies.
        Call it once the stop reply is on its way: GDB reads it meanwhile."""
        for payload in self.kept.take_predicted():
            if self.running or self.closed:
                return
            self._read(payload)
            self.kept.packet(payload, time.monotonic())  # framed now too, while GDB reads the stop reply

    def read_ahead(self) -> None:
        """If GDB is dumping memory (a read of a dump's chunk size), read
        the next chunk now, ready with its checksum, into the kept replies.
        Call it once the reply to the last read is sent: GDB decodes it
        meanwhile (2-3 ms for a 512 KiB chunk on this machine), so on two
        CPUs the next reply costs GDB only its own share
        (docs/performance.md). Memory reads have no side effects on any
        vmscope target (RAM only, never a device), so a chunk GDB does not
        ask for costs only the time."""
        payload = self.kept.next_chunk()
        if payload is None or self.running or self.closed:
            return
        reply = self._handle(payload)
        following = self.kept.next_chunk()  # set by the read just made, when it got a whole chunk
        if isinstance(reply, Encoded) and not self.running:
            self.kept.keep_ahead(payload, reply.with_checksum(), time.monotonic(), following)

    def cleanup(self) -> None:
        """Remove every breakpoint and watchpoint GDB left inserted. The
        target must be stopped."""
        for ztype, addr, kind in sorted(self.inserted):
            try:
                self._remove(ztype, addr, kind)
            except Exception:
                log.exception("could not remove Z%d at %#x", ztype, addr)
        self.inserted.clear()

    # --- helpers -----------------------------------------------------------

    def _tid(self, selected: int) -> int:
        threads = self._threads
        if selected in (P.ANY_THREAD, P.ALL_THREADS):
            return self.current if self.current in threads else threads[0]
        if selected not in threads:
            raise TargetError(f"no thread {selected}", errno.ESRCH)
        return selected

    def _stop_reply(self, event: StopEvent) -> tuple[bytes, int | None]:
        """The stop reply, and the pc it reports (None if the target gave none)."""
        # The registers gdb reads next (pc, sp, fp) ride in the reply, so a
        # stop costs gdb no 'g' or 'p' round trip.
        regs = self.target.stop_registers(event.tid, self.arch.expedited)
        expedited = [
            (num, (regs.get(name, 0) & mask).to_bytes(size, "little")) for num, name, mask, size in self._expedited
        ]
        reason = event.kind if event.kind in ("swbreak", "hwbreak", "watch", "rwatch", "awatch") else None
        return P.stop_reply(event.signal, event.tid, expedited, reason, event.addr), regs.get(self.arch.pc)

    # --- dispatch ----------------------------------------------------------

    def _dispatch(self, req: P.Request) -> bytes | None:
        t = self.target
        if isinstance(req, P.HaltReason):
            if self.last_stop is None:
                self.last_stop = t.initial_stop()
                self.current = self.last_stop.tid
            return self._stop_reply(self.last_stop)[0]
        if isinstance(req, P.ReadRegisters):
            tid = self._tid(self.g_thread)
            return P.hexbytes(self.arch.encode_g(t.read_registers(tid)))
        if isinstance(req, P.WriteRegisters):
            t.write_registers(self._tid(self.g_thread), self.arch.decode_g(req.data))
            return P.OK
        if isinstance(req, P.ReadRegister):
            if req.regnum >= len(self.arch.registers):
                return P.error(errno.EINVAL)
            name = self.arch.registers[req.regnum].name
            value = t.read_registers(self._tid(self.g_thread)).get(name, 0)
            return P.hexbytes(self.arch.encode_register(name, value))
        if isinstance(req, P.WriteRegister):
            if req.regnum >= len(self.arch.registers):
                return P.error(errno.EINVAL)
            name = self.arch.registers[req.regnum].name
            value = self.arch.decode_register(name, req.data) if len(req.data) == self.arch.registers[req.regnum].size \
                else None
            if value is None:
                raise P.ProtocolError(f"register {name} takes {self.arch.registers[req.regnum].size} bytes")
            t.write_registers(self._tid(self.g_thread), {name: value})
            return P.OK
        if isinstance(req, P.ReadMemory):
            return self._read_memory(req)
        if isinstance(req, P.WriteMemory):
            if req.data and self.phys_mode:
                t.write_physical(req.addr, req.data)
            elif req.data:
                t.write_memory(req.addr, req.data, self._tid(self.g_thread))
            return P.OK
        if isinstance(req, P.Resume):
            return self._resume(req)
        if isinstance(req, P.VContQuery):
            return b"vCont;c;C;s;S;t"
        if isinstance(req, P.SetThread):
            tid = req.tid if req.tid in (P.ANY_THREAD, P.ALL_THREADS) else self._tid(req.tid)
            if req.op == "c":
                self.c_thread = tid
            else:
                self.g_thread = tid
            return P.OK
        if isinstance(req, P.ThreadAlive):
            self._tid(req.tid)
            return P.OK
        if isinstance(req, P.Breakpoint):
            return self._breakpoint(req)
        if isinstance(req, P.Query):
            return self._query(req)
        if isinstance(req, P.HostIo):
            return self._host_io(req)
        if isinstance(req, P.Detach):
            if self.running:
                return P.error(errno.EBUSY)
            self.cleanup()
            t.detach()
            self.closed = True
            return P.OK
        if isinstance(req, P.Kill):
            t.kill()
            self.closed = self.killed = True
            # GDB sends "k" and reads no reply; LLDB waits for one. QEMU's
            # stub answers "W00" (the guest is gone, status 0): so do we.
            return P.OK if req.vkill else P.exit_reply(0)
        return P.EMPTY

    def _read_memory(self, req: P.ReadMemory) -> bytes:
        length = min(req.length, _MAX_MEMORY)
        if length == 0:
            return (b"b" if self.binary_upload else P.OK) if req.binary else P.EMPTY
        if self.phys_mode:
            data = self.target.read_physical(req.addr, length)
        else:
            data = self.target.read_memory(req.addr, length, self._tid(self.g_thread))
        if not req.binary:
            self.kept.memory_read(req.addr, req.length, len(data))  # a dump's chunk: the next is read ahead
        if req.binary:
            return (b"b" + data) if self.binary_upload else data
        return hex_rle(data)  # framed as is: hex and run-length encoded in one pass

    def _resume(self, req: P.Resume) -> bytes | None:
        threads = self._threads
        actions = ResumeActions()
        if req.legacy:
            kind, sig, _ = req.actions[0]
            tid = self._tid(self.c_thread)
            action = ResumeAction("step" if kind == "s" else "continue", sig)
            if kind == "s":
                actions.per_thread[tid] = action
            else:
                actions.default = action
            if req.addr is not None:
                self.target.write_registers(tid, {self.arch.pc: req.addr})
        else:
            for kind, sig, tid in req.actions:
                action = None if kind == "t" else ResumeAction("step" if kind == "s" else "continue", sig)
                if tid == P.ALL_THREADS:
                    if actions.default is None and action is not None:
                        actions.default = action
                    continue
                if tid == P.ANY_THREAD:
                    tid = self.current
                if tid not in threads:
                    raise TargetError(f"vCont names unknown thread {tid}", errno.ESRCH)
                if tid not in actions.per_thread and action is not None:
                    actions.per_thread[tid] = action
        if not actions.per_thread and actions.default is None:
            return P.OK  # nothing to run
        if not actions.per_thread and actions.default.kind == "step":
            # "vCont;s" names no thread: step the current one (as QEMU does);
            # stepping every vCPU at once has no single stop to report.
            actions.per_thread[self._tid(self.c_thread)] = actions.default
            actions.default = None
        self.running = True
        try:
            self.target.resume(actions)
        except BaseException:
            self.running = False
            raise
        return None

    def _host_io(self, req: P.HostIo) -> bytes:
        """vFile: read-only files the target makes (``target:`` paths in
        GDB). Only open/pread/fstat/close are served; the rest says ENOSYS."""
        if not isinstance(self.target, TargetFiles):
            return P.EMPTY  # GDB: "remote target does not support file transfer"
        op, args = req.op, req.args
        if op == "setfs":
            return P.fileio_reply(0)
        if op == "open":
            if len(args) != 3:
                raise P.ProtocolError("vFile:open takes name,flags,mode")
            path = P._unhex(args[0], "file name").decode("utf-8", "replace")
            if P._hex(args[1], "flags") & 3:  # O_WRONLY / O_RDWR
                return P.fileio_reply(-1, errno=FILEIO_EACCES)
            try:
                data = self.target.file_contents(path)
            except FileNotFoundError:
                return P.fileio_reply(-1, errno=FILEIO_ENOENT)
            except TargetError as e:
                # GDB only says "Input/output error": say why where the VMM runs
                print(f"vmscope: cannot make target:{path}: {e}", file=sys.stderr, flush=True)
                return P.fileio_reply(-1, errno=FILEIO_EIO)
            fd = max(self._files, default=2) + 1
            self._files[fd] = data
            return P.fileio_reply(fd)
        if op in ("pread", "close", "fstat"):
            if not args:
                raise P.ProtocolError(f"vFile:{op} takes a file descriptor")
            fd = P._hex(args[0], "file descriptor")
            if fd not in self._files:
                return P.fileio_reply(-1, errno=FILEIO_EBADF)
            data = self._files[fd]
            if op == "close":
                del self._files[fd]
                return P.fileio_reply(0)
            if op == "fstat":
                return P.fileio_reply(64, _fio_stat(len(data)))
            if len(args) != 3:
                raise P.ProtocolError("vFile:pread takes fd,count,offset")
            count, offset = P._hex(args[1], "count"), P._hex(args[2], "offset")
            chunk = data[offset : offset + min(count, _MAX_MEMORY)]  # escapes may double it
            return P.fileio_reply(len(chunk), chunk)
        return P.fileio_reply(-1, errno=FILEIO_ENOSYS)

    def _breakpoint(self, req: P.Breakpoint) -> bytes:
        key = (req.type, req.addr, req.kind)
        if not self._supports(req.type):
            return P.EMPTY
        if req.insert:
            if key not in self.inserted:
                self._insert(*key)
                self.inserted.add(key)
        else:
            if key in self.inserted:
                self._remove(*key)
                self.inserted.discard(key)
        return P.OK

    def _supports(self, ztype: int) -> bool:
        t = self.target
        return (
            (ztype == 0 and isinstance(t, SwBreakpoints))
            or (ztype == 1 and isinstance(t, HwBreakpoints))
            or (ztype in _WATCH_KINDS and isinstance(t, Watchpoints))
        )

    def _insert(self, ztype: int, addr: int, kind: int) -> None:
        t = self.target
        if ztype == 0:
            t.add_sw_breakpoint(addr, kind)  # type: ignore[attr-defined]
        elif ztype == 1:
            t.add_hw_breakpoint(addr, kind)  # type: ignore[attr-defined]
        else:
            t.add_watchpoint(addr, kind, _WATCH_KINDS[ztype])  # type: ignore[attr-defined]

    def _remove(self, ztype: int, addr: int, kind: int) -> None:
        t = self.target
        if ztype == 0:
            t.remove_sw_breakpoint(addr, kind)  # type: ignore[attr-defined]
        elif ztype == 1:
            t.remove_hw_breakpoint(addr, kind)  # type: ignore[attr-defined]
        else:
            t.remove_watchpoint(addr, kind, _WATCH_KINDS[ztype])  # type: ignore[attr-defined]

    # --- queries -------------------------------------------------------------

    def supported(self, offered: bytes) -> bytes:
        t = self.target
        gdb_features = set(offered.split(b";"))
        self.binary_upload = b"binary-upload+" in gdb_features
        feats = [
            f"PacketSize={PACKET_SIZE:x}",
            "qXfer:features:read+",
            "qXfer:threads:read+",
            "QStartNoAckMode+",
            "vContSupported+",
        ]
        if isinstance(t, SwBreakpoints):
            feats.append("swbreak+")
        if isinstance(t, HwBreakpoints):
            feats.append("hwbreak+")
        if self.binary_upload:
            feats.append("binary-upload+")
        return ";".join(feats).encode()

    def _query(self, q: P.Query) -> bytes:
        t = self.target
        name = q.name
        if self.running and name not in ("Supported",):
            return P.error(errno.EBUSY)
        if name == "Supported":
            return self.supported(q.args)
        if name == "StartNoAckMode" and q.set:
            self.noack_pending = True
            return P.OK
        if name == "Attached":
            return b"1"
        if name == "C" and not q.args:
            return b"QC" + P.format_thread_id(self._tid(P.ANY_THREAD)).encode()
        if name == "fThreadInfo":
            return b"m" + ",".join(P.format_thread_id(x) for x in self._threads).encode()
        if name == "sThreadInfo":
            return b"l"
        if name == "ThreadExtraInfo":
            tid = self._tid(P.parse_thread_id(q.args))
            return P.hexbytes(self._thread_name(tid).encode())
        if name == "Symbol":
            return P.OK
        if name == "Xfer":
            return self._xfer(q.args)
        if name == "Rcmd":
            return self._monitor(q.args)
        if name == "HostInfo":
            return self._host_info()
        if name == "qemu.PhyMemMode" and isinstance(t, PhysicalMemory):
            if not q.set:
                return b"1" if self.phys_mode else b"0"
            if q.args not in (b"0", b"1"):
                return P.error(errno.EINVAL)
            self.phys_mode = q.args == b"1"
            return P.OK
        return P.EMPTY

    def _thread_name(self, tid: int) -> str:
        if isinstance(self.target, ThreadNames):
            return self.target.thread_name(tid)
        return f"CPU {tid - 1}"

    def _xfer(self, args: bytes) -> bytes:
        parts = args.split(b":")
        if len(parts) != 4 or parts[1] != b"read":
            return P.EMPTY
        obj, _, annex, window = parts
        offset, length = P._addr_len(window)
        if obj == b"features":
            if annex != b"target.xml":
                return P.error(errno.ENOENT)
            data = self.arch.target_xml.encode()
        elif obj == b"threads":
            data = self._threads_xml()
        else:
            return P.EMPTY
        chunk = data[offset : offset + min(length, PACKET_SIZE - 16)]
        return (b"l" if offset + len(chunk) >= len(data) else b"m") + chunk

    def _threads_xml(self) -> bytes:
        """The document, rebuilt only when a thread or its name changed."""
        from vmscope.arch.registers import quoteattr

        key = tuple((tid, self._thread_name(tid)) for tid in self._threads)
        if self._threads_doc is None or self._threads_doc[0] != key:
            rows = [f'  <thread id="{P.format_thread_id(tid)}" core="{tid - 1}" name={quoteattr(name)}/>'
                    for tid, name in key]
            doc = '<?xml version="1.0"?>\n<threads>\n' + "\n".join(rows) + "\n</threads>\n"
            self._threads_doc = (key, doc.encode())
        return self._threads_doc[1]

    def _monitor(self, args: bytes) -> bytes:
        try:
            command = bytes.fromhex(args.decode("ascii")).decode("utf-8", "replace").strip()
        except (ValueError, UnicodeDecodeError):
            raise P.ProtocolError("qRcmd takes a hex-encoded command") from None
        if isinstance(self.target, MonitorCommands):
            try:
                text = self.target.monitor(command)
            except TargetError as e:
                text = f"error: {e}\n"
        elif command in ("", "help"):
            text = "This target has no monitor commands.\n"
        else:
            text = f"unknown monitor command {command!r}; this target has none\n"
        if text and not text.endswith("\n"):
            text += "\n"
        return P.hexbytes(text.encode()) if text else P.OK

    def _host_info(self) -> bytes:
        """LLDB asks for this first; it names the architecture."""
        triple = {"i386:x86-64": "x86_64-unknown-none", "aarch64": "aarch64-unknown-none"}.get(self.arch.name)
        if triple is None:
            return P.EMPTY
        return f"triple:{triple.encode().hex()};endian:little;ptrsize:8;".encode()



def _fio_stat(size: int) -> bytes:
    """GDB's ``struct fio_stat`` (big-endian) for a read-only regular file."""
    import struct

    return struct.pack(">IIIIIIIQQQIII", 0, 0, _S_IFREG | 0o444, 1, 0, 0, 0, size, 4096, (size + 511) // 512, 0, 0, 0)
