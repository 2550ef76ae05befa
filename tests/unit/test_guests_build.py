"""The committed guest ELFs are exactly what their sources build to.

Runs the real binutils (skipped only where an assembler is missing), so a
source edit without `python -m vmscope.guests.build` fails here.
"""

from __future__ import annotations

import pytest

from vmscope.guests import guest_elf
from vmscope.guests.build import RECIPES, main, missing_tools, recipe_for


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.arch}/{r.name}")
def test_rebuild_is_byte_identical_to_the_committed_elf(recipe, tmp_path):
    missing = missing_tools(recipe)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    assert main(["--out", str(tmp_path), f"{recipe.arch}/{recipe.name}"]) == 0
    rebuilt = (tmp_path / recipe.arch / recipe.elf_name).read_bytes()
    committed = guest_elf(recipe.name, recipe.arch).read_bytes()
    assert rebuilt == committed, (
        f"{recipe.arch}/{recipe.elf_name} is stale: run python -m vmscope.guests.build and commit the ELF"
    )


def test_every_packaged_guest_has_a_recipe():
    from vmscope.guests import GUESTS

    for arch, names in GUESTS.items():
        for name in names:
            assert recipe_for(name, arch).source_dir.joinpath(f"{name}.S").is_file()


def test_unknown_guest_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["x86_64/nope"])
    assert exit_info.value.code == 2
    assert "no guest x86_64/nope; known guests: x86_64/demo, x86_64/idt, aarch64/demo" in capsys.readouterr().err


def test_guest_without_arch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["demo"])
    assert "name guests as ARCH/NAME" in capsys.readouterr().err
