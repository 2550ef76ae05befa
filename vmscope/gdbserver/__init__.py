"""The GDB stub: a session per debugger over any :class:`Target`.

``serve(target, host, port)`` starts one in a thread; see
:mod:`vmscope.gdbserver.target` for the interface a target implements.
"""

# Lazy: a target module importing vmscope.gdbserver.target must not pull in
# the session and transport (and the RSP core) when no debugger is wanted.
_EXPORTS = {
    "Session": "vmscope.gdbserver.session",
    "StopEvent": "vmscope.gdbserver.target", "Target": "vmscope.gdbserver.target",
    "TargetError": "vmscope.gdbserver.target",
    "GdbServer": "vmscope.gdbserver.transport", "parse_address": "vmscope.gdbserver.transport",
    "serve": "vmscope.gdbserver.transport",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
