"""What `monitor kernel-entry` and `watch jiffies` on arm64 rest on, checked
on Debian's own arm64 kernel (the Image file, as the loader puts it in RAM):
the `br x8` that leaves the identity map is found from the Image's kallsyms,
and `jiffies` is read off `do_timer`'s code (Debian's arm64 kallsyms has no
data symbols)."""

from __future__ import annotations

import struct

import capstone
import pytest

from vmscope.kvm.arm64.kernel_entry import BR_X8, KernelEntryUnavailable, find_identity_exit
from vmscope.vmi.linux.derived_symbols import with_derived_symbols
from vmscope.vmi.linux.kallsyms import Kallsyms, Symbol, scan_for_kallsyms


@pytest.fixture(scope="module")
def image() -> bytes:
    from vmscope.images.kernel import cloud_kernel
    from vmscope.kvm.arm64.image import read_image

    return read_image(cloud_kernel("arm64", quiet=True).vmlinuz)


def test_the_identity_map_exit_is_the_br_x8_after_relocate_kernel(image):
    read = lambda a, n: image[a : a + n]  # noqa: E731
    at = find_identity_exit(read, 0, len(image))
    assert int.from_bytes(image[at : at + 4], "little") == BR_X8
    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    before = [f"{i.mnemonic} {i.op_str}" for i in md.disasm(image[at - 12 : at], at - 12)]
    assert before[0].startswith("bl ") and before[1].startswith("ldr x8, "), before  # bl __relocate_kernel


def test_an_image_without_kallsyms_gets_a_clear_reason():
    junk = bytes(4 << 20)
    with pytest.raises(KernelEntryUnavailable, match="no kallsyms"):
        find_identity_exit(lambda a, n: junk[a : a + n], 0, len(junk))


def test_jiffies_is_derived_from_do_timer_where_kallsyms_has_no_data_symbols(image):
    text = 0xFFFF_8000_0800_0000  # as linked; the Image is _text onwards
    syms = scan_for_kallsyms(lambda a, n: image[a : a + n], 0, len(image))
    assert "jiffies" not in syms
    # place the decoded offsets (relative to _stext, pre-relocation) at _stext = _text + 64 KiB
    stext = syms["_stext"]
    placed = Kallsyms([Symbol(s.name, s.address - stext + text + 0x10000, s.type) for s in syms.symbols])
    derived = with_derived_symbols(placed, lambda va, n: image[va - text : va - text + n], "aarch64")
    jiffies = derived["jiffies"]
    assert derived["jiffies_64"] == jiffies
    assert text < jiffies < text + len(image) and jiffies % 8 == 0
    # do_timer adds its argument to the word at that address: ldr/add/str on it
    fn = derived["do_timer"]
    code = image[fn - text : fn - text + 64]
    lo12 = (jiffies & 0xFFF)
    ops = [f"{i.mnemonic} {i.op_str}" for i in capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM).disasm(code, fn)]
    assert any(op.startswith("ldr ") and f"#{lo12:#x}]" in op for op in ops), ops
    assert any(op.startswith("str ") and f"#{lo12:#x}]" in op for op in ops), ops
    assert with_derived_symbols(derived, lambda va, n: b"", "aarch64") is derived  # nothing left to add


def test_an_unrelocated_image_does_not_poison_the_build_cache(image):
    """`monitor kernel-entry` decodes kallsyms before the kernel relocated
    itself (their base reads 0); a later decode of the relocated kernel
    must still get the relocated addresses, not the cached offsets."""
    from vmscope.vmi.linux.symcache import BuildCache

    cache = BuildCache(disk=False)
    before = scan_for_kallsyms(lambda a, n: image[a : a + n], 0, len(image), cache=cache)
    assert before["_stext"] == 0  # offsets: the base is not relocated yet
    # kallsyms_relative_base (0 here) sits just before kallsyms_num_syms
    pos = image.index(struct.pack("<QQ", 0, len(before.symbols)))
    relocated = bytearray(image)
    stext = 0xFFFF_C3FE_D261_0000
    struct.pack_into("<Q", relocated, pos, stext)
    for _ in range(2):  # decoded, then from the cache
        after = scan_for_kallsyms(lambda a, n: bytes(relocated[a : a + n]), 0, len(relocated), cache=cache)
        assert after["_stext"] == stext, hex(after["_stext"])
        assert after["start_kernel"] == stext + before["start_kernel"]
    assert after.cached
