"""``vmscope fleet`` on a Dask LocalCluster over 4 live QEMU guests (Debian
kernel, KASLR on) and 32 core files dumped from them, plus a target with a
wrong address and a truncated core: per-target results match ``vmscope
inspect`` run on each alone, the two bad targets are reported and the rest
complete; modules-diff finds the module only one guest loads and a
function patched in one core's kernel text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]

COMMON = ["crc32_generic"]
EXTRA = "nls_ascii"  # loaded by the last guest only
PATCHED = "__x64_sys_openat"


def vmscope(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmscope", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The targets file, and what each target is."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed")
    from vmscope.client.helpers.qemu_launch import QemuGuest
    from vmscope.images.linux import READY_MARKER, build_linux_guest

    d = tmp_path_factory.mktemp("fleet")
    guests = []
    try:
        for i in range(4):
            image = build_linux_guest(mode="shell", modules=COMMON + ([EXTRA] if i == 3 else []), quiet=True)
            guests.append(QemuGuest(str(image.vmlinuz), str(image.initramfs), free_port(), free_port(),
                                    memory_mib=192).start())
        for g in guests:
            g.console.wait_for(READY_MARKER.encode())
            g.console.run("sleep 600 & true")
        cores = []
        for i, g in enumerate(guests):
            path = d / f"guest{i}.core"
            r = vmscope("dump", "--gdb", g.gdb, "--qmp", g.qmp, str(path))
            assert r.returncode == 0, r.stderr
            cores.append(path)
        lines = [f"gdb={g.gdb} qmp={g.qmp} name=live{i}" for i, g in enumerate(guests)]
        paths = {}
        for i, core in enumerate(cores):  # 4 dumps, each under 8 names: 32 core files (one patched)
            for j in range(8):
                name = f"core{i}-{j}"
                path = core if j == 0 else d / f"{name}.core"
                if j:
                    os.link(core, path)
                paths[name] = path
        patched = d / "core1-7.core"
        os.unlink(patched)
        subprocess.run(["cp", "--sparse=always", str(cores[1]), str(patched)], check=True)
        _patch_function(patched, PATCHED)
        lines += [f"core={p} name={n}" for n, p in paths.items()]
        truncated = d / "truncated.core"
        truncated.write_bytes(cores[0].read_bytes()[: 50 << 20])
        lines += [f"core={truncated} name=truncated", f"gdb=127.0.0.1:{free_port()} name=nobody"]
        targets = d / "targets.txt"
        targets.write_text("\n".join(lines) + "\n")
        yield {"file": targets, "guests": guests, "paths": paths, "dir": d}
    finally:
        for g in guests:
            g.stop()


def _patch_function(core_path, symbol: str) -> None:
    """Overwrite the first bytes of a kernel function in a core file, as an
    inline hook would (int3; nop)."""
    from vmscope.dump.offline import CoreInspector

    with CoreInspector(str(core_path)) as ins:
        kernel = ins.kernel()
        pa = kernel.virt_to_phys(kernel.symbols[symbol] + 4)
        region = next(r for r in ins.core.memory.regions if r.gpa <= pa < r.end)
        offset = region.offset + pa - region.gpa
    with open(core_path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xcc\x90\x90")


def test_fleet_ps_matches_each_target_alone_and_reports_bad_targets(fleet, tmp_path):
    r = vmscope("fleet", "ps", "--targets", str(fleet["file"]), "--workers", "2", "--json")
    assert r.returncode == 1, "a failed target makes the exit status 1"
    recs = records(r.stdout)
    errors = {rec["target"]: rec["error"] for rec in recs if "error" in rec}
    assert set(errors) == {"truncated", "nobody"}, errors
    assert "truncated" in errors["truncated"] and "refused" in errors["nobody"].lower()
    by_target: dict[str, set] = {}
    for rec in recs:
        if "error" not in rec:
            by_target.setdefault(rec["target"], set()).add((rec["pid"], rec["ppid"], rec["comm"]))
    assert len(by_target) == 36, sorted(by_target)
    assert "36 of 38 targets" in r.stderr, r.stderr
    for i, g in enumerate(fleet["guests"]):
        alone = json.loads(vmscope("inspect", "--gdb", g.gdb, "--qmp", g.qmp, "--json", "ps").stdout)
        assert by_target[f"live{i}"] == {(x["pid"], x["ppid"], x["comm"]) for x in alone}
    for name in ("core0-0", "core2-5", "core3-7"):
        alone = json.loads(vmscope("inspect", "--core", str(fleet["paths"][name]), "--json", "ps").stdout)
        assert by_target[name] == {(x["pid"], x["ppid"], x["comm"]) for x in alone}
    assert by_target["core2-0"] == by_target["core2-6"]  # the same dump under two names


def test_fleet_modules_diff_finds_the_odd_module_and_the_patched_function(fleet):
    r = vmscope("fleet", "modules-diff", "--targets", str(fleet["file"]), "--workers", "2", "--json")
    recs = [rec for rec in records(r.stdout) if "error" not in rec]
    odd_module = {rec["target"] for rec in recs if rec.get("kind") == "module" and rec["module"] == EXTRA}
    assert odd_module == {"live3"} | {f"core3-{j}" for j in range(8)}, recs
    assert not [rec for rec in recs if rec.get("kind") == "module" and rec["module"] in COMMON]
    text = [rec for rec in recs if rec.get("kind") == "text"]
    assert [(rec["target"], rec["symbol"].split("+")[0]) for rec in text] == [("core1-7", PATCHED)], text


def test_fleet_writes_parquet_with_the_target_on_every_row(fleet, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "lsmod.parquet"
    r = vmscope("fleet", "lsmod", "--targets", str(fleet["file"]), "--workers", "2", "--parquet", str(out))
    assert r.returncode == 1 and out.exists(), r.stderr
    table = pq.read_table(out).to_pylist()
    names = {row["target"] for row in table if row.get("name")}
    assert len(names) == 36
    assert {row["name"] for row in table if row["target"] == "live3"} == set(COMMON + [EXTRA])
