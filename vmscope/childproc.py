"""Child processes that die with the process that started them.

Why: a test run or a benchmark killed from outside (a CI timeout, Ctrl-C
twice, SIGKILL) runs no clean-up, and a ``vmscope run --gdb`` or QEMU it
started would go on spinning a host CPU, holding its port and its guest
RAM. ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL to the child instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1

# Looked up once, in the parent: the child between fork and exec should do
# no more than call it (a dlopen there could wait on a loader lock another
# thread of the parent held at the fork).
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def die_with_parent() -> None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: in the child before
    exec, ask for SIGKILL when the parent dies. Linux ties this to the
    starting *thread*: start such children from a thread that outlives them
    (the main thread does). Best effort: without ``prctl`` nothing changes."""
    if _prctl is not None:
        with contextlib.suppress(Exception):
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
