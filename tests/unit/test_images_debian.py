"""Package look-ups through the host's real apt (no downloads here)."""

from __future__ import annotations

import shutil

import pytest

from vmscope.images import debian
from vmscope.images.cache import cache_dir


@pytest.fixture(autouse=True)
def _need_apt():
    if shutil.which("apt-cache") is None:
        pytest.fail("apt-cache is missing: vmscope's images need a Debian host")


def test_meta_package_points_at_a_versioned_kernel():
    deps = debian.depends("linux-image-cloud-amd64", "amd64")
    assert any(d.startswith("linux-image-") and d.endswith("-cloud-amd64") for d in deps)
    ref = debian.show(deps[0], "amd64")
    assert ref.name == deps[0] and ref.version and ref.size > 1_000_000
    assert ref.key == f"{ref.name}_{ref.version}_amd64".replace(":", "%3a")


def test_unknown_package_says_so_and_suggests_apt_get_update():
    with pytest.raises(debian.PackageError, match="no-such-package-vmscope is not known to apt.*apt-get update"):
        debian.show("no-such-package-vmscope")


def test_show_many_skips_unknown_names():
    found = debian.show_many(["busybox-static", "no-such-package-vmscope"])
    assert set(found) == {"busybox-static"}


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSCOPE_CACHE", str(tmp_path / "c"))
    assert cache_dir("x", "y") == tmp_path / "c/x/y"
    assert (tmp_path / "c/x/y").is_dir()
    monkeypatch.delenv("VMSCOPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg/vmscope"
