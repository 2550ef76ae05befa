"""The GDB stub: a session per debugger over any :class:`Target`.

``serve(target, host, port)`` starts one in a thread; see
:mod:`vmscope.gdbserver.target` for the interface a target implements.
"""

from vmscope.gdbserver.session import Session  # noqa: F401
from vmscope.gdbserver.target import StopEvent, Target, TargetError  # noqa: F401
from vmscope.gdbserver.transport import GdbServer, parse_address, serve  # noqa: F401
