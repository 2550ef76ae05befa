"""The GDB Remote Serial Protocol, sans I/O: shared by the stub and the client.

- :mod:`vmscope.rsp.framing`: bytes <-> packets, acks, interrupts.
- :mod:`vmscope.rsp.packets`: typed requests (parsed and encoded) and replies.
- :mod:`vmscope.rsp.stops`: :class:`StopEvent`, why a target stopped.
"""

# Lazy, as vmscope.gdbserver's: every target imports vmscope.rsp.stops, and
# that must not load the framing and packet code when no debugger is wanted.
_EXPORTS = {
    **{name: "vmscope.rsp.framing" for name in (
        "Ack", "BadPacket", "Endpoint", "Event", "FramingError", "Interrupt", "Nack", "Notification", "Packet",
        "checksum", "frame")},
    **{name: "vmscope.rsp.packets" for name in ("ProtocolError", "parse_request", "parse_stop_reply")},
    "StopEvent": "vmscope.rsp.stops",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
