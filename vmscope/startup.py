"""Start-up timings for ``vmscope run``, and a notice when start-up stalls.

Why: in the nested lab a ``vmscope run`` once printed nothing for 120 s
(not even "waiting for gdb") and the next 14 starts were normal. A slow
start and a hang look the same from outside; this module tells them apart:

- ``-v`` logs each phase with its duration (Python's own start-up up to
  ``main``, the back end's imports, creating the machine, the stub, the
  vCPU threads);
- if start-up has not finished after :data:`STALL_NOTICE` seconds, one line
  on stderr says which phase it is in, whatever the verbosity, and every
  thread's Python stack follows (where it waits), so the next occurrence
  carries its own evidence.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("vmscope.startup")

#: seconds of start-up after which a notice (and the threads' stacks) go to stderr
STALL_NOTICE = float(os.environ.get("VMSCOPE_STARTUP_NOTICE", "10"))


def process_age() -> float | None:
    """Seconds since this process was created (the interpreter's start-up
    and imports before ``main``), from /proc; None where /proc lacks it."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Phases of start-up, timed; a watchdog thread reports a stall."""

    def __init__(self, notice_after: float = STALL_NOTICE, stream=None) -> None:
        self.t0 = time.monotonic()
        self.phase = ""  # before the first enter(): not logged
        self._phase_t = self.t0
        self._done = threading.Event()
        self._stream = stream
        self.timings: list[tuple[str, float]] = []
        age = process_age()
        if age is not None:
            log.info("start-up: python and imports before main: %.0f ms", age * 1000)
        if notice_after > 0:
            threading.Thread(target=self._watch, args=(notice_after,), name="startup-watch", daemon=True).start()

    def enter(self, phase: str) -> None:
        """The previous phase ended; ``phase`` begins."""
        now = time.monotonic()
        self._close(now)
        self.phase, self._phase_t = phase, now

    def _close(self, now: float) -> None:
        if not self.phase:
            return
        took = now - self._phase_t
        self.timings.append((self.phase, took))
        log.info("start-up: %s: %.0f ms", self.phase, took * 1000)

    def done(self) -> None:
        """Start-up ended (or failed); later calls do nothing."""
        if self._done.is_set():
            return
        now = time.monotonic()
        self._close(now)
        self._done.set()
        log.info("start-up: ready after %.0f ms", (now - self.t0) * 1000)

    def _watch(self, after: float) -> None:
        if self._done.wait(after):
            return
        import faulthandler

        stream = self._stream or sys.stderr
        print(f"vmscope: start-up is slow: {time.monotonic() - self.t0:.0f} s so far, now {self.phase or 'starting'}; "
              "where each thread waits:", file=stream, flush=True)
        try:
            faulthandler.dump_traceback(file=stream, all_threads=True)
        except (ValueError, OSError, AttributeError):  # a stream without a file descriptor
            pass
        stream.flush()
