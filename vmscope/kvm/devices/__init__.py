"""Devices of the micro-VMM. Today everything is port I/O on a
:class:`~vmscope.kvm.devices.bus.PortBus`; MMIO devices join when the
Linux-guest issue needs them."""

from vmscope.kvm.devices.bus import PortBus, PortDevice

__all__ = ["PortBus", "PortDevice"]
