"""QEMU's physical-memory mode (``Qqemu.PhyMemMode``) in vmscope's own stub,
on every back end: clients written for QEMU's stub read guest-physical
memory this way (``vmscope inspect --memory rsp`` from another machine,
where the VMM's RAM memfd is out of reach). The mode belongs to one
connection: the next debugger starts with virtual addresses again."""

from __future__ import annotations

import time

import pytest

from tests.support import VmProcess, elf_bytes_at, free_port, require_kvm
from vmscope.client import Client
from vmscope.client.client import MemoryReadError
from vmscope.client.helpers.rsp import RspPhysicalMemory
from vmscope.guests import guest_elf, guest_symbols

pytestmark = pytest.mark.timeout(300)


def connect(vm: VmProcess, port: int) -> Client:
    deadline = time.monotonic() + 60
    while True:
        try:
            return Client.connect(f"127.0.0.1:{port}", timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline or vm.proc.poll() is not None:
                raise AssertionError(f"vmscope run never listened:\n{vm.stderr[-2000:]}")
            time.sleep(0.1)


@pytest.mark.parametrize("accel, arch", [("kvm", "x86_64"), ("emu", "x86_64"), ("emu", "aarch64")])
def test_physical_mode_reads_and_writes_guest_physical_memory_per_connection(accel, arch):
    if accel == "kvm":
        require_kvm()
    port = free_port()
    vm = VmProcess("--accel", accel, "--arch", arch, gdb_port=port)
    elf = guest_elf("demo", arch)
    tick = guest_symbols("demo", arch)["tick"]  # the demo guests run identity-mapped: virtual = physical
    try:
        c = connect(vm, port)
        try:
            code = elf_bytes_at(elf, tick, 16)
            assert c.read_memory(tick, 16) == code
            phys = RspPhysicalMemory(c)  # probes the mode on and off
            assert phys.read(tick, 16) == code
            c.set_physical_mode(True)
            assert c.read_memory(tick, 16, physical=True) == code
            with pytest.raises(MemoryReadError):  # no RAM there: an error reply, not data
                c.read_memory(0x7FFF_FFFF_0000, 16, physical=True)
        finally:
            c.close()
        # a new connection starts in virtual mode (QEMU's mode would outlive it)
        c = connect(vm, port)
        try:
            assert c.read_memory(tick, 16) == elf_bytes_at(elf, tick, 16)
            c.set_physical_mode(True)
            c.write_memory(tick + 0x100000, b"\x5a\xa5", physical=True)  # free RAM above the image
            c.set_physical_mode(False)
            assert c.read_memory(tick + 0x100000, 2) == b"\x5a\xa5"
        finally:
            c.close()
    finally:
        vm.close()
