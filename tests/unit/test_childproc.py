"""A child started with ``die_with_parent`` ends when its parent is killed
(tests and benchmarks start VMMs and QEMU this way: a killed run must not
leave them spinning)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.support import ROOT

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from vmscope.childproc import die_with_parent
    kw = {"preexec_fn": die_with_parent} if sys.argv[1] == "tied" else {}
    child = subprocess.Popen(["sleep", "300"], **kw)
    print(child.pid, flush=True)
    time.sleep(300)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _child_after_parent_killed(mode: str) -> bool:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        return _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_tied_child_dies_with_its_killed_parent_and_an_untied_one_does_not():
    assert not _child_after_parent_killed("tied")
    assert _child_after_parent_killed("untied")  # the test can tell the difference
