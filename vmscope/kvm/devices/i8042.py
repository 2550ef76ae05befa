"""Just enough of the i8042 keyboard controller to reboot a PC.

Linux's keyboard-controller reboot waits for the input buffer to drain
(status port 0x64, bit 1) and then writes command 0xFE (pulse the reset
line). The status port reads 0 (nothing pending, nothing to read); 0xFE
asks the reset ports to end the machine. There is no keyboard: the FADT
says there is no 8042, so Linux's i8042 driver does not probe.
"""

from __future__ import annotations

CMD_PULSE_RESET = 0xFE


class I8042:
    def __init__(self, reset, data_port: bool):
        self.reset = reset
        self.data_port = data_port

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        if not self.data_port and value & 0xFF == CMD_PULSE_RESET:
            self.reset.reset("keyboard controller reset (0x64 <- 0xfe)")
