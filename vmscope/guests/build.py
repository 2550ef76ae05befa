"""Rebuild the embedded guests' ELF files from their assembly sources.

    python -m vmscope.guests.build [--out DIR] [NAME ...]

The ELF files are committed next to their sources so that vmscope works
without binutils; this module is how they were made. The build is
deterministic (no build id, fixed file names, relative paths), so a rebuild
with the same binutils gives byte-identical files, and a test checks that
the committed ELFs still match their sources.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GuestRecipe:
    """How one guest ELF is assembled and linked."""

    name: str
    arch: str
    assembler: str
    linker: str
    as_flags: tuple[str, ...] = ()

    @property
    def source_dir(self) -> Path:
        return GUESTS_DIR / self.arch

    @property
    def source(self) -> str:
        return f"{self.name}.S"

    @property
    def linker_script(self) -> str:
        return f"{self.name}.ld"

    @property
    def elf_name(self) -> str:
        return f"{self.name}.elf"


RECIPES: tuple[GuestRecipe, ...] = (
    GuestRecipe("demo", "x86_64", "as", "ld", ("--64",)),
    GuestRecipe("idt", "x86_64", "as", "ld", ("--64",)),
    GuestRecipe("demo", "aarch64", "aarch64-linux-gnu-as", "aarch64-linux-gnu-ld"),
    GuestRecipe("walk", "x86_64", "as", "ld", ("--64",)),
)

# Flags common to every guest. --strip-local-absolute keeps .equ constants
# out of the symbol table (gdb would otherwise name small addresses after
# them); no build id and no page-aligned file layout keep the files small
# and reproducible; the one RWX segment is deliberate (a flat bare-metal
# image), so ld's warning about it is noise.
AS_FLAGS = ("--strip-local-absolute", "-I", "..")
LD_FLAGS = ("-nostdlib", "-static", "-n", "--build-id=none", "--no-warn-rwx-segments")


class BuildError(Exception):
    """A tool is missing or failed; the message says which and why."""


def missing_tools(recipe: GuestRecipe) -> list[str]:
    """The binutils programs this recipe needs that are not on PATH."""
    return [tool for tool in (recipe.assembler, recipe.linker) if shutil.which(tool) is None]


def _run(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr.strip()}")


def build(recipe: GuestRecipe, out_dir: Path) -> Path:
    """Assemble and link ``recipe`` into ``out_dir/<name>.elf``.

    The assembler runs inside the source directory with relative names and
    the linker inside a scratch directory, so no absolute path ends up in
    the output.
    """
    missing = missing_tools(recipe)
    if missing:
        raise BuildError(f"cannot build {recipe.arch}/{recipe.name}: {', '.join(missing)} not found (install binutils)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmscope-guest-") as scratch_name:
        scratch = Path(scratch_name)
        obj = f"{recipe.name}.o"
        _run([recipe.assembler, *recipe.as_flags, *AS_FLAGS, "-o", str(scratch / obj), recipe.source],
             cwd=recipe.source_dir)
        script = recipe.source_dir / recipe.linker_script
        _run([recipe.linker, *LD_FLAGS, "-T", str(script), "-o", recipe.elf_name, obj], cwd=scratch)
        target = out_dir / recipe.elf_name
        shutil.copyfile(scratch / recipe.elf_name, target)
    return target


def recipe_for(name: str, arch: str) -> GuestRecipe:
    for recipe in RECIPES:
        if recipe.name == name and recipe.arch == arch:
            return recipe
    known = ", ".join(f"{r.arch}/{r.name}" for r in RECIPES)
    raise ValueError(f"no guest {arch}/{name}; known guests: {known}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmscope.guests.build",
        description="Rebuild the embedded guest ELFs from their assembly sources.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="write the ELFs here (default: next to their sources, replacing the committed files)")
    parser.add_argument("guests", nargs="*", metavar="ARCH/NAME",
                        help="guests to build, e.g. x86_64/demo (default: all)")
    args = parser.parse_args(argv)
    recipes = []
    for spec in args.guests:
        arch, slash, name = spec.partition("/")
        if not slash:
            parser.error(f"name guests as ARCH/NAME, e.g. x86_64/demo (got {spec!r})")
        try:
            recipes.append(recipe_for(name, arch))
        except ValueError as error:
            parser.error(str(error))
    try:
        for recipe in recipes or RECIPES:
            out_dir = args.out / recipe.arch if args.out else recipe.source_dir
            print(build(recipe, out_dir))
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
