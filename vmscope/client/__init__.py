"""The debugger side: an RSP client for any GDB stub, plus memory helpers
that bypass the protocol when the VM's RAM can be mapped directly."""

from vmscope.client.client import (Client, Features, MemoryReadError, StubError,  # noqa: F401
                                   TargetExited, TargetRunning, TargetStopped, Unsupported)
from vmscope.client.transport import BadReply, ConnectionLost, NotAGdbStub, StubBusy, StubTimeout  # noqa: F401

__all__ = ["BadReply", "Client", "ConnectionLost", "Features", "MemoryReadError", "NotAGdbStub", "StubBusy", "StubError",
           "StubTimeout", "TargetExited", "TargetRunning", "TargetStopped", "Unsupported"]
