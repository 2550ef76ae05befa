"""Run control shared by every KVM machine (x86 and arm64): vCPU threads,
pause and resume, debug stops, exclusive turns, the end of the VM.

How a debug stop pauses every vCPU (as crosvm and kvmtool do): each vCPU
thread loops "park until allowed to run -> KVM_RUN -> handle the exit". To
stop them all, the stopper clears every vCPU's ``runnable`` flag, sets
``kvm_run.immediate_exit`` (so a thread about to enter KVM_RUN returns at
once) and sends the thread the kick signal (so a thread inside KVM_RUN
returns with EINTR). The last vCPU to park posts the pending stop event, so
the debugger only ever sees a machine whose vCPUs are all parked.

Why a base class with hooks rather than code in each machine: the x86 and
arm64 machines had two copies of this logic that drifted (one
``request_stop`` returned whether its stop won, the other nothing). A
machine subclasses :class:`RunControl` and supplies the hooks:

- :meth:`RunControl.handle_exit` serves the exit a vCPU just took (the
  machine's devices, the debug target's exits);
- :meth:`RunControl.flush_console` replays output still queued in KVM
  before a report (default: nothing);
- :meth:`RunControl.stop_devices` and :meth:`RunControl.release_resources`
  stop devices and close guest memory at shutdown;
- ``self.target`` (a :class:`StopSink`) hears of stops and of the end.

The vCPU objects only need ``index``, ``run.immediate_exit``, ``enter()``,
``close()`` and ``summary()``; nothing here knows an architecture.

Telling the guest it was held (as QEMU does whenever a stopped VM
resumes): a guest kernel's soft-lockup watchdog and RCU stall detector see
the time a debugger held the machine as time its CPUs did not run, and
print stall reports with backtraces after the continue (on a serial
console, seconds of output that keep a vCPU busy; in the nested lab, enough
to kill L1: docs/kvm-notes.md). Every resume after a debug stop calls the
hook :meth:`RunControl.guest_was_held` with how long that stop lasted and
every vCPU still parked. x86 sets kvmclock's "guest stopped" flag
(``KVM_KVMCLOCK_CTRL``), which Linux checks before it reports either stall,
once the machine has been held for :data:`PAUSE_NOTICE_SECONDS` in all;
arm64 takes a stop that long off the virtual counter (QEMU's
``kvm-adjvtime``). Either way no ioctl is added to the path of a ``stepi``.

Serving the debugger from a parked vCPU's thread (:meth:`RunControl.offer_debugger`):
a single step is a hand-off to the vCPU's thread and back (each a kernel
wake-up, about 20 us on a VM, twice per ``stepi``). Once the stub has
started a step it may offer the connection to that vCPU: when the vCPU
parks with the stop, its own thread sends the stop reply and answers the
debugger's next requests; a step of the same vCPU then runs in the same
thread with no hand-off at all. The vCPU gives the connection back when the
debugger pauses or asks for anything else (see
:mod:`vmscope.gdbserver.vcpu_serving`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Protocol

from vmscope.kvm.system import KICK_SIGNAL, install_kick_handler, open_kvm


PAUSE_NOTICE_SECONDS = 1.0
"""Held at debug stops this long, the guest is told (see the module
docstring). Linux's shortest stall timeouts are seconds (``watchdog_thresh=1``
reports after 2 s, RCU after 3 s at the least); a second of held time costs
an ioctl or two per vCPU."""


class StopSink(Protocol):
    """What run control tells the debug target."""

    def post_stop(self, event) -> None: ...

    def guest_ended(self, status: int) -> None: ...

    def debug_state(self) -> str:
        """One line on the debugger's marks in the guest (for state_report)."""
        ...


class VcpuSlot:
    """A vCPU plus its run-control flags (guarded by the machine's lock).

    ``online``: the vCPU's thread takes part in run control. An x86 vCPU
    waiting for INIT/SIPI of a bare-metal guest is offline (it never runs);
    an arm64 vCPU powered off for PSCI CPU_ON is online (KVM blocks its
    KVM_RUN until then)."""

    def __init__(self, vcpu, online: bool = False):
        self.vcpu = vcpu
        self.runnable = False
        self.parked = True
        self.online = online
        self.thread: threading.Thread | None = None


