"""The VMM's console: host terminal <-> the guest's serial port (COM1 or
PL011), for every back end.

When stdin is a terminal, :func:`raw_terminal` puts it in raw mode so every
key (Ctrl-C included) goes to the guest, as with ``qemu -nographic``.

Escape keys (Ctrl-A, then a letter), read by :class:`ConsoleInput`:

- ``Ctrl-A x``: quit the VMM (the guest ends, exit status 0);
- ``Ctrl-A Ctrl-A``: send one Ctrl-A to the guest.

Any other key after Ctrl-A is passed on with the Ctrl-A.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty
from typing import BinaryIO, Callable

CTRL_A = 0x01


@contextlib.contextmanager
def raw_terminal(fd: int = 0):
    """Raw mode on ``fd`` for the duration, restored even on errors; a
    no-op when ``fd`` is not a terminal."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        # keep output processing (as QEMU does): the guest's "\n" still
        # returns the cursor, instead of a staircase of lines
        attrs = termios.tcgetattr(fd)
        attrs[1] |= termios.OPOST | termios.ONLCR
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class EscapeFilter:
    """Turns console bytes into guest bytes, catching ``Ctrl-A x``."""

    def __init__(self) -> None:
        self._pending_escape = False
        self.quit = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self.quit:
                break
            if self._pending_escape:
                self._pending_escape = False
                if b in (ord("x"), ord("X")):
                    self.quit = True
                elif b == CTRL_A:
                    out.append(CTRL_A)
                else:
                    out += bytes([CTRL_A, b])
            elif b == CTRL_A:
                self._pending_escape = True
            else:
                out.append(b)
        return bytes(out)


class ConsoleInput:
    """A thread reading ``fd`` and handing bytes to ``deliver``; calls
    ``on_quit`` on ``Ctrl-A x`` (escape keys only when ``fd`` is a tty, so
    piped binary input passes through untouched)."""

    def __init__(self, fd: int, deliver: Callable[[bytes], None], on_quit: Callable[[], None]):
        self.fd = fd
        self.deliver = deliver
        self.on_quit = on_quit
        self.filter = EscapeFilter() if os.isatty(fd) else None
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="console-input", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _loop(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            if self.filter is not None:
                data = self.filter.feed(data)
            if data:
                self.deliver(data)
            if self.filter is not None and self.filter.quit:
                self.on_quit()
                return


class SerialSink:
    """What a UART transmits, written to a binary stream (stdout when None).

    Every write is flushed, so a shell prompt without a newline shows at
    once; a console that went away (closed pipe) is ignored, since it must
    not stop the guest.
    """

    def __init__(self, out: BinaryIO | None) -> None:
        self.out = out if out is not None else sys.stdout.buffer
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):
                pass

    def put(self, byte: int) -> None:
        self(bytes((byte,)))
