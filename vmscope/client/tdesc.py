"""Register layouts from a stub's target description (``target.xml``), with
the built-in arch tables as the fallback when the stub sends none."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class RemoteRegister:
    name: str
    regnum: int
    bitsize: int
    type: str
    group: str | None
    feature: str

    @property
    def size(self) -> int:
        return (self.bitsize + 7) // 8


@dataclass(frozen=True)
class RegisterLayout:
    """Registers by number, with their byte offsets in a ``g`` reply."""

    arch: str | None
    registers: tuple[RemoteRegister, ...]

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {r.name: r for r in self.registers})

    def __getitem__(self, name: str) -> RemoteRegister:
        try:
            return self._by_name[name]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"no register named {name!r}; this target has: "
                           f"{', '.join(r.name for r in self.registers[:40])}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    def decode_g(self, raw: bytes) -> dict[str, int | None]:
        """Values of the registers the ``g`` reply carries, in regnum order;
        ``None`` for one the stub marks unavailable (``xx``)."""
        out: dict[str, int | None] = {}
        off = 0
        for reg in sorted(self.registers, key=lambda r: r.regnum):
            if off + reg.size > len(raw):
                break
            out[reg.name] = int.from_bytes(raw[off : off + reg.size], "little")
            off += reg.size
        return out


def parse_target_xml(fetch: Callable[[str], bytes], annex: str = "target.xml") -> RegisterLayout:
    """Parse ``annex`` and every ``<xi:include>`` it pulls in (QEMU splits its
    description into several files); register numbers run on in document
    order unless a ``regnum`` attribute resets them."""
    regs: list[RemoteRegister] = []
    arch: list[str] = []
    counter = [0]

    def walk(name: str, feature: str) -> None:
        # QEMU writes <xi:include> without declaring the xi namespace.
        text = fetch(name).replace(b"<xi:include", b"<include")
        root = ET.fromstring(text)
        for el in root.iter():
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "architecture" and el.text:
                arch.append(el.text.strip())
            elif tag == "include":
                walk(el.get("href", ""), feature)
            elif tag == "feature":
                feature = el.get("name", feature)
                for reg in el.iter():
                    if reg.tag.rsplit("}", 1)[-1] == "reg":
                        add(reg, feature)

    def add(reg: ET.Element, feature: str) -> None:
        if "regnum" in reg.attrib:
            counter[0] = int(reg.get("regnum", "0"), 0)
        regs.append(RemoteRegister(reg.get("name", f"r{counter[0]}"), counter[0], int(reg.get("bitsize", "0")),
                                   reg.get("type", "int"), reg.get("group"), feature))
        counter[0] += 1

    walk(annex, "")
    return RegisterLayout(arch[0] if arch else None, tuple(regs))


def layout_from_arch(arch) -> RegisterLayout:
    """The same layout from one of vmscope's :mod:`vmscope.arch` tables."""
    return RegisterLayout(arch.name, tuple(RemoteRegister(r.name, i, r.bitsize, r.type, r.group, r.feature)
                                           for i, r in enumerate(arch.registers)))
