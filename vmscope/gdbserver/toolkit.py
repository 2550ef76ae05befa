"""Parts every debug target needs, written once.

The three targets (x86 KVM, arm64 KVM, the emulated CPU) differ in how they
run a CPU and where a breakpoint comes from, not in how a stop reaches the
session, how a GDB thread id names a vCPU, how inserted breakpoint
instructions stay invisible to the debugger, how a virtual range falls into
physical pieces or how a ``monitor`` line is dispatched. Those live here so
that a fix in one of them reaches every back end.
"""

from __future__ import annotations

import errno
import select
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from vmscope.gdbserver.target import StopEvent, StopNotifier, TargetError

PAGE = 0x1000

#: watchpoint kind (``Z2``/``Z3``/``Z4``) -> the stop reason GDB expects
WATCH_STOP_KIND = {"write": "watch", "read": "rwatch", "access": "awatch"}


# --- stop notification -------------------------------------------------------


class StopNotifying:
    """Mixin: a target's stop notification through one
    :class:`~vmscope.gdbserver.target.StopNotifier` (``self.notifier``, made
    by :meth:`_init_stop_notifier`). A target that must refresh its state
    when a stop is taken overrides :meth:`_stop_taken`."""

    notifier: StopNotifier

    def _init_stop_notifier(self) -> None:
        self.notifier = StopNotifier()

    def stop_fd(self) -> int:
        return self.notifier.fd

    def post_stop(self, event: StopEvent) -> None:
        """Called by whatever thread notices the stop (a vCPU, a runner)."""
        self.notifier.post(event)

    def guest_ended(self, status: int) -> None:
        self.notifier.post(StopEvent("exited", code=status))

    def take_stop(self) -> StopEvent | None:
        event = self.notifier.take()
        if event is not None:
            self._stop_taken()
        return event

    def _stop_taken(self) -> None:
        """Hook: a stop was just handed to the session."""

    def stop(self, timeout: float = 10.0) -> StopEvent | None:
        """Stop a running guest and wait for the stop (for tests and
        helpers that do not use the stub)."""
        self.interrupt()
        ready, _, _ = select.select([self.notifier.fd], [], [], timeout)
        return self.take_stop() if ready else None


# --- threads ----------------------------------------------------------------


def vcpu_index(tid: int, count: int, *, any_thread_ok: bool = True) -> int:
    """The vCPU index of GDB thread ``tid`` (tid = index + 1) on a machine
    of ``count`` vCPUs. With ``any_thread_ok``, 0 and -1 ("any thread")
    name the first vCPU. ESRCH for a thread the machine does not have."""
    if tid <= 0 and any_thread_ok:
        tid = 1
    if not 1 <= tid <= count:
        raise TargetError(f"no thread {tid}: the VM has {count} vCPUs (threads 1..{count})", errno.ESRCH)
    return tid - 1


def refuse_while_running(running: bool) -> None:
    """EBUSY while the guest runs: vCPU state (registers, translations,
    Unicorn hooks) is only read or changed on stopped vCPUs."""
    if running:
        raise TargetError("the guest is running; stop it first", errno.EBUSY)


def thread_ids(count: int) -> list[int]:
    """GDB thread ids of ``count`` vCPUs."""
    return [i + 1 for i in range(count)]


# --- registers --------------------------------------------------------------


