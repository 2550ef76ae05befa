"""The RSP framing core, on bytes alone."""

import pytest
from hypothesis import given, strategies as st

from vmscope.rsp.framing import (
    Ack, BadPacket, Endpoint, Interrupt, Nack, Notification, Packet, checksum, decode, escape, frame, hex_rle, rle_encode,
)


def test_frame_known_packet():
    # GDB's own example: the checksum of "OK" is 0x9a
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"") == b"$#00"


@given(st.binary(min_size=2000, max_size=9000)
       | st.builds(lambda byte, n: bytes([byte]) * n, st.integers(0, 255), st.integers(2040, 70000)))
def test_the_checksum_of_a_long_body_is_the_sum_of_its_bytes(body):
    """Long bodies are summed through adler32 in 256-byte chunks: any
    content, any length (a partial last chunk, 0xff runs at the largest
    chunk sum) gives the plain sum modulo 256, and a frame gdb would check."""
    assert checksum(body) == sum(body) & 0xFF
    assert frame(hex_rle(body)).endswith(b"#%02x" % (sum(bytes(hex_rle(body))) & 0xFF))


def test_escapes_reserved_bytes():
    raw = b"a$b#c}d*e"
    body = escape(raw)
    assert b"$" not in body and b"#" not in body and b"*" not in body
    assert decode(body) == raw


def test_rle_decoding_gdb_example():
    # "0* " means '0' followed by 3 more '0's (' ' is 32 = 3 + 29)
    assert decode(b"0* ") == b"0000"


def test_receive_acks_valid_packet_and_nacks_bad_checksum():
    ep = Endpoint()
    events = ep.receive(b"$g#67")
    assert events == [Packet(b"g")]
    assert ep.data_to_send() == b"+"
    events = ep.receive(b"$g#00")
    assert isinstance(events[0], BadPacket)
    assert ep.data_to_send() == b"-"


def test_packet_split_across_reads():
    ep = Endpoint()
    wire = frame(b"m1000,40")
    events = []
    for i in range(len(wire)):
        events += ep.receive(wire[i : i + 1])
    assert events == [Packet(b"m1000,40")]


def test_interrupt_ack_and_noise():
    ep = Endpoint()
    assert ep.receive(b"+\x03garbage-") == [Ack(), Interrupt(), Nack()]


def test_retransmit_on_nack():
    ep = Endpoint()
    ep.send(b"OK")
    assert ep.data_to_send() == b"$OK#9a"
    ep.receive(b"-")
    assert ep.data_to_send() == b"$OK#9a"


def test_no_ack_mode_sends_no_acks():
    ep = Endpoint()
    ep.disable_acks()
    assert ep.receive(b"$?#3f") == [Packet(b"?")]
    assert ep.data_to_send() == b""


def test_notification():
    ep = Endpoint()
    assert ep.receive(b"%Stop:T05#" + b"%02x" % checksum(b"Stop:T05")) == [Notification(b"Stop:T05")]
    assert ep.data_to_send() == b""  # notifications are not acked


def test_dangling_escape_is_a_bad_packet():
    ep = Endpoint()
    body = b"X0,1:}"
    (ev,) = ep.receive(b"$" + body + b"#%02x" % checksum(body))
    assert isinstance(ev, BadPacket) and "escape" in ev.reason


@given(st.binary(max_size=600), st.booleans())
def test_frame_roundtrip(payload, rle):
    ep = Endpoint()
    assert ep.receive(frame(payload, rle=rle)) == [Packet(payload)]


def test_rle_shrinks_zeroed_memory():
    hex_zeros = bytes(4096).hex().encode()
    enc = rle_encode(hex_zeros)
    assert len(enc) < len(hex_zeros) // 20
    assert decode(enc) == hex_zeros


@given(st.binary(max_size=300) | st.builds(lambda a, n, b: a + bytes(n) + b, st.binary(max_size=20),
                                          st.integers(0, 600), st.binary(max_size=20)).map(lambda d: d.hex().encode()))
def test_rle_never_expands_and_roundtrips(payload):
    body = escape(payload)
    enc = rle_encode(body)
    assert len(enc) <= len(body)
    assert decode(enc) == payload
    assert b"$" not in enc and b"#" not in enc


_PAGES = st.sampled_from([bytes(4096), b"\xff" * 4096, bytes(4095) + b"\x01", b"\x00\xff" * 2048])


@given(st.binary(max_size=40), st.lists(_PAGES | st.binary(max_size=5000), max_size=6), st.binary(max_size=40))
def test_hex_rle_memory_reply_decodes_to_the_hex_of_the_memory(head, middle, tail):
    # memory replies are encoded in one pass (zero and 0xff pages precomputed);
    # what the debugger decodes must be exactly the hex of the bytes read
    data = head + b"".join(middle) + tail
    enc = hex_rle(data)
    assert decode(enc) == data.hex().encode()
    assert b"$" not in enc and b"#" not in enc and b"}" not in enc
    assert Endpoint().receive(frame(enc)) == [Packet(data.hex().encode())]


def test_hex_rle_shrinks_zero_pages_like_rle_encode():
    data = bytes(64 * 4096)
    assert len(hex_rle(data)) <= len(rle_encode(data.hex().encode())) * 1.01


@given(st.lists(st.binary(max_size=80), max_size=5), st.integers(1, 7))
def test_stream_of_packets_any_chunking(payloads, chunk):
    wire = b"".join(frame(p) for p in payloads)
    ep = Endpoint()
    got = []
    for i in range(0, len(wire), chunk):
        got += [e.payload for e in ep.receive(wire[i : i + chunk]) if isinstance(e, Packet)]
    assert got == payloads


@given(st.binary(max_size=400))
def test_garbage_never_raises(data):
    ep = Endpoint()
    ep.receive(data)
    ep.data_to_send()


