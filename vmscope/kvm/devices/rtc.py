"""The CMOS real-time clock at ports 0x70 (index) / 0x71 (data).

Reads give the host's current UTC time in BCD, 24-hour mode, with the
update-in-progress bit never set: Linux (and firmware-style code) spins on
UIP before reading the clock, and an absent chip reads 0xff, UIP set, which
made a prototype VMM take 40,000 exits in that loop. Other CMOS bytes keep
what the guest writes.
"""

from __future__ import annotations

import time

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
STATUS_B_24H = 0x02
STATUS_D_VALID = 0x80


def bcd(n: int) -> int:
    return ((n // 10) << 4) | (n % 10)


class CmosRtc:
    def __init__(self, clock=time.time):
        self.clock = clock
        self.index = 0
        self.ram = bytearray(128)
        self.ram[STATUS_A] = 0x26  # 32.768 kHz base, 1024 Hz rate, UIP clear
        self.ram[STATUS_B] = STATUS_B_24H
        self.ram[STATUS_D] = STATUS_D_VALID

    def _time_register(self, reg: int) -> int | None:
        t = time.gmtime(self.clock())
        binary = bool(self.ram[STATUS_B] & 0x04)
        fields = {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
                  DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}
        if reg not in fields:
            return None
        v = fields[reg]
        return v if binary else bcd(v)

    def read(self, port: int, size: int) -> int:
        if port == 0x70:
            return self.index
        reg = self.index
        value = self._time_register(reg)
        if value is not None:
            return value
        if reg == STATUS_A:
            return self.ram[STATUS_A] & 0x7F
        if reg == STATUS_C:
            return 0  # no interrupt flags: vmscope's clock raises no IRQ 8
        return self.ram[reg]

    def write(self, port: int, size: int, value: int) -> None:
        if port == 0x70:
            self.index = value & 0x7F  # bit 7 is the NMI mask
        elif self.index not in (STATUS_C, STATUS_D):
            self.ram[self.index] = value & 0xFF
