"""The GDB Remote Serial Protocol, sans I/O: shared by the stub and the client.

- :mod:`vmscope.rsp.framing`: bytes <-> packets, acks, interrupts.
- :mod:`vmscope.rsp.packets`: typed requests and reply formatting.
"""

from vmscope.rsp.framing import (  # noqa: F401
    Ack, BadPacket, Endpoint, Event, FramingError, Interrupt, Nack, Notification, Packet, checksum, frame,
)
from vmscope.rsp.packets import ProtocolError, parse_request, parse_stop_reply  # noqa: F401
