"""The interface between the GDB stub and whatever it debugs.

A target implements the small required core in :class:`Target` and opts into
capabilities by also inheriting the matching mixin ABCs below (the model is
the Rust ``gdbstub`` crate's optional extension traits). The session derives
``qSupported`` and which packets it answers from ``isinstance`` checks on
these mixins, never from hard-coded lists.

Threading model: the session calls the target from one thread (the stub's).
``resume`` returns at once; when the target stops it makes :meth:`stop_fd`
readable and :meth:`take_stop` returns the :class:`StopEvent`. All threads of
a target stop together (all-stop mode). ``interrupt`` may be called from any
thread.

Thread ids are 1-based (vCPU index + 1), as GDB's ``0`` and ``-1`` are
reserved for "any" and "all".

Errors: a target signals a failed access by raising :class:`TargetError`
(with an errno that the session turns into ``Exx``); anything else it raises is
a bug, which the session still turns into an error reply instead of dying.
"""

from __future__ import annotations

import abc
import errno
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Mapping

from vmscope.rsp.stops import StopEvent, StopKind  # noqa: F401  (the stop type targets report)

if TYPE_CHECKING:
    from vmscope.arch.registers import Arch

SIGINT = int(signal.SIGINT)  # 2
SIGTRAP = int(signal.SIGTRAP)  # 5
SIGSEGV = int(signal.SIGSEGV)  # 11
SIGKILL = 9


class TargetError(Exception):
    """A request the target could not carry out (bad address, no such thread...).

    ``errno`` becomes the ``Exx`` reply code. The message is for logs and
    for ``monitor`` output, so it should name what was wrong.
    """

    def __init__(self, message: str, errno_: int = errno.EFAULT):
        super().__init__(message)
        self.errno = errno_


ResumeKind = Literal["continue", "step"]


@dataclass(frozen=True)
class ResumeAction:
    kind: ResumeKind
    signal: int | None = None


@dataclass
class ResumeActions:
    """What each thread should do on resume (from ``c``, ``s`` or ``vCont``).

    ``per_thread`` maps a tid to its action; ``default`` applies to every
    other thread (``None``: those threads stay stopped). A target may keep
    the other threads stopped while one thread single-steps (QEMU and
    kvmtool do); it documents that choice.
    """

    per_thread: dict[int, ResumeAction] = field(default_factory=dict)
    default: ResumeAction | None = None

    def action_for(self, tid: int) -> ResumeAction | None:
        return self.per_thread.get(tid, self.default)

    @property
    def stepping(self) -> list[int]:
        return [t for t, a in self.per_thread.items() if a.kind == "step"]


