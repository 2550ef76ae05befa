"""The command agent that runs inside the lab's L1 guest (standard library only).

Why a TCP agent and not the serial console: the console carries kernel
messages and the shell's echo, so exit codes and binary output would have to
be fished out of a shared byte stream. One TCP connection per command (through
QEMU's user-mode ``hostfwd``) keeps outputs, exit codes and concurrent
commands apart.

Protocol, per connection:

- host -> agent: one JSON line ``{"cmd": "shell text" | [argv...], "env": {...},
  "cwd": "/path"}``, then any number of JSON lines ``{"stdin": "text"}``,
  ``{"eof": true}`` (close the command's stdin) or ``{"signal": 15}`` (sent to
  the command's process group).
- agent -> host: frames of one type byte, a 4-byte big-endian length and the
  payload: ``p`` the pid, ``o`` stdout bytes, ``e`` stderr bytes, ``!`` an
  error text (the command could not start), then ``x`` the exit status as
  decimal text (negative: killed by that signal). The agent closes the
  connection after ``x``.

If the host goes away, the command's process group is killed.

This file is run as a script (``python3 agent.py``), not imported as part of
the package, so it starts without importing vmscope's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

FRAME = struct.Struct(">cI")


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes) -> None:
        with self.lock:
            try:
                self.sock.sendall(FRAME.pack(kind, len(payload)) + payload)
            except OSError:
                pass


def _pump(stream, conn: _Conn, kind: bytes) -> None:
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            return
        conn.send(kind, chunk)


def _control(sock_file, proc: subprocess.Popen, gone: threading.Event) -> None:
    """Apply the host's control lines; the host closing the socket kills the command."""
    try:
        for line in sock_file:
            msg = json.loads(line)
            if "signal" in msg:
                try:
                    os.killpg(proc.pid, int(msg["signal"]))
                except ProcessLookupError:
                    pass
            if "stdin" in msg and proc.stdin:
                try:
                    proc.stdin.write(msg["stdin"].encode())
                    proc.stdin.flush()
                except (BrokenPipeError, ValueError):
                    pass
            if msg.get("eof") and proc.stdin:
                try:
                    proc.stdin.close()
                except (BrokenPipeError, ValueError):
                    pass
    except (OSError, ValueError):
        pass
    if not gone.is_set():  # host vanished before the command ended
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def handle(sock: socket.socket) -> None:
    conn = _Conn(sock)
    sock_file = sock.makefile("rb")
    try:
        request = json.loads(sock_file.readline() or b"{}")
        cmd = request["cmd"]
        env = dict(os.environ)
        env.update(request.get("env") or {})
        proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), cwd=request.get("cwd"), env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except Exception as exc:  # report any failure to start to the host
        conn.send(b"!", f"{type(exc).__name__}: {exc}".encode())
        conn.send(b"x", b"127")
        sock.close()
        return
    conn.send(b"p", str(proc.pid).encode())
    gone = threading.Event()
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, conn, b"o"), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, conn, b"e"), daemon=True)]
    for t in pumps:
        t.start()
    threading.Thread(target=_control, args=(sock_file, proc, gone), daemon=True).start()
    status = proc.wait()
    gone.set()
    for t in pumps:
        t.join()
    conn.send(b"x", str(status).encode())
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=7100)
    ap.add_argument("--ready-marker", default="vmscope-lab-ready")
    args = ap.parse_args(argv)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(16)
    print(f"{args.ready_marker} port={args.port}", flush=True)
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
