"""Console output through KVM's coalesced port writes, on the real /dev/kvm.

The character writes of a guest that polls the line status are queued in
KVM (no exit each) and replayed in order at the next exit or by the drain
thread; see vmscope.kvm.devices.coalesced.
"""

from __future__ import annotations

import pytest

from tests.kvm_support import SerialSink, make_machine, tiny_guest

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

N = 20000
# 32-bit: mov $N,%ecx; L: wait for LSR.THRE; out ((ecx & 0x3f) + '0') to THR; dec %ecx; jnz L; exit 0
PATTERN = bytes.fromhex("b9" + N.to_bytes(4, "little").hex() + "66bafd03eca82074f7"
                        "66baf80388c8243f0430ee4975e9" "b000e6f4f4")
# writes "hi\n" to THR without polling, then spins: no exit ever follows
PRINT_THEN_SPIN = bytes.fromhex("66baf803" "b068ee" "b069ee" "b00aee" "ebfe")


def test_polled_output_is_complete_in_order_and_mostly_without_exits(tmp_path):
    out = SerialSink()
    m = make_machine(kernel=tiny_guest(tmp_path, PATTERN), serial_out=out)
    try:
        if m.coalesced is None:
            pytest.fail("this KVM does not coalesce port writes (KVM_CAP_COALESCED_PIO)")
        m.start()
        assert m.wait(100) == 0
    finally:
        m.shutdown()
    expected = bytes(((c & 0x3F) + 0x30) for c in range(N, 0, -1))
    assert bytes(out.data) == expected
    assert m.coalesced.replayed > N // 2  # the writes came through the ring


def test_output_followed_by_no_exit_still_appears(tmp_path):
    out = SerialSink()
    m = make_machine(kernel=tiny_guest(tmp_path, PRINT_THEN_SPIN), serial_out=out)
    try:
        m.start()
        assert out.wait_for(b"hi\n", 30), bytes(out.data)
    finally:
        m.shutdown()