class StopNotifier:
    """A pipe that makes a target's stop visible to ``select``.

    Targets own one and call :meth:`post` from whatever thread notices the
    stop; the session's transport selects on :attr:`fd`.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._lock = threading.Lock()
        self._event: StopEvent | None = None

    @property
    def fd(self) -> int:
        return self._r

    def post(self, event: StopEvent) -> None:
        with self._lock:
            if self._event is None:
                self._event = event
                os.write(self._w, b"!")

    def take(self) -> StopEvent | None:
        with self._lock:
            ev, self._event = self._event, None
            if ev is not None:  # post wrote one byte for it, under this lock: one read takes it
                try:
                    os.read(self._r, 64)
                except BlockingIOError:
                    pass
            return ev

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class Target(abc.ABC):
    """The required core every target implements."""

    #: the architecture table (register layout, target.xml, breakpoint opcode)
    arch: "Arch"

    @abc.abstractmethod
    def threads(self) -> list[int]:
        """Thread ids (1-based), in order."""

    @abc.abstractmethod
    def read_registers(self, tid: int) -> Mapping[str, int]:
        """Register values by arch-table name. Missing names read as 0
        (``xx`` is never sent: GDB treats unavailable core registers badly)."""

    @abc.abstractmethod
    def write_registers(self, tid: int, values: Mapping[str, int]) -> None:
        """Write the named registers; others keep their values."""

    @abc.abstractmethod
    def read_memory(self, addr: int, length: int, tid: int) -> bytes:
        """Read guest-virtual memory as seen by ``tid``.

        May return fewer bytes than asked when the range runs into an
        unreadable page (at least one byte); raises :class:`TargetError` when
        the first byte is unreadable.
        """

    @abc.abstractmethod
    def write_memory(self, addr: int, data: bytes, tid: int) -> None:
        """Write guest-virtual memory as seen by ``tid``; all or nothing."""

    @abc.abstractmethod
    def resume(self, actions: ResumeActions) -> None:
        """Start the threads running as ``actions`` say; returns at once."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Ask a running target to stop (Ctrl-C); a SIGINT stop follows."""

    @abc.abstractmethod
    def stop_fd(self) -> int:
        """A file descriptor that is readable while a stop is pending."""

    @abc.abstractmethod
    def take_stop(self) -> StopEvent | None:
        """The pending stop, if any (clears it)."""

    def stop_registers(self, tid: int, names: tuple[str, ...]) -> Mapping[str, int]:
        """The registers a stop reply carries (the arch's expedited ones:
        pc, sp, fp), read at every stop. The default reads them through
        :meth:`read_registers`; a target whose full read is dear (every
        register at once) can read just these."""
        return self.read_registers(tid)

    def initial_stop(self) -> StopEvent:
        """The answer to ``?`` right after attaching."""
        return StopEvent("signal", tid=self.threads()[0], signal=SIGTRAP)

    def is_running(self) -> bool:
        """True between ``resume`` and the stop that ends it."""
        return False

    def detach(self) -> None:
        """The debugger left (``D`` or a vanished connection): the session has
        already removed every breakpoint and watchpoint; the target lets the
        guest run on, undisturbed."""
        self.resume(ResumeActions(default=ResumeAction("continue")))

    def kill(self) -> None:
        """``k``: end the guest (the VMM exits with status 0)."""


# --- optional capabilities -------------------------------------------------


class SwBreakpoints(abc.ABC):
    """``Z0``/``z0``. ``kind`` is GDB's breakpoint kind (opcode length)."""

    @abc.abstractmethod
    def add_sw_breakpoint(self, addr: int, kind: int) -> None: ...

    @abc.abstractmethod
    def remove_sw_breakpoint(self, addr: int, kind: int) -> None: ...


class HwBreakpoints(abc.ABC):
    """``Z1``/``z1``. Raise TargetError(ENOSPC) when out of slots."""

    @abc.abstractmethod
    def add_hw_breakpoint(self, addr: int, kind: int) -> None: ...

    @abc.abstractmethod
    def remove_hw_breakpoint(self, addr: int, kind: int) -> None: ...


WatchKind = Literal["write", "read", "access"]


class Watchpoints(abc.ABC):
    """``Z2``-``Z4``/``z2``-``z4``: write, read and access watchpoints."""

    @abc.abstractmethod
    def add_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None: ...

    @abc.abstractmethod
    def remove_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None: ...


class MonitorCommands(abc.ABC):
    """``qRcmd``: ``monitor CMD`` in GDB. Return the text to print."""

    @abc.abstractmethod
    def monitor(self, command: str) -> str: ...


class AddressTranslation(abc.ABC):
    """Guest-virtual to guest-physical, for ``monitor translate`` and helpers."""

    @abc.abstractmethod
    def translate(self, addr: int, tid: int) -> int:
        """Raise TargetError naming the address when it is not mapped."""


class PhysicalMemory(abc.ABC):
    """Direct guest-physical access (``Qqemu.PhyMemMode`` style helpers)."""

    @abc.abstractmethod
    def read_physical(self, addr: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def write_physical(self, addr: int, data: bytes) -> None: ...


class ThreadNames(abc.ABC):
    """Names shown in ``info threads`` (``qXfer:threads:read``)."""

    @abc.abstractmethod
    def thread_name(self, tid: int) -> str: ...


class TargetFiles(abc.ABC):
    """Read-only files the stub serves to GDB's ``target:`` paths (the
    ``vFile`` host I/O packets), e.g. ``add-symbol-file
    target:/vmscope/kallsyms.elf``: files the target makes from guest state,
    which GDB on another machine (or outside a lab VM) could not read."""

    @abc.abstractmethod
    def file_contents(self, path: str) -> bytes:
        """The whole file. Raise FileNotFoundError for a path it does not
        serve, TargetError when the file cannot be made now (say why)."""
