"""Register table paths (``Register.kvm``) resolved against KVM's ctypes
structures: where a field lies and how wide it is.

Why: the arch tables name a register's home by the field of KVM's own
structure (``sregs.cs.selector``, ``fp_regs.vregs[3]``), so the targets read
and write any register the same way: x86 copies the bytes at that offset of
the fetched ``kvm_regs``/``kvm_sregs``/``kvm_fpu``; arm64 turns the offset
in ``struct kvm_regs`` into a ONE_REG id.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import lru_cache

_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


@dataclass(frozen=True)
class FieldRef:
    offset: int  # bytes from the start of the structure
    size: int  # bytes of the field


@lru_cache(maxsize=None)
def resolve(struct: type, path: str) -> FieldRef:
    """Offset and size of ``path`` (``a.b[3].c``) in ctypes ``struct``;
    ValueError naming the part that does not exist."""
    offset, typ = 0, struct
    for part in path.split("."):
        m = _PART.match(part)
        fields = dict(getattr(typ, "_fields_", ()))
        if m is None or m.group(1) not in fields:
            raise ValueError(f"{struct.__name__} has no field {part!r} (in {path!r})")
        name, index = m.group(1), m.group(2)
        offset += getattr(typ, name).offset
        typ = fields[name]
        if index is not None:
            if not hasattr(typ, "_length_") or int(index) >= typ._length_:
                raise ValueError(f"{path!r}: {name} has no element {index}")
            typ = typ._type_
            offset += int(index) * ctypes.sizeof(typ)
    return FieldRef(offset, ctypes.sizeof(typ))


def read_field(obj: ctypes.Structure, ref: FieldRef, nbytes: int) -> int:
    """The low ``nbytes`` of the field, little-endian."""
    return int.from_bytes(ctypes.string_at(ctypes.addressof(obj) + ref.offset, min(nbytes, ref.size)), "little")


def write_field(obj: ctypes.Structure, ref: FieldRef, nbytes: int, value: int) -> None:
    """Store ``value`` in the low ``nbytes`` of the field (the rest of a
    wider field is kept: a 32-bit ``eflags`` leaves rflags' upper half)."""
    n = min(nbytes, ref.size)
    ctypes.memmove(ctypes.addressof(obj) + ref.offset, value.to_bytes(n, "little"), n)
