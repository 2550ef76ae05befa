"""Structure layouts from the kernel's own BTF (``CONFIG_DEBUG_INFO_BTF``).

The kernel keeps its BTF blob in memory between ``__start_BTF`` and
``__stop_BTF`` (it serves ``/sys/kernel/btf/vmlinux`` from there), so the
offsets of ``task_struct.pid`` or ``module.name`` can be read from the
guest itself, with no vmlinux and no guessing per kernel version.

Format (``include/uapi/linux/btf.h``): a 24-byte header, then the type
section and the string section. Types are numbered from 1 in order; each
is 12 bytes (name offset, info = kind<<24 | vlen, size or type id) followed
by kind-specific data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmscope.vmi.errors import VmiError

MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# bytes of kind-specific data: fixed, per member
_EXTRA_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_EXTRA_PER_MEMBER = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
KIND_NAMES = {INT: "int", PTR: "ptr", ARRAY: "array", STRUCT: "struct", UNION: "union", ENUM: "enum",
              FWD: "fwd", TYPEDEF: "typedef", FLOAT: "float", ENUM64: "enum64", FUNC: "function"}


class BtfError(VmiError):
    """Bad BTF data, or a type/member the kernel's BTF does not have."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0

    @property
    def offset(self) -> int:
        return self.bit_offset // 8


@dataclass(frozen=True)
class Field:
    """A resolved member path: where it is and what it holds."""

    offset: int
    size: int
    kind: int  # after typedef/const resolution: INT, PTR, ARRAY, STRUCT, ENUM...
    type_id: int
    signed: bool = False
    elem_size: int = 0  # arrays
    count: int = 0  # arrays
    bitfield_size: int = 0
    bit_offset: int = 0