class RunControl:
    """The run-control half of a KVM machine (see the module docstring)."""

    target: StopSink

    def _init_run_control(self) -> None:
        self._cond = threading.Condition()
        self._status: int | None = None
        # Set once the VM ended: wait() sleeps on it, not on _cond, which
        # every park and resume notifies (the main thread would wake, and
        # take the GIL, twice per debugger step).
        self._ended = threading.Event()
        self._ending = False
        self._stop_event = None  # event waiting for every vCPU to park
        self._stopped = True
        self._exclusive: VcpuSlot | bool | None = None
        self._generation = 0
        self._stops_posted = 0
        self._stopped_at: float | None = None  # when the debug stop being held was posted
        self._closed = False
        self._input = None  # a console input thread, stopped at shutdown
        # the debugger offered to a parked vCPU (offer_debugger): its index, whether it took it, the server
        self._offered_to: int | None = None
        self._serving = False
        self._debugger_server: Callable[[int], bool] | None = None
        self.coalesced = None  # a coalesced-MMIO/PIO ring (kvm.devices.coalesced), closed at shutdown
        self.vcpus: list[VcpuSlot] = []
        self.kvm_fd: int | None = None
        self.vm_fd: int | None = None

    def _open_and_create(self, config, **open_args) -> None:
        """Open /dev/kvm and run the machine's ``_create(config)``; on any
        failure close what was made (fds, memory) before the error goes up."""
        self.kvm_fd = open_kvm(**open_args)
        try:
            self._create(config)
        except BaseException:
            self._release()
            raise

    # --- hooks ------------------------------------------------------------------------

    def handle_exit(self, slot: VcpuSlot) -> None:
        """Serve the exit ``slot``'s vCPU just took."""
        raise NotImplementedError

    def flush_console(self) -> None:
        """Replay console output KVM still holds (before a report)."""

    def guest_was_held(self, seconds: float) -> None:
        """The debugger resumes the guest after a stop that held it for
        ``seconds``: tell the guest if need be (see the module docstring).
        Called with every vCPU parked (vCPU ioctls from this thread do not
        wait for a KVM_RUN) and the run-control lock held. Default: nothing."""

    def state_report(self) -> list[str]:
        """Lines on run control, each vCPU and the devices, for ``kill
        -USR1`` (with every thread's stack, vmscope/cli.py): what a hung
        guest's VMM was doing. Read without the lock: a report must never
        wait, and a racy snapshot is enough to see a vCPU that is held."""
        exclusive = self._exclusive
        holder = (f"vCPU {exclusive.vcpu.index}" if isinstance(exclusive, VcpuSlot)
                  else "the debugger" if exclusive else "none")
        lines = [f"run control: {'stopped' if self._stopped else 'running'}, "
                 f"stop pending: {'yes' if self._stop_event is not None else 'no'}, "
                 f"ending: {'yes' if self._ending else 'no'}, exclusive turn: {holder}, "
                 f"debugger offered to: {'none' if self._offered_to is None else f'vCPU {self._offered_to}'}"
                 f"{' (serving)' if self._serving else ''}, debug stops: {self._stops_posted}"]
        for slot in self.vcpus:
            run = slot.vcpu.run
            lines.append(f"vCPU {slot.vcpu.index}: {'online' if slot.online else 'offline'}, "
                         f"{'runnable' if slot.runnable else 'held'}, {'parked' if slot.parked else 'not parked'}, "
                         f"immediate_exit={run.immediate_exit}")
        return lines + self.device_report() + [self.target.debug_state()]

    def device_report(self) -> list[str]:
        """The devices' lines of :meth:`state_report` (default: none)."""
        lines = []
        serial_state = getattr(getattr(self, "serial", None), "state", None)
        if serial_state is not None:
            lines.append(serial_state())
        if self.coalesced is not None:
            c = self.coalesced
            zones = ", ".join(f"{addr:#x}+{size}" for addr, size in sorted(c.zones)) or "none"
            lines.append(f"coalesced writes: zones {zones}, {c.replayed} replayed")
        return lines

    def stop_devices(self) -> None:
        """At shutdown, after the vCPU threads ended and before the fds
        close: stop the console input thread (machines add their devices)."""
        if self._input is not None:
            self._input.stop()
        if self.coalesced is not None:
            self.coalesced.close()

    def start_console_input(self, serial_in, feed) -> None:
        """Feed the host's console input (``serial_in``, a file; None: none)
        to the guest's UART; its end (Ctrl-A x, EOF) ends the VM with 0."""
        if serial_in is not None:
            from vmscope.devices.console import ConsoleInput

            self._input = ConsoleInput(serial_in, feed, lambda: self.end(0, None))
            self._input.start()

    def release_resources(self) -> None:
        """Close guest memory (after the vCPU and VM fds)."""

    # --- Machine protocol -------------------------------------------------------------

    def start_vcpu_threads(self, paused: bool) -> None:
        """One thread per vCPU; online ones run at once unless ``paused``."""
        install_kick_handler()
        with self._cond:
            self._stopped = paused
            for slot in self.vcpus:
                slot.runnable = slot.online and not paused
                slot.thread = threading.Thread(target=self._vcpu_loop, args=(slot,),
                                               name=f"vcpu{slot.vcpu.index}", daemon=True)
                slot.thread.start()

    def debug_target(self):
        return self.target

    def wait(self, timeout: float | None = None) -> int | None:
        self._ended.wait(timeout)
        with self._cond:
            return self._status

    @property
    def status(self) -> int | None:
        return self._status

    def shutdown(self) -> None:
        self.end(None, None)
        for slot in self.vcpus:
            if slot.thread is not None and slot.thread is not threading.current_thread():
                slot.thread.join(timeout=5)
        self.stop_devices()
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self.vcpus:
            if slot.thread is None or not slot.thread.is_alive():
                slot.vcpu.close()
        for fd in (self.vm_fd, self.kvm_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.release_resources()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # --- ending -------------------------------------------------------------------------

    def end(self, status: int | None, report: str | None) -> None:
        """End the VM with ``status`` (None: torn down by the host, no
        status); ``report`` is the one-line reason printed on stderr."""
        with self._cond:
            if self._ending:
                return
            self._ending = True
            if status is not None:
                self._status = status
            elif self._status is None:
                self._status = 0
            self._ended.set()
            for slot in self.vcpus:
                slot.runnable = False
            self._kick_locked(self.vcpus)
            self._cond.notify_all()
        self.flush_console()
        if report:
            print(f"vmscope: {report}", file=sys.stderr, flush=True)
        if status is not None and getattr(self, "target", None) is not None:
            self.target.guest_ended(status)

    @property
    def ending(self) -> bool:
        return self._ending

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_pending(self) -> bool:
        """A stop is requested or reported: vCPUs are parking or parked."""
        return self._stop_event is not None or self._stopped or self._ending

    # --- stops --------------------------------------------------------------------------

    def _kick_locked(self, slots) -> None:
        me = threading.current_thread()  # a vCPU stopping the machine is not in KVM_RUN: no signal to itself
        for slot in slots:
            slot.vcpu.run.immediate_exit = 1
            t = slot.thread
            if not slot.parked and t is not None and t is not me and t.ident is not None and t.is_alive():
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pthread_kill(t.ident, KICK_SIGNAL)

    @staticmethod
    def _all_parked(slots) -> bool:
        return all(slot.parked or not slot.online for slot in slots)

    def _maybe_post_locked(self) -> None:
        if self._stop_event is not None and self._all_parked(self.vcpus):
            for slot in self.vcpus:
                slot.vcpu.run.immediate_exit = 0
            ev, self._stop_event = self._stop_event, None
            self._stopped = True
            self._stops_posted += 1
            self._stopped_at = time.monotonic()
            self.target.post_stop(ev)

    def request_stop(self, event, keep_if_busy: Callable | None = None) -> bool:
        """Stop every vCPU, then report ``event`` to the debugger.

        If a stop is already under way, or the machine is already stopped,
        the first event wins; ``keep_if_busy`` is called with ours (under the
        lock, so nothing can interleave) so the caller may keep it for later
        (events that will not happen again). True when ours won.
        """
        with self._cond:
            if self._ending:
                return False
            if self._stop_event is not None or self._stopped:
                if keep_if_busy is not None:
                    keep_if_busy(event)
                return False
            self._stop_event = event
            for slot in self.vcpus:
                slot.runnable = False
            self._kick_locked(self.vcpus)
            self._maybe_post_locked()
            return True

    def run_vcpus(self, which: dict[int, bool]) -> None:
        """Let the listed vCPU indexes run (the debug target has already
        applied their debug state)."""
        with self._cond:
            if self._ending:
                return
            self._stopped = False
            self._generation += 1  # wakes idle (halted) vCPUs: a debugger resumed them
            self._count_held_time_locked()
            for slot in self.vcpus:
                slot.vcpu.run.immediate_exit = 0
                slot.runnable = slot.online and which.get(slot.vcpu.index, False)
            if not any(slot.runnable for slot in self.vcpus):
                self._stopped = True
            self._cond.notify_all()

    def _count_held_time_locked(self) -> None:
        if self._stopped_at is not None:
            held, self._stopped_at = time.monotonic() - self._stopped_at, None
            self.guest_was_held(held)

    # --- exclusive turns ----------------------------------------------------------------

    def quiesced(self):
        """Park every vCPU for the body when the guest is running (for
        changes that must not happen under a running vCPU: memory slots,
        vCPU ioctls, which would block until KVM_RUN returns); nothing to
        do when the machine is already stopped."""
        if self._stopped or self._ending:
            return contextlib.nullcontext()
        return self.exclusive(None)

    @contextlib.contextmanager
    def exclusive(self, v):
        """Run the body with every other vCPU parked: for the debug target's
        one-instruction steps with a watched page briefly mapped (changing
        memory slots under a running vCPU can make PVM shut the guest down,
        and the others must not touch the page unwatched meanwhile). A vCPU
        waiting here counts as parked, so two of them cannot deadlock.
        Yields False (body must do nothing) when a debug stop came first."""
        me = self.vcpus[v.index] if v is not None else None
        others = [s for s in self.vcpus if s is not me]
        with self._cond:
            stops_before = self._stops_posted
            if me is not None:
                me.parked = True
                self._maybe_post_locked()
                self._cond.notify_all()
            while self._exclusive is not None and not self._ending:
                self._cond.wait()
            if me is not None:
                me.parked = False
                # While we waited (counted as parked) a debug stop may have
                # been reported and the debugger may have changed breakpoints,
                # registers or memory: the vCPU must re-run the instruction.
                if (self._stops_posted != stops_before or self._stop_event is not None
                        or self._stopped or not me.runnable or self._ending):
                    yield False
                    return
            self._exclusive = me or True
            saved = {id(s): s.runnable for s in others}
            for s in others:
                s.runnable = False
            self._kick_locked(others)
            while not self._all_parked(others) and not self._ending:
                self._cond.wait()
        try:
            yield True
        finally:
            with self._cond:
                self._exclusive = None
                if self._stop_event is None and not self._stopped and not self._ending:
                    for s in others:
                        s.vcpu.run.immediate_exit = 0
                        s.runnable = saved[id(s)]
                self._cond.notify_all()

    # --- vCPU threads -------------------------------------------------------------------

    def _park(self, slot: VcpuSlot) -> bool:
        """Wait until this vCPU may run; False when the VM is ending. A
        vCPU offered the debugger serves it from here once the machine is
        stopped (see the module docstring)."""
        with self._cond:
            if slot.runnable and not self._ending:
                slot.parked = False
                return True
            slot.parked = True
            self._maybe_post_locked()
            self._cond.notify_all()
            while not slot.runnable and not self._ending:
                if self._offered_to == slot.vcpu.index and self._stopped and not self._serving:
                    self._serve_debugger(slot)
                    continue
                self._cond.wait()
            slot.parked = False
            return not self._ending

    # --- the debugger served from a parked vCPU's thread ---------------------------------

    def offer_debugger(self, index: int, server: Callable[[int], bool]) -> None:
        """Let vCPU ``index`` serve the debugger when it next parks with the
        machine stopped: ``server(index)`` runs in its thread and returns
        True to keep the offer (it started this vCPU's own step, so it will
        serve the stop that ends it), False to give the debugger back."""
        with self._cond:
            self._offered_to, self._debugger_server = index, server
            self._cond.notify_all()  # the vCPU may have parked already

    def withdraw_debugger(self) -> bool:
        """Take back an offer no vCPU has taken yet: True when withdrawn,
        False while a vCPU's thread is serving (wait for it to give back)."""
        with self._cond:
            if self._serving:
                return False
            self._offered_to = None
            return True

    def _serve_debugger(self, slot: VcpuSlot) -> None:
        """Called with the lock held, returns with it held."""
        self._serving = True
        server = self._debugger_server
        keep = False
        self._cond.release()
        try:
            keep = server(slot.vcpu.index)
        finally:
            self._cond.acquire()
            self._serving = False
            if not keep:
                self._offered_to = None

    def idle(self, slot: VcpuSlot) -> None:
        """A vCPU halted with nothing to wake it (no interrupt controller):
        it waits, counted as parked, until a debugger resumes the machine
        (then it runs on past the halt)."""
        with self._cond:
            slot.parked = True
            self._maybe_post_locked()
            generation = self._generation
            while slot.runnable and generation == self._generation and not self._ending:
                self._cond.wait()
            slot.parked = False

    def _vcpu_loop(self, slot: VcpuSlot) -> None:
        v = slot.vcpu
        try:
            while self._park(slot):
                if v.enter():
                    self.handle_exit(slot)
        except Exception as e:  # a bug or a dead fd: end the VM, loudly
            if not self._ending:
                self.end(1, f"vCPU {v.index} thread failed: {type(e).__name__}: {e}")
        finally:
            with self._cond:
                slot.parked = True
                self._maybe_post_locked()
                self._cond.notify_all()

    def handle_exit_of(self, v) -> None:
        """Handle the exit ``v`` just took (for the debug target's nested
        KVM_RUN while it completes an emulated access or a step)."""
        self.handle_exit(self.vcpus[v.index])
