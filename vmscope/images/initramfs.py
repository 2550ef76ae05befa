"""An initramfs assembled in memory, then written as one cpio archive.

The builder records *what* goes where (a host file, some bytes, a symlink, a
device node) and reads host files only when the archive is written. That lets
callers compute :meth:`Initramfs.fingerprint` cheaply from the recipe (paths,
sizes, modification times) and skip the write when a cached archive with the
same fingerprint exists.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable

from vmscope.images.cpio import CpioEntry, write_cpio


class InitramfsError(Exception):
    """A file the image needs is missing, or a path is not valid in an image."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str  # "dir" | "file" | "bytes" | "symlink" | "chardev"
    mode: int
    source: str = ""  # host path for "file"
    data: bytes = b""  # content for "bytes", target for "symlink"
    rdev: tuple[int, int] = (0, 0)
    mtime: int = 0


def _norm(path: str) -> str:
    """Image paths are absolute POSIX paths; stored without the leading slash."""
    p = PurePosixPath("/") / path
    if ".." in p.parts:
        raise InitramfsError(f"image path must not contain '..': {path!r}")
    return str(p).lstrip("/")


class Initramfs:
    """A set of image paths and what each holds.

    Adding a path twice replaces the earlier entry (the last writer wins), so a
    caller can override a file a helper added. Parent directories are created
    implicitly.
    """

    def __init__(self) -> None:
        self._specs: dict[str, _Spec] = {}

    # -- adding -------------------------------------------------------------
    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _norm(path)
        if name:
            self._specs[name] = _Spec("dir", stat.S_IFDIR | mode)

    def add_bytes(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        self._specs[_norm(path)] = _Spec("bytes", stat.S_IFREG | mode, data=data)

    def add_file(self, path: str, source: str | os.PathLike, mode: int | None = None) -> None:
        """Copy host file ``source`` (symlinks followed) to ``path``; keep its
        mode and modification time unless ``mode`` is given. Keeping the time
        matters: Python's ``.pyc`` files are valid only for the source's mtime."""
        src = Path(source)
        try:
            st = src.stat()
        except OSError as exc:
            raise InitramfsError(f"cannot add {path}: host file {src} is missing ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise InitramfsError(f"cannot add {path}: {src} is not a regular file")
        perm = stat.S_IMODE(st.st_mode) if mode is None else mode
        self._specs[_norm(path)] = _Spec("file", stat.S_IFREG | perm, source=str(src.resolve()),
                                         mtime=int(st.st_mtime))

    def add_symlink(self, path: str, target: str) -> None:
        self._specs[_norm(path)] = _Spec("symlink", stat.S_IFLNK | 0o777, data=target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Device nodes are needed before devtmpfs is mounted: the kernel opens
        ``/dev/console`` for init's stdin/stdout from the image itself."""
        self._specs[_norm(path)] = _Spec("chardev", stat.S_IFCHR | mode, rdev=(major, minor))

    def add_tree(self, path: str, source: str | os.PathLike,
                 exclude: Callable[[str], bool] | None = None) -> None:
        """Copy the host directory ``source`` to ``path``, keeping symlinks as
        symlinks. ``exclude(relpath)`` returning True skips a file or a whole
        directory (relpath uses '/' and is relative to ``source``)."""
        root = Path(source)
        if not root.is_dir():
            raise InitramfsError(f"cannot add {path}: {root} is not a directory")
        self.add_dir(path)
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir
            keep = []
            for d in sorted(dirnames):
                rel = f"{rel_dir}/{d}".lstrip("/")
                if exclude and exclude(rel):
                    continue
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    self.add_symlink(f"{path}/{rel}", os.readlink(full))
                    continue
                self.add_dir(f"{path}/{rel}")
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                rel = f"{rel_dir}/{f}".lstrip("/")
                if exclude and exclude(rel):
                    continue
                full = os.path.join(dirpath, f)
                if os.path.islink(full):
                    self.add_symlink(f"{path}/{rel}", os.readlink(full))
                elif os.path.isfile(full):
                    self.add_file(f"{path}/{rel}", full)

    def add_host_binary(self, source: str | os.PathLike, path: str | None = None) -> None:
        """Add a dynamically linked host program or library together with every
        shared library ``ldd`` says it loads, each at its host path."""
        src = str(source)
        self.add_file(path or src, src)
        for lib in shared_libraries(src):
            self.add_file(lib, lib)

    # -- reading ------------------------------------------------------------
    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._specs

    def paths(self) -> list[str]:
        return ["/" + n for n in sorted(self._specs)]

    def fingerprint(self) -> str:
        """A hash of the recipe: image paths, modes, bytes, and each host
        file's path, size and modification time (not its content, to stay fast
        for a hundred megabytes of Python)."""
        h = hashlib.sha256()
        for name in sorted(self._specs):
            s = self._specs[name]
            h.update(f"{name}\0{s.kind}\0{s.mode:o}\0{s.rdev}\0".encode())
            if s.kind == "file":
                st = os.stat(s.source)
                h.update(f"{s.source}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            else:
                h.update(hashlib.sha256(s.data).digest())
        return h.hexdigest()

    def entries(self) -> Iterable[CpioEntry]:
        """The cpio members, parents first (sorted), with implicit parent dirs."""
        names = set(self._specs)
        for name in list(names):
            parent = PurePosixPath(name).parent
            while str(parent) != ".":
                names.add(str(parent))
                parent = parent.parent
        for name in sorted(names, key=lambda n: PurePosixPath(n).parts):
            s = self._specs.get(name) or _Spec("dir", stat.S_IFDIR | 0o755)
            if s.kind == "file":
                data = Path(s.source).read_bytes()
            else:
                data = s.data
            yield CpioEntry(name, s.mode, data, mtime=s.mtime,
                            rdev_major=s.rdev[0], rdev_minor=s.rdev[1])

    def write(self, out: str | os.PathLike | BinaryIO, compress: bool = True,
              level: int = 6) -> None:
        """Write the archive; gzip it unless ``compress`` is False. Writes to a
        temporary name and renames, so a crash never leaves a half archive
        where a cache would trust it."""
        if not isinstance(out, (str, os.PathLike)):
            self._write_stream(out, compress, level)
            return
        dest = Path(out)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                self._write_stream(f, compress, level)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _write_stream(self, f: BinaryIO, compress: bool, level: int) -> None:
        if compress:
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=level, mtime=0) as gz:
                write_cpio(self.entries(), _Tell(gz))
        else:
            write_cpio(self.entries(), f)


class _Tell:
    """GzipFile.tell() counts uncompressed bytes, which is what cpio padding wants;
    this wrapper only exists to make ``seekable()`` say yes."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def write(self, b: bytes) -> int:
        return self._f.write(b)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True


_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def shared_libraries(binary: str | os.PathLike) -> list[str]:
    """Host paths of the shared libraries (and the dynamic loader) that
    ``binary`` needs, as ``ldd`` resolves them. Empty for a static binary."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise InitramfsError("ldd is missing; install libc-bin") from None
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        raise InitramfsError(f"ldd {binary} failed: {out.stderr.strip() or out.stdout.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            raise InitramfsError(f"{binary} needs a library the host lacks: {line.strip()}")
        m = _LDD_LINE.search(line)
        if m:
            libs.append(m.group(1))
    return libs
