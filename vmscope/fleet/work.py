"""What a Dask worker does for one target: open it, run one report, and
return plain data (never an exception: a failed target is a record too).

Kernel symbols and BTF live in the worker process's per-build cache
(:data:`vmscope.vmi.linux.symcache.BUILD_CACHE`), so the second target of
a kernel build a worker sees skips decoding them; the driver can seed every
worker's cache with what it already knows (:func:`install_cache`).
"""

from __future__ import annotations

import time
import traceback

COMMANDS = ("ps", "lsmod", "dmesg", "modules-diff")


def install_cache(exported: dict) -> int:
    """Run on each worker (``client.run``): take the driver's cache."""
    from vmscope.vmi.linux.symcache import BUILD_CACHE

    return BUILD_CACHE.install(exported)


def _open(target, timeout: float):
    if target.core:
        from vmscope.dump.offline import CoreInspector

        return CoreInspector(target.core)
    from vmscope.client.session import Inspector

    return Inspector(target.gdb, target.qmp, timeout=timeout)


def run_target(target, command: str, timeout: float = 30.0, text_pages: bool = False) -> dict:
    """``{"target", "ok", "error", "rows", "build", "cached", "seconds", ...}``."""
    from vmscope.vmi.linux import reports

    t0 = time.monotonic()
    result = {"target": target.name, "ok": False, "error": None, "rows": [], "build": None, "cached": None,
              "release": None}
    try:
        with _open(target, timeout) as ins:
            kernel = ins.kernel()
            result["build"] = getattr(kernel.symbols, "fingerprint", None)
            result["symbols"] = getattr(kernel, "symbols_source", "decoded")
            result["cached"] = result["symbols"] != "decoded"
            result["release"] = kernel.banner().split()[2] if kernel.banner().startswith("Linux version") else None
            if command == "ps":
                result["rows"] = reports.ps_rows(kernel)
            elif command == "lsmod" or command == "modules-diff":
                result["rows"] = reports.lsmod_rows(kernel)
            elif command == "dmesg":
                result["rows"] = reports.dmesg_rows(kernel)
            else:
                raise ValueError(f"unknown fleet command {command!r}")
            if text_pages:
                from vmscope.fleet.textdiff import kernel_text

                result["text"] = kernel_text(kernel)
        result["ok"] = True
    except Exception as e:  # a failed target is reported, and the rest go on
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=5)
    result["seconds"] = time.monotonic() - t0
    return result


def text_of(target, timeout: float = 30.0):
    """The core kernel text of one target (the reference of its build)."""
    from vmscope.fleet.textdiff import kernel_text

    with _open(target, timeout) as ins:
        return kernel_text(ins.kernel())


def compare_text(target, reference, timeout: float = 30.0) -> dict:
    """Pages of ``target``'s kernel text that differ from ``reference``
    beyond KASLR relocation, each with the symbol it falls in."""
    from vmscope.fleet.textdiff import PAGE, kernel_text, unexplained_differences

    out = {"target": target.name, "ok": False, "error": None, "pages": []}
    try:
        with _open(target, timeout) as ins:
            kernel = ins.kernel()
            mine = kernel_text(kernel)
            for first in unexplained_differences(reference, mine):
                hit = kernel.symbols.lookup(mine.start + first)
                out["pages"].append({"offset": first // PAGE * PAGE, "address": hex(mine.start + first),
                                     "symbol": f"{hit[0].name}+{hit[1]:#x}" if hit else None})
        out["ok"] = True
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def export_cache() -> dict:
    """Run on a worker: what its per-build cache holds (to share it)."""
    from vmscope.vmi.linux.symcache import BUILD_CACHE

    return BUILD_CACHE.export()
