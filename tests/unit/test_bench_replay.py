"""The benchmark's floor: a recorded conversation replays byte for byte.

bench/gdb_ops.py divides vmscope's rates by the rates gdb reaches against
bench/rsp_replay.py, so the replay must answer every packet with exactly
the frames the real stub sent, in ack mode and after QStartNoAckMode.
"""

from __future__ import annotations

import socket
import threading

from bench.rsp_replay import Recorder, serve
from vmscope.rsp.framing import frame


def _stub(listener: socket.socket) -> None:
    """A tiny stub: acks until no-ack mode, answers each packet with its reversal."""
    conn, _ = listener.accept()
    ack, buf = True, b""
    with conn:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"#" in buf and len(buf) >= buf.index(b"#") + 3:
                start, end = buf.index(b"$"), buf.index(b"#")
                payload, buf = buf[start + 1 : end], buf[end + 3 :]
                conn.sendall((b"+" if ack else b"") + frame(b"OK" if payload == b"QStartNoAckMode" else payload[::-1]))
                if payload == b"QStartNoAckMode":
                    ack = False


def _client(port: int, packets: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = b""
        for p in packets:
            s.sendall(frame(p))
            want = frame(b"OK" if p == b"QStartNoAckMode" else p[::-1])
            while want not in got:
                got += s.recv(4096)
        return got


def test_recorded_replies_replay_identically():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    threading.Thread(target=_stub, args=(listener,), daemon=True).start()
    packets = [b"qSupported", b"QStartNoAckMode", b"m100000,40", b"vCont;s:1;c", b"qXfer:threads:read::0,1000"]
    rec = Recorder(listener.getsockname()[1])
    live = _client(rec.port, packets)
    log = rec.log()
    assert [req for req, _ in log] == packets
    assert b"".join(b"".join(frames) for _, frames in log) == live.replace(b"+", b"")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(serve(port, log, ready=ready.set)), daemon=True)
    t.start()
    assert ready.wait(10)
    assert _client(port, packets) == live  # the same bytes, acks included
    t.join(10)
    assert result == [0]  # no request differed from the recording
