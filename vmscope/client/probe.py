"""Probes on kernel functions: a breakpoint, a Python callback per hit with
the task, CPU, registers and decoded arguments, and nothing left behind.

In the spirit of Stackdb's probes and drgn's helpers::

    with Inspector(gdb="localhost:1234", qmp="localhost:4444") as vm:
        @vm.probe("__x64_sys_openat")
        def opened(hit):
            print(hit.task.pid, hit.task.comm, hit.user_string(hit.args["filename"]))
        vm.run(hits=10, seconds=30)

The loop is plain RSP: insert the breakpoints, continue, and at each stop
that is one of ours (QEMU reports every stop as signal 5, so the pc is
compared with the breakpoints set) build a :class:`Hit`, call the callback,
step the vCPU off the breakpoint with it lifted (as GDB does) and continue.
Whatever way :meth:`ProbeSet.run` ends (limit reached, exception in a
callback, Ctrl-C, SIGTERM, a stub that stops answering) the guest is stopped
if it runs and every probe's breakpoint is removed; closing the Inspector
then restores QEMU's memory mode and detaches, and the guest runs on.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from vmscope.client.errors import StubError
from vmscope.client.transport import ConnectionLost, StubTimeout
from vmscope.rsp.stops import SIGTRAP, StopEvent
from vmscope.vmi.errors import VmiError
from vmscope.vmi.linux import calls

if TYPE_CHECKING:
    from vmscope.client.session import Inspector
    from vmscope.vmi.linux.tasks import Task

USER_TOP = 1 << 63  # below: a user address on both x86_64 and arm64 (upper-half kernels)


class Args(list):
    """Argument values, by position or by name (``args[1]``, ``args["filename"]``)."""

    def __init__(self, values: Iterable[int], names: Iterable[str]):
        super().__init__(values)
        self.names = list(names)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return list.__getitem__(self, self.names.index(key))
            except ValueError:
                raise KeyError(f"no argument {key!r}; this function's are {', '.join(self.names)}") from None
        return list.__getitem__(self, key)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.names, self))


class Registers(dict):
    """The stopped vCPU's registers (one ``g``), completed on demand with
    ``p`` for those outside it (arm64's SP_EL0 and TPIDR_EL1 on QEMU)."""

    def __init__(self, client):
        super().__init__(client.registers())
        self._client = client

    def _fetch(self, name: str) -> int | None:
        value = dict.get(self, name)
        if value is None and name in self._client.layout:
            try:
                value = self._client.register(name)
            except StubError:
                value = None
            self[name] = value
        return value

    def get(self, name, default=None):  # type: ignore[override]
        value = self._fetch(name)
        return default if value is None else value

    def __getitem__(self, name):
        value = self._fetch(name)
        if value is None:
            raise KeyError(f"the stub reports no register {name!r}")
        return value


class Hit:
    """What a probe sees at one hit. Everything is read lazily and at most
    once: a callback that looks only at ``task.pid`` costs one read.

    ``time`` is seconds since :meth:`ProbeSet.run` started; ``tid`` the
    stub's thread (vCPU) that hit; ``cpu`` the Linux CPU number."""

    def __init__(self, vm: Inspector, probe: Probe, symbol: str, address: int, stop: StopEvent, started: float):
        self.vm, self.probe, self.symbol, self.address, self.stop = vm, probe, symbol, address, stop
        self.tid = stop.tid
        self.time = time.monotonic() - started
        self.kernel = vm.kernel()
        self._regs: Registers | None = None
        self._task: Task | None = None
        self._args: Args | None = None
        self._cpu: int | None = None

    @property
    def regs(self) -> Registers:
        if self._regs is None:
            self._regs = Registers(self.vm.client)
        return self._regs

    @property
    def cpu(self) -> int:
        if self._cpu is None:
            self._cpu = self.kernel.cpu_from_registers(self.regs, self.tid)
        return self._cpu

    @property
    def task(self) -> Task:
        """The task that hit (``current``): pid, tgid, comm, ..."""
        if self._task is None:
            from vmscope.vmi.linux.current import task_from_address

            address = self.kernel.current_task(self.regs, self.tid)
            self._task = task_from_address(self.kernel, address, running_cpu=self.cpu)
        return self._task

    @property
    def signature(self) -> calls.Signature:
        return calls.signature(self.kernel, self.symbol)

    @property
    def args(self) -> Args:
        """Argument values: a syscall's from its ``pt_regs``, a plain
        function's from the calling convention; by position or name."""
        if self._args is None:
            sig = self.signature
            self._args = Args(calls.arguments(self.kernel, sig, self.regs), (p.name for p in sig.params))
        return self._args

    def read(self, addr: int, size: int) -> bytes:
        """Memory as the hitting code sees it: a user address in the current
        process's address space, a kernel address in the kernel's."""
        if addr < USER_TOP:
            return self.kernel.user_read(self.task, addr, size)
        return self.kernel.read(addr, size)

    def user_string(self, ptr: int, limit: int = 4096) -> str:
        """A string at a user pointer of the current process."""
        return self.kernel.user_string(self.task, ptr, limit)

    def string(self, ptr: int, limit: int = 4096) -> str:
        """A string at ``ptr`` in the right address space (user or kernel)."""
        if ptr < USER_TOP:
            return self.user_string(ptr, limit)
        return self.kernel.aspace.cstring(ptr, limit)

    def decoded_args(self) -> dict[str, int | str]:
        """Arguments as a person reads them: signed integers where the C type
        is, strings for ``char *`` (user strings for syscalls); an unreadable
        string shows as ``<unreadable 0x...>``."""
        out: dict[str, int | str] = {}
        sig = self.signature
        for param, value in zip(sig.params, self.args):
            if param.is_string and value:
                try:
                    out[param.name] = self.user_string(value) if sig.user_pointers else self.string(value)
                except VmiError:
                    out[param.name] = f"<unreadable 0x{value:x}>"
            else:
                out[param.name] = calls.signed(value, param.type)
        return out

    def stop_run(self) -> None:
        """End :meth:`ProbeSet.run` after this hit."""
        self.vm.probes.stop_requested = True


@dataclass(eq=False)
class Probe:
    """A breakpoint on one or more kernel functions and what to do there."""

    symbols: tuple[str, ...]
    callback: Callable[[Hit], object] | None = None
    condition: Callable[[Hit], bool] | None = None
    hardware: bool = False
    hits: int = 0  # hits that passed the condition
    misses: int = 0  # hits the condition rejected
    addresses: dict[int, str] = field(default_factory=dict)  # address -> symbol, filled when armed


@dataclass
class RunResult:
    hits: int
    other_stops: int
    seconds: float
    reason: str  # "hits", "seconds", "stopped", "exited"


class ProbeSet:
    """The probes of one Inspector and the loop that serves them."""

    def __init__(self, vm: Inspector):
        self.vm = vm
        self.probes: list[Probe] = []
        self.armed: dict[int, Probe] = {}  # address -> probe
        self.stop_requested = False
        self._waiting = False
        self._pending_signal: int | None = None

    def add(self, symbols: str | Iterable[str], callback=None, *, condition=None, hardware: bool = False):
        names = (symbols,) if isinstance(symbols, str) else tuple(symbols)
        if not names:
            raise ValueError("a probe needs at least one symbol")
        kernel = self.vm.kernel()
        probe = Probe(names, callback, condition, hardware)
        for name in names:
            address = kernel.address_of(name)  # KeyError names the symbol
            if address in probe.addresses or any(address in p.addresses for p in self.probes):
                raise ValueError(f"{name} (0x{address:x}) already has a probe")
            probe.addresses[address] = name
        self.probes.append(probe)
        return probe

    def remove(self, probe: Probe) -> None:
        self._disarm(probe)
        self.probes.remove(probe)

    # ------------------------------------------------------------ breakpoints

    def _arm(self) -> None:
        client = self.vm.client
        for probe in self.probes:
            for address in probe.addresses:
                if address not in self.armed:
                    client.set_breakpoint(address, hardware=probe.hardware)
                    self.armed[address] = probe

    def _disarm(self, only: Probe | None = None) -> None:
        """Remove our breakpoints, stopping the guest first if it runs (a
        packet to a running QEMU is taken as a stop request and dropped)."""
        client = self.vm.client
        if client is None:
            return
        if client.running:
            client.halt(self.vm.timeout)
        for address, probe in list(self.armed.items()):
            if only is None or probe is only:
                try:
                    client.remove_breakpoint(address, hardware=probe.hardware)
                except StubError:
                    pass  # the stub forgot it already
                del self.armed[address]

    def _step_off(self, stop: StopEvent, address: int, probe: Probe) -> StopEvent | None:
        """Execute the probed instruction with its breakpoint lifted."""
        client = self.vm.client
        client.remove_breakpoint(address, hardware=probe.hardware)
        del self.armed[address]
        client.resume(step=True, tid=stop.tid)
        self._waiting = True
        try:
            step = client.wait(self.vm.timeout)
        finally:
            self._waiting = False
        client.set_breakpoint(address, hardware=probe.hardware)
        self.armed[address] = probe
        return step

    # ------------------------------------------------------------ the loop

    def hit_address(self, stop: StopEvent) -> int | None:
        """Our probe's address if ``stop`` is a hit of one, else None.
        QEMU reports every stop as signal 5 (a breakpoint, a step, a
        debugger's Ctrl-C alike, without ``swbreak``), so the stopped
        thread's pc is compared with the breakpoints set."""
        if stop.kind not in ("swbreak", "hwbreak") and not (stop.kind == "signal" and stop.signal == SIGTRAP):
            return None
        # After a stop, QEMU, gdbserver and vmscope's stub all make the
        # stopping thread the one 'g' reads: no Hg round trip needed.
        client = self.vm.client
        pc = client.register(client._pc_name())
        return pc if pc in self.armed else None

    def run(self, hits: int | None = None, seconds: float | None = None) -> RunResult:
        """Serve the probes until ``hits`` hits (that passed their
        conditions), ``seconds`` elapsed, a callback called
        :meth:`Hit.stop_run`, or the guest exits. Returns with the guest
        stopped and no breakpoint left; close the Inspector (or leave its
        ``with``) to let the guest run on."""
        client = self.vm.client
        if client is None:
            raise VmiError("probes need a GDB stub (--gdb)")
        if not self.probes:
            raise ValueError("no probes: add one with vm.probe(symbol, callback)")
        self.stop_requested = False
        started = time.monotonic()
        deadline = started + seconds if seconds is not None else None
        count = others = 0
        reason = "stopped"
        old_handlers = self._install_signal_handlers()
        try:
            self._arm()
            while True:
                if hits is not None and count >= hits:
                    reason = "hits"
                    break
                if self.stop_requested:
                    break
                self._raise_pending()
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    reason = "seconds"
                    break
                if client._phys_mode:
                    # Back to virtual before the guest runs: a script killed
                    # while it runs (SIGKILL) then leaves QEMU as it found it.
                    client.set_physical_mode(False)
                client.resume()
                self._waiting = True
                try:
                    stop = client.wait(wait)
                except StubTimeout:
                    if deadline is not None and time.monotonic() >= deadline:
                        reason = "seconds"
                        break
                    raise
                finally:
                    self._waiting = False
                if stop.kind in ("exited", "terminated"):
                    reason = "exited"
                    break
                address = self.hit_address(stop)
                if address is None:
                    others += 1
                    continue
                probe = self.armed[address]
                hit = Hit(self.vm, probe, probe.addresses[address], address, stop, started)
                if probe.condition is not None and not probe.condition(hit):
                    probe.misses += 1
                else:
                    probe.hits += 1
                    count += 1
                    if probe.callback is not None:
                        probe.callback(hit)
                step = self._step_off(stop, address, probe)
                if step is not None and step.kind in ("exited", "terminated"):
                    reason = "exited"
                    break
        finally:
            # Clean up with our handlers still in place: a second Ctrl-C or
            # SIGTERM now is held (nothing waits), not let loose mid-request.
            try:
                self._disarm()
            except (StubError, ConnectionLost, StubTimeout, OSError):
                pass  # the stub is gone or deaf; close() still closes the socket
            finally:
                self._restore_signal_handlers(old_handlers)
        self._raise_pending()  # a signal that came during the last hit or the clean-up
        return RunResult(count, others, time.monotonic() - started, reason)

    # ------------------------------------------------------------ signals

    def _install_signal_handlers(self):
        """SIGINT and SIGTERM end the run cleanly: raised at once while we
        wait for the guest (nothing is half sent then), else after the
        current hit, so a request is never cut in two."""
        if threading.current_thread() is not threading.main_thread():
            return None
        self._pending_signal = None

        def handler(signum, frame):
            if self._waiting:
                self._raise_for(signum)
            self._pending_signal = signum

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self, old) -> None:
        if old:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _raise_pending(self) -> None:
        if self._pending_signal is not None:
            signum, self._pending_signal = self._pending_signal, None
            self._raise_for(signum)

    @staticmethod
    def _raise_for(signum: int):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
