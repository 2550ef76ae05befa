"""GDB's ``dump memory`` of guest data through vmscope's stub, on KVM and
the emulated CPU: the file holds the bytes written, chunk after chunk.

Why: the stub reads a dump's next chunk ahead while GDB decodes the last
(``Session.read_ahead``) and sends it with a checksum computed then; a
chunk answered for the wrong address, or a stale one, would show here as
bytes that differ. The data is random (no run-length encoding to hide a
shift) and spans several of GDB's 0x7fff0-byte chunks, with a short last one."""

from __future__ import annotations

import random

import pytest

from tests.support import Gdb, VmProcess, free_port, require_kvm

pytestmark = pytest.mark.e2e

#: in the demo guest's spare RAM (its segments end at 0x144000; 64 MiB mapped)
DATA_AT = 0x200000
CHUNK = 0x7FFF0  # what one of GDB's 512 KiB reads gets with vmscope's PacketSize


@pytest.mark.parametrize("accel", ["kvm", "emu"])
def test_a_dump_of_guest_data_is_the_bytes_written(tmp_path, accel):
    if accel == "kvm":
        require_kvm()
    from vmscope.guests import guest_elf

    data = random.Random(1).randbytes(5 * CHUNK + 0x1234)
    src, out = tmp_path / "src.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    vm = VmProcess("--accel", accel, "--mem", "64", gdb_port=free_port())
    gdb = Gdb(guest_elf("demo"))
    try:
        vm.wait_listening()
        gdb.cmd(f"target remote 127.0.0.1:{vm.port}")
        said = gdb.cmd(f"restore {src} binary {DATA_AT:#x}", timeout=120)
        assert "Restoring binary file" in said, gdb.transcript()
        end = DATA_AT + len(data)
        for _ in range(2):  # the second dump starts where the first one's read-ahead did not look
            gdb.cmd(f"dump binary memory {out} {DATA_AT:#x} {end:#x}", timeout=120)
            got = out.read_bytes()
            assert len(got) == len(data)
            if got != data:
                first = next(i for i in range(len(data)) if got[i] != data[i])
                raise AssertionError(f"the dump differs from byte {first:#x} (chunk {first // CHUNK}) on")
        # a write, then a dump of the chunk it is in
        gdb.cmd(f"set {{unsigned char}}{DATA_AT + CHUNK + 5:#x} = {data[CHUNK + 5] ^ 0xFF}")
        gdb.cmd(f"dump binary memory {out} {DATA_AT + CHUNK:#x} {DATA_AT + 2 * CHUNK:#x}", timeout=60)
        assert out.read_bytes()[5] == data[CHUNK + 5] ^ 0xFF
        assert out.read_bytes()[6:] == data[CHUNK + 6 : 2 * CHUNK]
        gdb.cmd("kill")
    finally:
        gdb.close()
        vm.close()