# --- '-' never puts a reply out of step (GDB sends '-' when its remotetimeout
# expires while the stub is still working, in no-ack mode too) ---------------


def test_no_ack_mode_ignores_nack():
    ep = Endpoint()
    ep.disable_acks()
    ep.send(b"F3")
    ep.data_to_send()
    assert ep.receive(b"-") == [Nack()]
    assert ep.data_to_send() == b"", "a '-' in no-ack mode must not resend the last reply"


def test_nack_after_a_newer_request_retransmits_nothing():
    ep = Endpoint()
    ep.send(b"F3")  # the reply to an earlier request, not acknowledged yet
    ep.data_to_send()
    # the next request arrives, then the peer's timeout fires before our answer
    assert ep.receive(frame(b"vFile:pread:3,1000,0") + b"-") == [Packet(b"vFile:pread:3,1000,0"), Nack()]
    assert ep.data_to_send() == b"+", "the stale F3 must not be sent again"
    ep.send(b"F0;")
    assert ep.data_to_send() == frame(b"F0;")


def test_each_nack_retransmits_once_until_acknowledged():
    ep = Endpoint()
    ep.send(b"OK")
    ep.data_to_send()
    ep.receive(b"--")
    assert ep.data_to_send() == frame(b"OK") * 2  # once per '-'
    ep.receive(b"+")
    ep.receive(b"-")
    assert ep.data_to_send() == b"", "an acknowledged packet is never sent again"


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.integers(0, 3)), max_size=12), st.booleans())
def test_retrying_peer_gets_every_reply_in_step(exchanges, ack_mode):
    """A peer that sends '-' some times right after each request (its timeout
    fired) still receives, in order, exactly one answer per request."""
    stub = Endpoint()
    if not ack_mode:
        stub.disable_acks()
    peer = Endpoint()
    if not ack_mode:
        peer.disable_acks()
    answers = []
    for payload, nacks in exchanges:
        wire = frame(payload) + b"-" * nacks
        for ev in stub.receive(wire):
            if isinstance(ev, Packet):
                stub.send(b"re:" + ev.payload)
        got = [e.payload for e in peer.receive(stub.data_to_send()) if isinstance(e, Packet)]
        answers.append(got)
        stub.receive(peer.data_to_send())  # the peer's '+' (ack mode)
    assert answers == [[b"re:" + p] for p, _ in exchanges]


# --- a packet longer than the endpoint takes -----------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 20])
def test_oversized_packet_is_refused_as_it_arrives_and_the_stream_goes_on(chunk):
    """Its bytes are never buffered beyond the limit, bytes inside it that
    look like acks or Ctrl-C do nothing, and the next packet is parsed."""
    ep = Endpoint(max_packet=4096)
    payload = b"X100000,4000:" + (b"\x03+-%" * 0x1000).replace(b"%", b"}\x05")  # binary, escaped like GDB's
    wire = frame(payload) + frame(b"qC")
    events = []
    for i in range(0, len(wire), chunk):
        events += ep.receive(wire[i : i + chunk])
        assert len(ep._buf) <= 4096 + chunk, "the endpoint must not hold an oversized packet"
    assert [type(e) for e in events] == [BadPacket, Packet], events
    assert events[0].oversized and "longer than 4096" in events[0].reason
    assert events[1] == Packet(b"qC")
    assert ep.data_to_send() == b"++", "acknowledged (and refused), not nacked: a retransmission would be as long"


def test_packet_at_the_limit_is_taken():
    ep = Endpoint(max_packet=4096)
    payload = b"M0,7f8:" + b"ab" * 0x7F8
    assert len(frame(payload)) - 4 <= 4096
    assert ep.receive(frame(payload)) == [Packet(payload)]


# --- the whole-request shortcut of Endpoint.receive (no-ack mode) ------------------------------


def _no_ack_endpoint(max_packet=None):
    ep = Endpoint(max_packet=max_packet)
    ep.disable_acks()
    return ep


def _seen(events):
    """Events as a session sees them (a refused packet's quoted bytes
    depend on how its bytes arrived, in the general parse too)."""
    return [(type(e).__name__, e.oversized) if isinstance(e, BadPacket) else e for e in events]


def _events_byte_by_byte(wire, max_packet=None):
    """The general parser's events: no one-byte read takes the shortcut."""
    ep = _no_ack_endpoint(max_packet)
    events = []
    for i in range(len(wire)):
        events += ep.receive(wire[i : i + 1])
    return _seen(events), ep.data_to_send(), ep.buffered


@given(st.binary(max_size=300), st.booleans(), st.sampled_from([None, 16, 64]))
def test_a_whole_request_in_one_read_gives_what_the_general_parse_gives(payload, rle, max_packet):
    """Any packet (escapes, runs, binary bytes such as 0x03 inside, one
    over the size limit) read whole gives the events, output and buffer
    state that byte-by-byte parsing gives."""
    wire = frame(payload, rle=rle)
    ep = _no_ack_endpoint(max_packet)
    assert (_seen(ep.receive(wire)), ep.data_to_send(), ep.buffered) == _events_byte_by_byte(wire, max_packet)


@given(st.binary(max_size=120))
def test_any_read_in_no_ack_mode_gives_what_the_general_parse_gives(data):
    ep = _no_ack_endpoint()
    assert (_seen(ep.receive(data)), ep.data_to_send(), ep.buffered) == _events_byte_by_byte(data)


def test_a_whole_request_after_a_partial_one_is_parsed_in_order():
    ep = _no_ack_endpoint()
    assert ep.receive(b"$m10,") == []
    assert ep.receive(b"4#00") == [Packet(b"m10,4")]
    assert ep.receive(frame(b"g")) == [Packet(b"g")]
