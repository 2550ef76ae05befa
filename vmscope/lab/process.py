"""The host's side of the lab agent's protocol (see :mod:`vmscope.lab.agent`):
one command in L1 as a :class:`LabProcess`, its end as a :class:`LabResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import socket
import struct
import threading
import time
from typing import Callable

FRAME = struct.Struct(">cI")


class LabError(Exception):
    """The lab failed to boot, died, or a command could not be run."""


class LabTimeout(LabError):
    """A command or the boot did not finish in time. ``result`` holds what
    the command printed before it was killed (None for a boot timeout)."""

    def __init__(self, message: str, result: "LabResult | None" = None) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class LabResult:
    """What a finished command left behind."""

    cmd: str | list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> "LabResult":
        """Raise :class:`LabError` with the output if the command failed."""
        if self.returncode != 0:
            raise LabError(f"lab command {self.cmd!r} exited with {self.returncode}\n"
                           f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")
        return self


class LabProcess:
    """A command running in the lab (see :meth:`Lab.spawn`).

    Output is collected in the background; :attr:`stdout` / :attr:`stderr`
    show what arrived so far.
    """

    def __init__(self, sock: socket.socket, cmd: str | list[str],
                 on_output: Callable[[str, bytes], None] | None = None,
                 post_mortem: Callable[[], str] | None = None,
                 lab_check: Callable[[], str] | None = None) -> None:
        self.cmd = cmd
        # says how the lab itself fared when the agent's connection drops:
        # a lost connection alone does not tell a dead L1 from a killed agent
        self._post_mortem = post_mortem
        # asked when the command timed out: empty while the lab still starts
        # commands, else why not (a wedged or dead L1 is not the command's fault)
        self._lab_check = lab_check
        self.pid: int | None = None
        self.returncode: int | None = None
        self._sock = sock
        self._out = bytearray()
        self._err = bytearray()
        self._error = ""
        self._on_output = on_output
        self._done = threading.Event()
        self._started = threading.Event()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"lab-cmd-{cmd!r:.30}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= FRAME.size:
                    kind, size = FRAME.unpack_from(buf)
                    if len(buf) < FRAME.size + size:
                        break
                    payload = buf[FRAME.size:FRAME.size + size]
                    buf = buf[FRAME.size + size:]
                    self._frame(kind, payload)
        except OSError:
            pass
        finally:
            if self.returncode is None:
                self._error = self._error or "connection to the lab agent was lost"
                self.returncode = -255
            self._started.set()
            with self._changed:
                self._done.set()
                self._changed.notify_all()
            with contextlib.suppress(OSError):
                self._sock.close()

    def _frame(self, kind: bytes, payload: bytes) -> None:
        if kind == b"p":
            self.pid = int(payload)
            self._started.set()
        elif kind in (b"o", b"e"):
            (self._out if kind == b"o" else self._err).extend(payload)
            if self._on_output:
                self._on_output("stdout" if kind == b"o" else "stderr", payload)
        elif kind == b"!":
            self._error = payload.decode(errors="replace")
            self._err.extend(payload + b"\n")
        elif kind == b"x":
            self.returncode = int(payload)
        with self._changed:
            self._changed.notify_all()

    def _lost(self) -> str:
        """Why the command's connection ended without an exit status, with
        the lab's own account when there is one."""
        return self._error + (self._post_mortem() if self._post_mortem else "")

    @property
    def stdout(self) -> str:
        return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    def poll(self) -> int | None:
        return self.returncode if self._done.is_set() else None

    def _send(self, msg: dict) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(json.dumps(msg).encode() + b"\n")

    def write(self, text: str) -> None:
        """Send text to the command's stdin."""
        self._send({"stdin": text})

    def close_stdin(self) -> None:
        self._send({"eof": True})

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the command's process group inside L1."""
        self._send({"signal": int(signum)})

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> LabResult:
        """Wait for the command to end; on timeout kill it and raise
        :class:`LabTimeout` carrying the partial output."""
        if not self._done.wait(timeout):
            self.kill()
            self._done.wait(10)
            raise LabTimeout(f"lab command {self.cmd!r} did not finish in {timeout} s"
                             f"{self._lab_state()}", self.result())
        if self._error and self.returncode == -255:
            raise LabError(f"lab command {self.cmd!r}: {self._lost()}")
        return self.result()

    def wait_for_output(self, pattern: str, timeout: float, stream: str = "any") -> re.Match:
        """Wait until ``pattern`` (a regex) appears in the output so far."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                texts = {"stdout": self.stdout, "stderr": self.stderr}
                for name, text in texts.items():
                    if stream in ("any", name):
                        m = rx.search(text)
                        if m:
                            return m
                left = deadline - time.monotonic()
                if self._done.is_set() and self.returncode == -255 and self._error:
                    raise LabError(f"{pattern!r} did not appear in the output of {self.cmd!r}: "
                                   f"{self._lost()}\n--- stdout ---\n{self.stdout[-2000:]}")
                if self._done.is_set() or left <= 0:
                    break
                self._changed.wait(min(left, 1.0))
        # asked outside the lock: the probe may take a minute, and this
        # command's reader must not wait for it
        exited = self._done.is_set()
        raise LabTimeout(
            f"{pattern!r} did not appear in the output of {self.cmd!r} "
            f"({'it exited with ' + str(self.returncode) if exited else f'{timeout} s'})"
            f"{'' if exited else self._lab_state()}"
            f"\n--- stdout ---\n{self.stdout[-2000:]}\n--- stderr ---\n{self.stderr[-2000:]}",
            self.result())

    def _lab_state(self) -> str:
        """After a timeout: whether the lab still starts commands (empty if
        so, or when there is no lab to ask)."""
        return self._lab_check() if self._lab_check else ""

    def result(self) -> LabResult:
        return LabResult(self.cmd, self.returncode if self.returncode is not None else -1,
                         self.stdout, self.stderr)

    def __enter__(self) -> "LabProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self._started.is_set() and not self._done.is_set():
            self.kill()  # a command the agent never started has nothing to kill
            self._done.wait(10)
        with contextlib.suppress(OSError):
            # shutdown, not just close: the reader thread's recv() holds the
            # socket open, and only shutdown sends the FIN that tells the agent
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
