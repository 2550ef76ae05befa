"""Debian packages fetched without installing them: ``apt-get download`` into
the cache, then ``dpkg-deb -x`` into a directory of their own.

Why not install: the host's kernel and libraries must stay untouched, CI may
run as a user who cannot install, and several kernel versions can coexist in
the cache keyed by package version.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from vmscope.images.cache import cache_dir


class PackageError(Exception):
    """A Debian tool is missing, or a package cannot be found or fetched."""


@dataclasses.dataclass(frozen=True)
class PackageRef:
    name: str
    version: str
    arch: str
    size: int = 0  # download size in bytes, 0 if apt did not say

    @property
    def key(self) -> str:
        return f"{self.name}_{self.version}_{self.arch}".replace(":", "%3a")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise PackageError(f"{name} is not installed; vmscope fetches Debian packages with "
                           f"apt-get and dpkg-deb, so this needs a Debian or Ubuntu host")
    return path


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PackageError(f"{what} failed ({' '.join(argv)}): {proc.stderr.strip()}")
    return proc.stdout


@functools.cache
def host_arch() -> str:
    return _run([_tool("dpkg"), "--print-architecture"], "dpkg --print-architecture").strip()


def _show_fields(name: str, arch: str | None) -> dict[str, str]:
    arch = arch or host_arch()
    qualified = name if arch == host_arch() else f"{name}:{arch}"
    proc = subprocess.run([_tool("apt-cache"), "show", "--no-all-versions", qualified],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or "Version:" not in proc.stdout:
        hint = ""
        if arch != host_arch():
            hint = f" (is the architecture enabled? dpkg --add-architecture {arch} && apt-get update)"
        raise PackageError(f"package {qualified} is not known to apt{hint}; "
                           f"try apt-get update. apt said: {proc.stderr.strip()}")
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", proc.stdout, re.M))
    fields.setdefault("Architecture", arch)
    return fields


def show(name: str, arch: str | None = None) -> PackageRef:
    """The candidate version of package ``name`` (``apt-cache show``)."""
    fields = _show_fields(name, arch)
    return PackageRef(fields["Package"], fields["Version"], fields["Architecture"],
                      int(fields.get("Size", "0")))


def show_many(names: list[str], arch: str | None = None) -> dict[str, PackageRef]:
    """Candidate versions of several packages in one ``apt-cache`` call (it
    costs about half a second each); unknown names are left out."""
    arch = arch or host_arch()
    suffix = "" if arch == host_arch() else f":{arch}"
    proc = subprocess.run([_tool("apt-cache"), "show", "--no-all-versions",
                           *(f"{n}{suffix}" for n in names)],
                          capture_output=True, text=True, check=False)
    found: dict[str, PackageRef] = {}
    for para in proc.stdout.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", para, re.M))
        if "Package" in fields and "Version" in fields:
            found[fields["Package"]] = PackageRef(fields["Package"], fields["Version"],
                                                  fields.get("Architecture", arch),
                                                  int(fields.get("Size", "0")))
    return found


def depends(name: str, arch: str | None = None) -> list[str]:
    """Names of the packages ``name`` depends on (the candidate version)."""
    deps = _show_fields(name, arch).get("Depends", "")
    return [re.split(r"[\s(:]", d.strip())[0] for d in deps.split(",") if d.strip()]


def _progress():
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)
    from rich.console import Console
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    DownloadColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                    transient=False)


def download(ref: PackageRef, quiet: bool = False) -> Path:
    """The ``.deb`` for ``ref`` in the cache, downloading it if needed."""
    debs = cache_dir("debs")
    dest = debs / f"{ref.key}.deb"
    if dest.exists():
        return dest
    apt_get = _tool("apt-get")
    qualified = ref.name if ref.arch == host_arch() else f"{ref.name}:{ref.arch}"
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
        # apt drops privileges to _apt for downloads; a private dir it cannot
        # write makes it fall back to root with a warning, so open it up.
        os.chmod(tmp, 0o777)
        proc = subprocess.Popen([apt_get, "download", f"{qualified}={ref.version}"], cwd=tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _watch(proc, Path(tmp), f"download {ref.name} {ref.version}", ref.size, quiet)
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            raise PackageError(f"apt-get download {qualified}={ref.version} failed: {stderr.strip()}")
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise PackageError(f"apt-get download {qualified} produced {len(got)} .deb files")
        os.replace(got[0], dest)
    return dest


def _watch(proc: subprocess.Popen, folder: Path, label: str, total: int, quiet: bool) -> None:
    """Wait for ``proc``, showing how many bytes have landed in ``folder``."""
    if quiet:
        proc.wait()
        return
    done = threading.Event()
    with _progress() as progress:
        task = progress.add_task(label, total=total or None)

        def poll() -> None:
            while not done.wait(0.2):
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                progress.update(task, completed=size)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        proc.wait()
        done.set()
        t.join()
        progress.update(task, completed=total or 1, total=total or 1)


def extract(ref: PackageRef, quiet: bool = False) -> Path:
    """The directory holding the unpacked contents of ``ref`` (cached)."""
    root = cache_dir("pkgs") / ref.key
    stamp = root / ".vmscope-complete"
    if stamp.exists():
        return root
    deb = download(ref, quiet)
    dpkg_deb = _tool("dpkg-deb")
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{ref.key}-"))
    try:
        if quiet:
            _run([dpkg_deb, "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
        else:
            from rich.console import Console
            with Console(stderr=True).status(f"extracting {deb.name}"):
                _run([dpkg_deb, "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
        (tmp / ".vmscope-complete").write_text(f"{ref.name} {ref.version} {ref.arch}\n")
        if root.exists() and not stamp.exists():
            shutil.rmtree(root)  # a crashed earlier extraction
        try:
            os.replace(tmp, root)
        except OSError:
            if not stamp.exists():  # not another process finishing the same work first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
