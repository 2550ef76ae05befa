"""Arguments of a kernel function at its first instruction: names and types
from the kernel itself, values from the calling convention or ``pt_regs``.

Two kinds of entry points:

- **syscall wrappers** (``__x64_sys_openat``, ``__arm64_sys_openat``) take
  one ``const struct pt_regs *``: the user's registers saved on entry. The
  syscall's own arguments are in it (x86_64: ``di si dx r10 r8 r9``;
  arm64: ``regs[0..5]``), at offsets read from the kernel's BTF. Their
  names and C types come from the syscall's ``__syscall_meta__NAME``
  (``CONFIG_FTRACE_SYSCALLS``; its layout from BTF); every pointer a
  syscall takes is a user pointer, so its ``char *`` arguments are user
  strings.
- **plain functions** take their arguments in registers (x86_64 System V:
  ``rdi rsi rdx rcx r8 r9``; AAPCS64: ``x0``-``x7``), with names and types
  from the function's BTF prototype when it survived inlining.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from vmscope.vmi.errors import VmiError
from vmscope.vmi.linux.btf import BtfError

if TYPE_CHECKING:
    from vmscope.vmi.linux.kernel import LinuxKernel

CALL_REGISTERS = {"x86_64": ("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
                  "aarch64": tuple(f"x{i}" for i in range(8))}
# pt_regs members holding syscall arguments 0..5 (x86_64's 4th is r10: rcx is clobbered by syscall)
SYSCALL_PT_REGS = {"x86_64": ("di", "si", "dx", "r10", "r8", "r9"),
                   "aarch64": tuple(f"regs[{i}]" for i in range(6))}
_WRAPPER = re.compile(r"^__(x64|arm64|ia32|x32)_sys_(\w+)$")


@dataclass(frozen=True)
class Param:
    """One argument: its name, C type (as the kernel spells it) and whether
    a pointer in it is a string to read from user (or kernel) memory."""

    name: str
    type: str = "long"

    @property
    def is_string(self) -> bool:
        return bool(re.fullmatch(r"(const )?(unsigned )?char( __user)? \*", self.type.strip()))


@dataclass(frozen=True)
class Signature:
    """How to find and read a function's arguments at its entry."""

    function: str
    params: tuple[Param, ...]
    syscall: str | None = None  # the syscall's name when ``function`` is its wrapper
    user_pointers: bool = False  # pointers are user addresses (syscalls)
    source: str = ""  # where names/types came from: "syscall metadata", "BTF", "registers"


def syscall_name(function: str) -> str | None:
    """``__x64_sys_openat`` -> ``openat``; None if not a syscall wrapper."""
    m = _WRAPPER.match(function)
    return m.group(2) if m else None


def _syscall_params(kernel: LinuxKernel, name: str) -> tuple[Param, ...] | None:
    """Names and types from ``__syscall_meta__NAME`` (struct syscall_metadata)."""
    sym = f"__syscall_meta__{name}"
    if sym not in kernel.symbols:
        return None
    meta = kernel.symbols[sym]
    try:
        count = kernel.member(meta, "syscall_metadata", "nb_args")
        if not 0 <= count <= 6:
            return None
        types_p = kernel.member(meta, "syscall_metadata", "types")
        args_p = kernel.member(meta, "syscall_metadata", "args")
        if count == 0:
            return ()
        types = struct.unpack(f"<{count}Q", kernel.read(types_p, 8 * count))
        args = struct.unpack(f"<{count}Q", kernel.read(args_p, 8 * count))
        return tuple(Param(kernel.aspace.cstring(a, 64), kernel.aspace.cstring(t, 64)) for t, a in zip(types, args))
    except (BtfError, VmiError):
        return None


def signature(kernel: LinuxKernel, function: str) -> Signature:
    """The :class:`Signature` of ``function``: syscall metadata for syscall
    wrappers, BTF for other functions, else six unnamed register arguments."""
    cache = kernel._layouts.setdefault("signatures", {})
    if function in cache:
        return cache[function]
    regs = CALL_REGISTERS[kernel.arch]
    name = syscall_name(function)
    if name is not None:
        params = _syscall_params(kernel, name)
        source = "syscall metadata"
        if params is None:
            params, source = tuple(Param(f"arg{i}") for i in range(6)), "pt_regs"
        sig = Signature(function, params, syscall=name, user_pointers=True, source=source)
    else:
        try:
            params = tuple(Param(n, t) for n, t in kernel.btf.func_params(function))[: len(regs)]
            sig = Signature(function, params, source="BTF")
        except BtfError:
            sig = Signature(function, tuple(Param(f"arg{i}") for i in range(len(regs))), source="registers")
    cache[function] = sig
    return sig


def _pt_regs_offsets(kernel: LinuxKernel) -> tuple[int, ...]:
    cached = kernel._layouts.get("syscall_pt_regs")
    if cached is None:
        if kernel.arch == "aarch64":
            base = kernel.btf.offsetof("pt_regs", "regs")
            cached = tuple(base + 8 * i for i in range(6))
        else:
            cached = tuple(kernel.btf.offsetof("pt_regs", f) for f in SYSCALL_PT_REGS["x86_64"])
        kernel._layouts["syscall_pt_regs"] = cached
    return cached


def syscall_arguments(kernel: LinuxKernel, pt_regs: int, count: int = 6) -> list[int]:
    """Arguments 0..count-1 of a syscall from its saved ``struct pt_regs``
    (one read of the span that holds them)."""
    offsets = _pt_regs_offsets(kernel)[:count]
    if not offsets:
        return []
    lo, hi = min(offsets), max(offsets) + 8
    data = kernel.read(pt_regs + lo, hi - lo)
    return [struct.unpack_from("<Q", data, off - lo)[0] for off in offsets]


def register_arguments(arch: str, regs: Mapping[str, int | None], count: int) -> list[int]:
    """The first ``count`` integer arguments of a plain function at entry."""
    names = CALL_REGISTERS[arch]
    if count > len(names):
        raise VmiError(f"only {len(names)} arguments are passed in registers on {arch}")
    out = []
    for name in names[:count]:
        value = regs.get(name)
        if value is None:
            raise VmiError(f"the stub did not report register {name}, needed for a function argument")
        out.append(value)
    return out


def arguments(kernel: LinuxKernel, sig: Signature, regs: Mapping[str, int | None]) -> list[int]:
    """The values of ``sig``'s arguments at the function's entry."""
    if sig.syscall is not None:
        pt_regs = register_arguments(kernel.arch, regs, 1)[0]
        return syscall_arguments(kernel, pt_regs, len(sig.params))
    return register_arguments(kernel.arch, regs, len(sig.params))


def signed(value: int, type_name: str) -> int:
    """A register value as the C type would print it (``int dfd`` = -100)."""
    t = type_name.strip()
    if "*" in t or "unsigned" in t or t in ("size_t", "umode_t", "u32", "u64", "u16", "u8"):
        return value
    if t in ("int", "pid_t", "int32_t", "s32", "key_serial_t", "clockid_t", "timer_t"):
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value >> 31 else value
    return value - (1 << 64) if value >> 63 else value
