"""Apply the kernel's relocations at machine speed: three tiny x86-64 loops
called through ctypes.

Why: 200,000 relocations cost 45 ms of Python on a host, but 1.7-2.2 s in
the nested lab's L1, whose CPU is emulated by QEMU's TCG (Python runs ~40x
slower there, straight-line machine code far less so); that alone was more
than the kernel's own decompressor took. The loops are the whole of
``handle_relocations`` in arch/x86/boot/compressed/misc.c:

    void loop(u8 *image_minus_link, const s32 *entry, u64 n, u64 delta)
        for (; n; n--, entry++) *(T *)(image_minus_link + (s64)*entry) OP= delta;

with T = u64 and OP = + (64-bit relocations), T = u32 and + (32-bit), T =
u32 and - (inverse 32-bit). ``image_minus_link`` is the image's host
address less the link address of ``_text`` (mod 2^64), so the
sign-extended entry (a kernel virtual address) lands on its place. The
caller checks every entry lies inside the image first
(:func:`vmscope.kvm.boot.relocs.apply_relocs`).

The bytes are assembled by hand (the encodings are spelled out below; a
unit test disassembles them with capstone) and mapped executable once.
Hosts that are not x86_64 (no x86 KVM there anyway) or that forbid
executable anonymous memory get ``None`` and the Python loop.
"""

from __future__ import annotations

import ctypes
import mmap
import os

_HEAD = bytes.fromhex(
    "4885d2"  # test rdx, rdx          ; n == 0?
)
_TAIL_OPS = {
    # movsxd rax, dword [rsi] ; OP [rdi+rax], rcx/ecx ; add rsi, 4 ; dec rdx ; jne loop ; ret
    "add64": bytes.fromhex("48010c07"),  # add qword [rdi+rax], rcx
    "add32": bytes.fromhex("010c07"),  # add dword [rdi+rax], ecx
    "sub32": bytes.fromhex("290c07"),  # sub dword [rdi+rax], ecx
}
_MOVSXD = bytes.fromhex("486306")  # movsxd rax, dword [rsi]
_ADVANCE = bytes.fromhex("4883c604" "48ffca")  # add rsi, 4 ; dec rdx
_RET = b"\xc3"


def loop_code(op: str) -> bytes:
    """The machine code of one loop (System V: rdi, rsi, rdx, rcx)."""
    body = _MOVSXD + _TAIL_OPS[op] + _ADVANCE
    back = -(len(body) + 2) & 0xFF  # jne to the loop's start, from the end of the 2-byte jne
    loop = body + bytes([0x75, back])
    return _HEAD + bytes([0x74, len(loop)]) + loop + _RET  # je past the loop when n == 0


#: u64 outside(s64 lo, const s32 *entry, u64 n, s64 hi): how many entries lie outside [lo, hi]
CHECK_CODE = bytes.fromhex(
    "31c0"  # xor eax, eax
    "4885d2"  # test rdx, rdx
    "7419"  # je done (+25)
    "4c6306"  # loop: movsxd r8, dword [rsi]
    "4939f8"  # cmp r8, rdi
    "7c05"  # jl bad
    "4939c8"  # cmp r8, rcx
    "7e03"  # jle ok
    "48ffc0"  # bad: inc rax
    "4883c604"  # ok: add rsi, 4
    "48ffca"  # dec rdx
    "75e7"  # jne loop (-25)
    "c3"  # done: ret
)

_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)
_CHECK = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64)
_loops: dict[str, object] | None = None
_page: mmap.mmap | None = None


def native_loops() -> dict[str, object] | None:
    """{"add64", "add32", "sub32"} -> callable(base, entries_address, n, delta),
    and "outside" -> callable(lo, entries_address, n, hi) -> count; or None
    where machine code cannot run here."""
    global _loops, _page
    if _loops is not None:
        return _loops or None
    _loops = {}
    if os.uname().machine != "x86_64":
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):
        return None
    funcs, pos = {}, 0
    for op, code, proto in [*((op, loop_code(op), _PROTO) for op in _TAIL_OPS), ("outside", CHECK_CODE, _CHECK)]:
        page[pos : pos + len(code)] = code
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page, pos))
        funcs[op] = proto(addr)
        pos += (len(code) + 15) & ~15
    _page, _loops = page, funcs
    return funcs
