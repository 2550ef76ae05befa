#!/usr/bin/env python3
"""Record a stub's replies to one gdb script, then answer gdb with them: the floor.

Why: a gdb ``stepi`` costs gdb's own work plus one round trip per packet it
sends. A stub that answers every packet at once with the bytes a real stub
sent for the same script (same packets, same replies, so gdb takes the same
path) measures that sum: no stub can be faster through stock gdb. The
benchmark (``bench/gdb_ops.py``) reports vmscope's rates over this floor.

- :class:`Recorder` is a TCP proxy between gdb and a real stub that keeps
  every packet gdb sends and every frame the stub returns, in order.
- ``python bench/rsp_replay.py serve PORT LOG`` answers the n-th packet
  with the frames recorded after the n-th request, from one thread with
  precomputed bytes: one ``recv`` and one ``send`` per packet; like vmscope's
  stub it polls for the next request for ``VMSCOPE_STUB_POLL_US`` (300 us),
  yielding the CPU between tries as the stub does, before it sleeps, so
  the floor stays below the stub. A request that differs from the
  recording (it should not happen) is looked up by its payload instead
  and counted in a ``mismatches=`` line on stderr.

The log is pickled ``[(request payload, [raw reply frames]), ...]``; acks
(``+``) are not recorded: the replay sends one per packet until gdb's
``QStartNoAckMode`` is answered, as the recorded stub did.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import sys
import threading
import time
from pathlib import Path


def _frames(buf: bytearray) -> list[bytes]:
    """Whole ``$...#cc`` / ``%...#cc`` frames at the start of ``buf`` (removed
    from it); acks, 0x03 and noise between frames are dropped."""
    out = []
    i = 0
    while True:
        start = min((p for p in (buf.find(b"$", i), buf.find(b"%", i)) if p >= 0), default=-1)
        if start < 0:
            del buf[:]
            return out
        end = buf.find(b"#", start + 1)
        if end < 0 or end + 3 > len(buf):
            del buf[:start]
            return out
        out.append(bytes(buf[start : end + 3]))
        i = end + 3


def payload(frame: bytes) -> bytes:
    """The payload of a frame as sent (escapes and RLE kept: gdb's requests
    use neither in practice, and equal frames are what matters here)."""
    return frame[1:-3]


class Recorder:
    """A proxy on ``listen_port`` to the stub on ``target_port``: run gdb
    against it once, then :meth:`log` is what :func:`serve` replays."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.listener = socket.socket()
        self.listener.bind((host, 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self._events: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=self._pump, args=(server, client, "rep"), daemon=True)
        t.start()
        self._pump(client, server, "req")
        t.join(5)

    def _pump(self, src: socket.socket, dst: socket.socket, kind: str) -> None:
        buf = bytearray()
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                # record before forwarding: the reply cannot overtake its request
                buf += data
                frames = _frames(buf)
                with self._lock:
                    self._events.extend((kind, f) for f in frames)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def log(self) -> list[tuple[bytes, list[bytes]]]:
        """[(request payload, reply frames sent after it)], in order."""
        self._thread.join(10)
        out: list[tuple[bytes, list[bytes]]] = []
        with self._lock:
            for kind, frame in self._events:
                if kind == "req":
                    out.append((payload(frame), []))
                elif out:
                    out[-1][1].append(frame)
        return out


#: poll for the next request this long before sleeping, as vmscope's stub does (its VMSCOPE_STUB_POLL_US)
POLL_WINDOW = float(os.environ.get("VMSCOPE_STUB_POLL_US", "300")) / 1e6


def _poll_then_wait(conn: socket.socket, rbuf: bytearray) -> int:
    """The next read: polled for POLL_WINDOW, as the stub polls, so the
    floor never pays a wake-up the stub does not; then a sleeping wait.
    Each empty try yields the CPU (``sched_yield``), as the stub's poll
    does: a tight spin fell below the stub itself when another process
    kept one of the two CPUs busy (1,361 against the stub's 1,589 stepi/s;
    2,018 with the yield; docs/performance.md, item 13)."""
    fd = conn.fileno()
    deadline = time.perf_counter() + POLL_WINDOW
    while True:
        try:
            return os.readv(fd, [rbuf])
        except BlockingIOError:
            if time.perf_counter() >= deadline:
                select.select([conn], [], [])
                deadline = time.perf_counter() + POLL_WINDOW
            else:
                os.sched_yield()


def _send_all(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view):]
        except BlockingIOError:
            select.select([], [conn], [])


def serve(port: int, log: list[tuple[bytes, list[bytes]]], ready=None) -> int:
    """Answer one gdb connection from ``log``; returns the mismatch count."""
    replies = [b"".join(frames) for _, frames in log]
    by_payload = {}
    for (req, _), rep in zip(log, replies):
        by_payload.setdefault(req, rep)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    if ready is not None:
        ready()
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    rbuf = bytearray(1 << 20)
    n = mismatches = 0
    ack = True
    conn.setblocking(False)
    try:
        while True:
            k = _poll_then_wait(conn, rbuf)
            if not k:
                break
            buf += rbuf[:k]
            out = []
            for frame in _frames(buf):
                req = payload(frame)
                if n < len(log) and log[n][0] == req:
                    rep = replies[n]
                else:
                    mismatches += 1
                    rep = by_payload.get(req, b"$#00")
                n += 1
                out.append(b"+" + rep if ack else rep)
                if req == b"QStartNoAckMode":
                    ack = False
            if out:
                _send_all(conn, b"".join(out))
    except OSError:
        pass
    finally:
        conn.close()
        listener.close()
    return mismatches


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "serve":
        print("usage: rsp_replay.py serve PORT LOG", file=sys.stderr)
        return 2
    log = pickle.loads(Path(argv[2]).read_bytes())
    mismatches = serve(int(argv[1]), log, ready=lambda: print("ready", flush=True))
    print(f"mismatches={mismatches}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
