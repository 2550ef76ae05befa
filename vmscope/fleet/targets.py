"""The target list of a fleet: one target a line.

::

    # live stubs (QMP is optional: shared RAM, system registers)
    gdb=127.0.0.1:1234 qmp=127.0.0.1:4444
    gdb=10.0.0.7:1234  name=web-3
    # core files (vmscope dump, QEMU dump-guest-memory)
    core=/dumps/web-4.core

Blank lines and ``#`` comments are skipped. A target is named by its
``name=`` if given, else by its address or path; every output record
carries that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class TargetListError(ValueError):
    """A target line that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Target:
    name: str
    gdb: str | None = None
    qmp: str | None = None
    core: str | None = None


KEYS = ("gdb", "qmp", "core", "name")


def parse_targets(text: str, source: str = "targets") -> list[Target]:
    targets: list[Target] = []
    names: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields: dict[str, str] = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if not sep or key not in KEYS or not value:
                raise TargetListError(f"{source}:{lineno}: {word!r} is not one of gdb=HOST:PORT, qmp=HOST:PORT, "
                                      "core=PATH, name=NAME")
            if key in fields:
                raise TargetListError(f"{source}:{lineno}: {key}= given twice")
            fields[key] = value
        if "core" in fields and ("gdb" in fields or "qmp" in fields):
            raise TargetListError(f"{source}:{lineno}: a target is a live stub (gdb=, qmp=) or a core file (core=), "
                                  "not both")
        if "core" not in fields and "gdb" not in fields:
            raise TargetListError(f"{source}:{lineno}: give gdb=HOST:PORT or core=PATH")
        name = fields.get("name") or fields.get("core") or fields["gdb"]
        if name in names:
            raise TargetListError(f"{source}:{lineno}: target {name!r} is listed twice (add name=...)")
        names.add(name)
        targets.append(Target(name, fields.get("gdb"), fields.get("qmp"), fields.get("core")))
    if not targets:
        raise TargetListError(f"{source}: no targets")
    return targets


def read_targets(path: str | Path) -> list[Target]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TargetListError(f"{path}: {e.strerror}") from None
    return parse_targets(text, str(path))