class LazyRegisters(Mapping):
    """Register values by name (``names``: the arch table's), each fetched
    by :meth:`_fetch` only when asked for: a stop reply needs three or four
    registers, and reading every one costs several ioctls or Unicorn calls."""

    def __init__(self, names: Mapping[str, object]) -> None:
        self._names = names

    def _fetch(self, name: str) -> int:
        raise NotImplementedError

    def __getitem__(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(name)
        return self._fetch(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# --- inserted breakpoints ---------------------------------------------------


@dataclass
class InsertedBreakpoint:
    """A breakpoint instruction patched into guest RAM at ``phys``, and the
    guest's bytes it covers (what the debugger sees there)."""

    phys: int
    orig: bytes


def overlapping(addr: int, length: int, inserted: Mapping[int, InsertedBreakpoint]) -> Iterator[tuple[int, int, int, InsertedBreakpoint]]:
    """(breakpoint address, lo, hi, breakpoint) for each inserted
    breakpoint (by guest-virtual address) that overlaps
    ``[addr, addr + length)``; ``[lo, hi)`` is the overlap."""
    for bp_addr, bp in list(inserted.items()):
        lo, hi = max(bp_addr, addr), min(bp_addr + len(bp.orig), addr + length)
        if lo < hi:
            yield bp_addr, lo, hi, bp


def hide_breakpoints(addr: int, data: bytes | bytearray, inserted: Mapping[int, InsertedBreakpoint]) -> bytes | bytearray:
    """``data``, read at ``addr``, with the guest's bytes back under every
    inserted breakpoint: the debugger sees guest code, never our breakpoint
    instructions (as gdbserver does). ``data`` itself (no copy) when no
    breakpoint overlaps it, the usual case of a large read."""
    hits = list(overlapping(addr, len(data), inserted))
    if not hits:
        return data
    buf = bytearray(data)
    for bp_addr, lo, hi, bp in hits:
        buf[lo - addr : hi - addr] = bp.orig[lo - bp_addr : hi - bp_addr]
    return bytes(buf)


def keep_breakpoints(addr: int, data: bytes, inserted: Mapping[int, InsertedBreakpoint], opcode: bytes) -> bytes:
    """What to store for a debugger write of ``data`` at ``addr``: bytes
    that land on an inserted breakpoint become its new original (updated in
    ``inserted``), and the breakpoint instruction stays in."""
    stored = bytearray(data)
    for bp_addr, lo, hi, bp in overlapping(addr, len(data), inserted):
        orig = bytearray(bp.orig)
        orig[lo - bp_addr : hi - bp_addr] = data[lo - addr : hi - addr]
        bp.orig = bytes(orig)
        stored[lo - addr : hi - addr] = opcode[lo - bp_addr : hi - bp_addr]
    return bytes(stored)


# --- virtual ranges -----------------------------------------------------------


def pages(addr: int, length: int, page: int = PAGE) -> Iterator[tuple[int, int]]:
    """(virtual address, length) of each page-bounded piece of a range."""
    cur, end = addr, addr + length
    while cur < end:
        n = min(end, (cur & ~(page - 1)) + page) - cur
        yield cur, n
        cur += n


def physical_pieces(addr: int, length: int, translate: Callable[[int], int | tuple[int, int] | None],
                    contains: Callable[[int, int], bool] | None = None,
                    ) -> tuple[list[tuple[int, int]], int | None, TargetError | None]:
    """Guest-physical (start, length) pieces of the virtual range
    ``[addr, addr + length)``, physically contiguous parts merged.

    ``translate(vaddr)`` gives the physical address of ``vaddr`` (a page
    walk: :mod:`vmscope.vmi.paging`, KVM_TRANSLATE, Unicorn's MMU), or
    (physical address, bytes mapped contiguously from there) when it knows
    a larger run (a large page), or None or :class:`TargetError` when it is
    unmapped; ``contains(phys, n)``, if given, says whether a piece is
    backed by RAM. The split stops at the first part that fails; returned
    with the pieces before it are its virtual address and the translation
    error (None when all is mapped).
    """
    pieces: list[tuple[int, int]] = []
    cur, end = addr, addr + length
    while cur < end:
        try:
            start = translate(cur)
        except TargetError as e:
            return pieces, cur, e
        if isinstance(start, tuple):
            start, n = start[0], min(start[1], end - cur)
        else:
            n = min(end, (cur & ~(PAGE - 1)) + PAGE) - cur
        if start is None or n <= 0 or (contains is not None and not contains(start, n)):
            return pieces, cur, None
        if pieces and pieces[-1][0] + pieces[-1][1] == start:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
        else:
            pieces.append((start, n))
        cur += n
    return pieces, None, None


# --- monitor commands ---------------------------------------------------------


class MonitorDispatch:
    """Mixin: ``monitor`` lines dispatched to the ``_monitor_<command>(args)``
    method of each command in :attr:`monitor_commands`. ``help`` (or an empty line) answers
    :meth:`_monitor_help`; commands in :attr:`monitor_needs_stop` answer a
    hint while the guest runs (their state is read from stopped vCPUs);
    :meth:`_monitor_other` may take commands that are not methods; the rest
    get the "unknown command" line."""

    #: the commands, each served by a ``_monitor_<command>(args)`` method
    monitor_commands: tuple[str, ...] = ("translate",)
    #: commands that read vCPU state, refused while the guest runs
    monitor_needs_stop: frozenset[str] = frozenset()
    #: what ``translate`` prints before the physical address
    monitor_translate_label = ""

    def monitor(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
            return self._monitor_help()
        cmd, args = words[0], words[1:]
        if cmd in self.monitor_needs_stop and self._monitor_guest_running():
            return f"{cmd}: the guest is running; interrupt it first (Ctrl-C)\n"
        if cmd in self.monitor_commands:
            return getattr(self, f"_monitor_{cmd}")(args)
        other = self._monitor_other(cmd, args)
        if other is not None:
            return other
        return f"unknown monitor command {cmd!r}; try 'monitor help'\n"

    def _monitor_help(self) -> str:
        raise NotImplementedError

    def _monitor_guest_running(self) -> bool:
        return self.is_running()

    def _monitor_other(self, cmd: str, args: list[str]) -> str | None:
        return None

    def _monitor_address(self, text: str) -> int:
        """An address typed after a monitor command (ValueError if it is not one)."""
        try:
            return int(text, 0)
        except ValueError:
            raise ValueError(f"{text!r} is not a number (use 0x... for hex)") from None

    def _monitor_translate(self, args: list[str]) -> str:
        if len(args) != 1:
            return "usage: translate ADDR\n"
        try:
            addr = self._monitor_address(args[0])
        except ValueError as e:
            return f"translate: {e}\n"
        try:
            return f"{addr:#x} -> {self.monitor_translate_label}{self.translate(addr, 1):#x}\n"
        except TargetError as e:
            return f"translate: {e}\n"