class Btf:
    def __init__(self, data: bytes):
        if len(data) < HEADER.size:
            raise BtfError("BTF data shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BtfError(f"bad BTF magic 0x{magic:04x} (expected 0xeb9f)")
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        self._data = data
        self._fields: dict[tuple[str, str], Field] = {}
        self._str_cache: dict[int, str] = {}
        self._strings = hdr_len + str_off
        self._str_end = self._strings + str_len
        types_start = hdr_len + type_off
        self._types_end = types_start + type_len
        if self._str_end > len(data) or self._types_end > len(data):
            raise BtfError(f"BTF sections run past the {len(data)} bytes given")
        # type id -> (kind, name_off, vlen, kind_flag, size_or_type, extra_pos); id 0 is void
        self._t: list[tuple[int, int, int, int, int, int]] = [(0, 0, 0, 0, 0, 0)]
        self._by_name: dict[tuple[int, str], int] = {}
        # Every string once, by offset: far cheaper than decoding per type.
        self._str_cache: dict[int, str] = {}
        off = 0
        for raw in data[self._strings : self._str_end].split(b"\0"):
            self._str_cache[off] = raw.decode("utf-8", "replace")
            off += len(raw) + 1
        named_kinds = {STRUCT, UNION, ENUM, ENUM64, TYPEDEF, INT, VAR, DATASEC, FLOAT, FUNC}
        pos = types_start
        unpack = struct.Struct("<III").unpack_from
        while pos < self._types_end:
            name_off, info, size_or_type = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            pos += 12
            self._t.append((kind, name_off, vlen, info >> 31, size_or_type, pos))
            pos += _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_MEMBER.get(kind, 0) * vlen
            if name_off and kind in named_kinds:
                self._by_name.setdefault((kind, self._str_cache.get(name_off) or self.string(name_off)),
                                         len(self._t) - 1)
        self.size = self._str_end

    @classmethod
    def header_size(cls, header: bytes) -> int:
        """Total bytes of a BTF blob given its first 24 bytes."""
        magic, _v, _f, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(header)
        if magic != MAGIC:
            raise BtfError(f"bad BTF magic 0x{magic:04x} (expected 0xeb9f)")
        return hdr_len + max(type_off + type_len, str_off + str_len)

    def string(self, off: int) -> str:
        cached = self._str_cache.get(off)
        if cached is not None:
            return cached
        start = self._strings + off
        end = self._data.index(b"\0", start)
        return self._data[start:end].decode("utf-8", "replace")

    def __len__(self) -> int:
        return len(self._t) - 1

    # ------------------------------------------------------------ lookups

    def find(self, name: str, kind: int = STRUCT) -> int:
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise BtfError(f"the kernel's BTF has no {KIND_NAMES.get(kind, kind)} {name!r}") from None

    def has(self, name: str, kind: int = STRUCT) -> bool:
        return (kind, name) in self._by_name

    def kind(self, type_id: int) -> int:
        return self._t[type_id][0]

    def name(self, type_id: int) -> str:
        return self.string(self._t[type_id][1]) if self._t[type_id][1] else ""

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        while self._t[type_id][0] in _MODIFIERS:
            type_id = self._t[type_id][4]
        return type_id

    def sizeof(self, type_id: int) -> int:
        type_id = self.resolve(type_id)
        kind, _, _, _, size, pos = self._t[type_id]
        if kind == PTR:
            return 8
        if kind == ARRAY:
            elem, _index, count = struct.unpack_from("<III", self._data, pos)
            return self.sizeof(elem) * count
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return size
        raise BtfError(f"type {type_id} ({KIND_NAMES.get(kind, kind)}) has no size")

    def struct_size(self, name: str) -> int:
        return self.sizeof(self.find(name, STRUCT))

    def members(self, type_id: int) -> list[Member]:
        type_id = self.resolve(type_id)
        kind, _, vlen, kflag, _, pos = self._t[type_id]
        if kind not in (STRUCT, UNION):
            raise BtfError(f"type {self.name(type_id) or type_id} is not a struct or union")
        out = []
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._data, pos + 12 * i)
            bits = off >> 24 if kflag else 0
            out.append(Member(self.string(name_off) if name_off else "", mtype, off & 0xFFFFFF if kflag else off, bits))
        return out

    def _member(self, type_id: int, name: str) -> tuple[int, Member] | None:
        """(extra byte offset, member) for ``name``, looking inside anonymous
        structs/unions as C does."""
        for m in self.members(type_id):
            if m.name == name:
                return 0, m
            if not m.name and self.kind(self.resolve(m.type_id)) in (STRUCT, UNION):
                inner = self._member(m.type_id, name)
                if inner:
                    return m.offset + inner[0], inner[1]
        return None

    def field(self, struct_name: str, path: str) -> Field:
        """Resolve ``"se.sum_exec_runtime"`` or ``"tasks.next"`` in a struct
        (memoized: a probe resolves the same few fields at every hit, and
        ``task_struct`` has hundreds of members to scan)."""
        key = (struct_name, path)
        found = self._fields.get(key)
        if found is None:
            found = self._fields[key] = self._field(struct_name, path)
        return found

    def _field(self, struct_name: str, path: str) -> Field:
        type_id = self.find(struct_name, STRUCT) if self.has(struct_name, STRUCT) else self.find(struct_name, UNION)
        offset = 0
        member = None
        for part in path.split("."):
            found = self._member(type_id, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path!r} (failed at {part!r})")
            extra, member = found
            offset += extra + member.offset
            type_id = member.type_id
        assert member is not None
        rid = self.resolve(type_id)
        kind, _, _, _, size, pos = self._t[rid]
        if kind == ARRAY:
            elem, _index, count = struct.unpack_from("<III", self._data, pos)
            esize = self.sizeof(elem)
            return Field(offset, esize * count, kind, rid, elem_size=esize, count=count)
        signed = False
        if kind == INT:
            signed = bool(struct.unpack_from("<I", self._data, pos)[0] >> 24 & 1)
        elif kind in (ENUM, ENUM64):
            signed = bool(self._t[rid][3])
        return Field(offset, self.sizeof(rid), kind, rid, signed=signed,
                     bitfield_size=member.bitfield_size, bit_offset=member.bit_offset % 8)

    def offsetof(self, struct_name: str, path: str) -> int:
        return self.field(struct_name, path).offset

    def enum_value(self, enumerator: str) -> int:
        """Value of an enumerator (e.g. ``MODULE_STATE_LIVE``) from any enum."""
        for tid, (kind, _, vlen, kflag, _, pos) in enumerate(self._t):
            if kind == ENUM:
                for i in range(vlen):
                    name_off, val = struct.unpack_from("<Ii" if kflag else "<II", self._data, pos + 8 * i)
                    if self.string(name_off) == enumerator:
                        return val
        raise BtfError(f"no enumerator {enumerator!r} in the kernel's BTF")

    def type_name(self, type_id: int) -> str:
        """A C spelling of a type (``const char *``, ``struct file *``,
        ``umode_t``), for argument lists; ``__user`` is kept where the BTF
        carries it as a type tag (clang-built kernels)."""
        kind, name_off, _, _, ref, _ = self._t[type_id]
        name = self.string(name_off) if name_off else ""
        if kind == 0:
            return "void"
        if kind == PTR:
            inner = self.type_name(ref)
            return inner + ("*" if inner.endswith("*") else " *")
        if kind in (CONST, VOLATILE, RESTRICT):
            qual = {CONST: "const", VOLATILE: "volatile", RESTRICT: "restrict"}[kind]
            return f"{qual} {self.type_name(ref)}"
        if kind == TYPE_TAG:
            return f"{self.type_name(ref)} __{name}" if name == "user" else self.type_name(ref)
        if kind in (STRUCT, UNION, ENUM, ENUM64, FWD):
            word = "union" if kind == UNION or (kind == FWD and self._t[type_id][3]) else \
                "enum" if kind in (ENUM, ENUM64) else "struct"
            return f"{word} {name or '(anonymous)'}"
        if kind == ARRAY:
            elem, _index, count = struct.unpack_from("<III", self._data, self._t[type_id][5])
            return f"{self.type_name(elem)}[{count}]"
        if kind == FUNC_PROTO:
            return "function"
        return name or KIND_NAMES.get(kind, str(kind))

    def func_params(self, name: str) -> list[tuple[str, str]]:
        """``(parameter name, C type)`` of the kernel function ``name``, from
        its BTF ``FUNC`` and ``FUNC_PROTO`` (functions that survived inlining)."""
        proto = self._t[self.find(name, FUNC)][4]
        kind, _, vlen, _, _, pos = self._t[proto]
        if kind != FUNC_PROTO:
            raise BtfError(f"BTF function {name!r} has no prototype")
        out = []
        for i in range(vlen):
            name_off, ptype = struct.unpack_from("<II", self._data, pos + 8 * i)
            if ptype == 0 and name_off == 0:
                break  # a trailing "..." (varargs)
            out.append((self.string(name_off) if name_off else f"arg{i}", self.type_name(ptype)))
        return out

    def enumerators(self, enum_name: str) -> dict[int, str]:
        tid = self.find(enum_name, ENUM)
        _, _, vlen, kflag, _, pos = self._t[tid]
        out = {}
        for i in range(vlen):
            name_off, val = struct.unpack_from("<Ii" if kflag else "<II", self._data, pos + 8 * i)
            out[val] = self.string(name_off)
        return out


def has_member(btf: Btf, struct_name: str, path: str) -> bool:
    """Whether ``struct_name.path`` exists (fields move between kernel versions)."""
    try:
        btf.field(struct_name, path)
        return True
    except BtfError:
        return False
