"""The parts of probes and ``vmscope trace`` that need no guest: function
prototypes from BTF, which arguments are strings, how values are signed,
arguments by name, and the command lines (options after the subcommand)."""

from __future__ import annotations

import struct

import pytest

from vmscope.client.inspect_cli import build_parser as inspect_parser
from vmscope.client.probe import Args
from vmscope.client.trace_cli import build_parser as trace_parser
from vmscope.vmi.linux import calls
from vmscope.vmi.linux.btf import Btf, BtfError

INT, PTR, CONST, FUNC, FUNC_PROTO, STRUCT, FWD, TYPEDEF, TYPE_TAG = 1, 2, 10, 12, 13, 4, 7, 8, 18


def prototype_btf() -> bytes:
    """``long do_open(int dfd, const char *filename, struct how *how, umode_t mode, char __user *buf)``
    and ``void spin(...)``: what gcc- and clang-built kernels put in BTF."""
    strings = bytearray(b"\0")

    def s(name: str) -> int:
        if not name:
            return 0
        off = len(strings)
        strings.extend(name.encode() + b"\0")
        return off

    types = bytearray()

    def t(name, kind, vlen, size_or_type, extra=b""):
        types.extend(struct.pack("<III", s(name), kind << 24 | vlen, size_or_type) + extra)

    t("int", INT, 0, 4, struct.pack("<I", 1 << 24 | 32))  # 1
    t("char", INT, 0, 1, struct.pack("<I", 8))  # 2
    t("", CONST, 0, 2)  # 3: const char
    t("", PTR, 0, 3)  # 4: const char *
    t("how", FWD, 0, 0)  # 5: struct how
    t("", PTR, 0, 5)  # 6: struct how *
    t("unsigned short", INT, 0, 2, struct.pack("<I", 16))  # 7
    t("umode_t", TYPEDEF, 0, 7)  # 8
    t("long", INT, 0, 8, struct.pack("<I", 1 << 24 | 64))  # 9
    t("user", TYPE_TAG, 0, 2)  # 10: char __user
    t("", PTR, 0, 10)  # 11: char __user *
    t("", FUNC_PROTO, 5, 9, struct.pack("<10I", s("dfd"), 1, s("filename"), 4, s("how"), 6, s("mode"), 8,
                                         s("buf"), 11))  # 12
    t("do_open", FUNC, 0, 12)  # 13
    t("", FUNC_PROTO, 2, 0, struct.pack("<4I", s("n"), 1, 0, 0))  # 14: void (int n, ...)
    t("spin", FUNC, 0, 14)  # 15
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + bytes(types) + bytes(strings)


def test_function_prototypes_from_btf():
    btf = Btf(prototype_btf())
    params = btf.func_params("do_open")
    assert params == [("dfd", "int"), ("filename", "const char *"), ("how", "struct how *"), ("mode", "umode_t"),
                      ("buf", "char __user *")]
    assert [calls.Param(n, t).is_string for n, t in params] == [False, True, False, False, True]
    assert btf.func_params("spin") == [("n", "int")]  # varargs end the list
    with pytest.raises(BtfError, match="no function 'nosuch'"):
        btf.func_params("nosuch")


@pytest.mark.parametrize("type_name,value,shown", [
    ("int", 0xFFFFFF9C, -100),  # AT_FDCWD in a 64-bit register
    ("int", 0xFFFFFFFF_FFFFFF9C, -100),
    ("umode_t", 0x1B6, 0x1B6),
    ("unsigned int", 0xFFFFFFFF, 0xFFFFFFFF),
    ("const char *", 0xFFFF_8880_0000_0000, 0xFFFF_8880_0000_0000),  # pointers stay unsigned
    ("long", (1 << 64) - 1, -1),
])
def test_register_values_are_signed_as_their_c_type(type_name, value, shown):
    assert calls.signed(value, type_name) == shown


def test_syscall_wrappers_are_recognised():
    assert calls.syscall_name("__x64_sys_openat") == "openat"
    assert calls.syscall_name("__arm64_sys_read") == "read"
    assert calls.syscall_name("do_sys_openat2") is None


def test_register_arguments_follow_the_calling_convention():
    regs = {"rdi": 1, "rsi": 2, "rdx": 3, "rcx": 4, "r8": 5, "r9": 6}
    assert calls.register_arguments("x86_64", regs, 4) == [1, 2, 3, 4]
    assert calls.register_arguments("aarch64", {f"x{i}": i * 10 for i in range(8)}, 3) == [0, 10, 20]
    with pytest.raises(Exception, match="register rsi"):
        calls.register_arguments("x86_64", {"rdi": 1}, 2)


def test_args_by_position_and_name():
    args = Args([0xFFFFFF9C, 0x7FFE0000], ["dfd", "filename"])
    assert args[1] == args["filename"] == 0x7FFE0000
    assert args.as_dict() == {"dfd": 0xFFFFFF9C, "filename": 0x7FFE0000}
    with pytest.raises(KeyError, match="dfd, filename"):
        args["flags"]


@pytest.mark.parametrize("argv", [
    ["--gdb", "h:1", "--json", "ps", "-f"],
    ["ps", "-f", "--gdb", "h:1", "--json"],
    ["--gdb", "h:1", "ps", "--json", "-f"],
])
def test_inspect_options_before_or_after_the_subcommand(argv):
    args = inspect_parser().parse_args(argv)
    assert (args.gdb, args.json, args.full, args.cmd, args.timeout) == ("h:1", True, True, "ps", 10.0)


def test_trace_command_line():
    args = trace_parser().parse_args(["__x64_sys_openat", "do_sys_openat2", "--gdb", "h:1", "--count", "3",
                                      "--args", "filename:u,flags:x,arg3"])
    assert args.symbols == ["__x64_sys_openat", "do_sys_openat2"]
    assert args.args == [("filename", "u"), ("flags", "x"), ("arg3", None)] and args.count == 3
    with pytest.raises(SystemExit):
        trace_parser().parse_args(["f", "--args", "filename:q"])
