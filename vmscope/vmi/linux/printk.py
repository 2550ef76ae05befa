"""The kernel log from the lockless printk ring buffer (Linux 5.10+).

``prb`` points at a ``printk_ringbuffer``: a descriptor ring (state and
text position per record), an info array (sequence number, timestamp,
level) and a data ring holding the text blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmscope.vmi.linux.kernel import LinuxKernel


@dataclass(frozen=True)
class LogRecord:
    seq: int
    timestamp_ns: int
    level: int
    facility: int
    text: str

    def format(self) -> str:
        secs, nsec = divmod(self.timestamp_ns, 1_000_000_000)
        return f"[{secs:5d}.{nsec // 1000:06d}] {self.text}"


def dmesg(kernel: LinuxKernel) -> list[LogRecord]:
    """The kernel log from the lockless printk ring buffer (Linux 5.10+)."""
    btf = kernel.btf
    rb = kernel.u64(kernel.address_of("prb"))
    m = lambda path: kernel.member(rb, "printk_ringbuffer", path)  # noqa: E731
    count = 1 << m("desc_ring.count_bits")
    descs, infos = m("desc_ring.descs"), m("desc_ring.infos")
    tail, head = m("desc_ring.tail_id.counter"), m("desc_ring.head_id.counter")
    data_size = 1 << m("text_data_ring.size_bits")
    data = kernel.read(m("text_data_ring.data"), data_size)
    desc_size, info_size = btf.struct_size("prb_desc"), btf.struct_size("printk_info")
    desc_blob = kernel.read(descs, desc_size * count)
    info_blob = kernel.read(infos, info_size * count)
    sv_off = btf.offsetof("prb_desc", "state_var")
    begin_off = btf.offsetof("prb_desc", "text_blk_lpos.begin")
    next_off = btf.offsetof("prb_desc", "text_blk_lpos.next")
    fi = {name: btf.field("printk_info", name) for name in ("seq", "ts_nsec", "text_len", "facility")}
    level_f = btf.field("printk_info", "level")
    id_mask = (1 << 62) - 1
    out = []
    ident = tail
    for _ in range(count):
        idx = ident % count
        d = idx * desc_size
        sv = struct.unpack_from("<Q", desc_blob, d + sv_off)[0]
        if sv & id_mask == ident & id_mask and (sv >> 62) in (1, 2):  # committed, finalized
            begin, nxt = struct.unpack_from("<QQ", desc_blob, d + begin_off)[0], \
                struct.unpack_from("<Q", desc_blob, d + next_off)[0]
            i = idx * info_size
            ival = lambda f: int.from_bytes(info_blob[i + f.offset : i + f.offset + f.size], "little")  # noqa: E731
            text_len = ival(fi["text_len"])
            text = ring_text(data, data_size, begin, nxt, text_len)
            level_byte = info_blob[i + level_f.offset]
            level = (level_byte >> level_f.bit_offset) & ((1 << (level_f.bitfield_size or 3)) - 1)
            out.append(LogRecord(ival(fi["seq"]), ival(fi["ts_nsec"]), level, ival(fi["facility"]),
                                 text.decode("utf-8", "replace")))
        if ident & id_mask == head & id_mask:
            break
        ident = (ident + 1) & id_mask
    out.sort(key=lambda r: r.seq)
    return out

def ring_text(data: bytes, size: int, begin: int, nxt: int, text_len: int) -> bytes:
    """Text of one record in the data ring (``get_data`` in
    ``kernel/printk/printk_ringbuffer.c``): a block is an 8-byte id and the
    text; a block that would wrap is stored whole at the ring's start."""
    if begin & 1 or nxt & 1 or begin == nxt:
        return b""  # data-less record
    bits = size.bit_length() - 1
    if begin >> bits == nxt >> bits:
        start, length = begin & (size - 1), nxt - begin
    elif (begin >> bits) + 1 == nxt >> bits:
        start, length = 0, nxt & (size - 1)
    else:
        return b""
    if length < 8:
        return b""
    return data[start + 8 : start + min(length, 8 + text_len)]


