"""``vmscope fleet``: ps, lsmod, dmesg or modules-diff over many guests.

    vmscope fleet ps|lsmod|dmesg|modules-diff --targets FILE
        [--json | --parquet OUT] [--workers N | --scheduler ADDRESS]

One Dask task per target, on a LocalCluster of N worker processes by
default or on an existing cluster (``--scheduler tcp://HOST:8786``). A
failed target is reported with its error and the rest go on; the exit
status is 1 if any target failed. Every record names its target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rich.console import Console
from rich.table import Table

from vmscope.fleet.targets import TargetListError, read_targets
from vmscope.fleet.work import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmscope fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--targets", required=True, metavar="FILE",
                   help="one target a line: gdb=HOST:PORT [qmp=HOST:PORT] [name=N], or core=PATH [name=N]")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON lines, one record a line")
    out.add_argument("--parquet", metavar="OUT", help="write the records to a Parquet file")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="worker processes of the local cluster (default: up to 4)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each live stub (default 30)")
    return p


def _cluster(args):
    from dask.distributed import Client, LocalCluster

    if args.scheduler:
        return Client(args.scheduler, timeout=args.timeout), None
    cluster = LocalCluster(n_workers=max(1, args.workers), threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


def _gather_with_progress(client, futures, err: Console, what: str) -> list:
    from dask.distributed import as_completed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = {}
    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(what, total=len(futures))
        for fut in as_completed(futures):
            results[fut.key] = fut.result()
            bar.advance(task)
    return [results[f.key] for f in futures]


def run_fleet(client, targets, command: str, timeout: float, err: Console) -> tuple[list[dict], list[dict]]:
    """(per-target results, records). The first target runs alone; its
    worker's per-build cache (kallsyms, BTF) is then shipped to every
    worker, so the rest of that kernel build decode nothing."""
    from vmscope.fleet.work import export_cache, install_cache, run_target
    from vmscope.vmi.linux.symcache import BUILD_CACHE

    seed = BUILD_CACHE.export(include_disk=True)
    if any(seed.values()):
        client.run(install_cache, seed)
    first = client.submit(run_target, targets[0], command, timeout, pure=False)
    results = _gather_with_progress(client, [first], err, f"{command}: first target")
    worker = next(iter(client.who_has(first).get(first.key, ())), None)
    if worker is not None and results[0]["ok"]:
        learned = client.run(export_cache, workers=[worker])[worker]
        client.run(install_cache, learned)
    rest = [client.submit(run_target, t, command, timeout, pure=False) for t in targets[1:]]
    results += _gather_with_progress(client, rest, err, f"{command}: {len(targets)} targets")
    records = []
    for r in results:
        if r["ok"]:
            records += [{"target": r["target"], **row} for row in r["rows"]]
        else:
            records.append({"target": r["target"], "error": r["error"]})
    if command == "modules-diff":
        records = [rec for rec in records if "error" in rec] + modules_diff(client, targets, results, timeout, err)
    return results, records


def modules_diff(client, targets, results, timeout: float, err: Console) -> list[dict]:
    """Modules that only some guests load, and kernel text that differs
    between guests of one build (beyond KASLR relocation)."""
    from vmscope.fleet.work import compare_text, text_of

    ok = [r for r in results if r["ok"]]
    by_name = {t.name: t for t in targets}
    records = []
    loaded: dict[str, set[str]] = {}
    for r in ok:
        for row in r["rows"]:
            loaded.setdefault(row["name"], set()).add(r["target"])
    for module, who in sorted(loaded.items()):
        if len(who) < len(ok):
            for name in sorted(who):
                records.append({"target": name, "kind": "module", "module": module,
                                "loaded_by": len(who), "of": len(ok)})
    builds: dict[str, list[str]] = {}
    for r in ok:
        builds.setdefault(r["build"] or "?", []).append(r["target"])
    for build, names in builds.items():
        if len(names) < 2 or build == "?":
            continue
        ref = by_name[names[0]]
        ref_text = client.submit(text_of, ref, timeout, pure=False)
        futures = [client.submit(compare_text, by_name[n], ref_text, timeout, pure=False) for n in names[1:]]
        compared = _gather_with_progress(client, futures, err, f"kernel text of build {build[:12]}")
        differing: dict[int, list[tuple[str, dict]]] = {}
        for c in compared:
            if not c["ok"]:
                records.append({"target": c["target"], "kind": "text", "error": c["error"]})
                continue
            for page in c["pages"]:
                differing.setdefault(page["offset"], []).append((c["target"], page))
        others = len(compared)
        for offset, hits in sorted(differing.items()):
            # most guests differ from the reference here: the reference is the odd one
            odd = ([(ref.name, {**hits[0][1], "address": None})]  # the symbol holds; the address was theirs
                   if len(hits) > others / 2 and others > 1 else hits)
            for name, page in odd:
                records.append({"target": name, "kind": "text", "build": build, "address": page["address"],
                                "symbol": page["symbol"]})
    return records


def _print_table(out: Console, command: str, records: list[dict]) -> None:
    keys: list[str] = []
    for rec in records:
        for k in rec:
            if k not in keys and k != "error":
                keys.append(k)
    table = Table(*[k.upper() for k in keys], title=f"{command}: {len(records)} records", title_justify="left")
    for rec in records:
        if "error" in rec:
            continue
        table.add_row(*["" if rec.get(k) is None else str(rec.get(k)) for k in keys])
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)  # the cluster's own chatter
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        targets = read_targets(args.targets)
    except TargetListError as e:
        err.print(f"vmscope fleet: error: {e}", markup=False)
        return 2
    try:
        import dask.distributed  # noqa: F401
    except ImportError:
        err.print("vmscope fleet: error: needs Dask: pip install 'vmscope[fleet]'")
        return 2
    t0 = time.monotonic()
    client, cluster = _cluster(args)
    try:
        results, records = run_fleet(client, targets, args.command, args.timeout, err)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    took = time.monotonic() - t0
    if args.json:
        for rec in records:
            print(json.dumps(rec, default=str))
    elif args.parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                              for k, v in rec.items()} for rec in records]), args.parquet)
    else:
        _print_table(out, args.command, records)
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        err.print(f"vmscope fleet: {r['target']}: {r['error']}", markup=False)
    cached = sum(1 for r in results if r.get("cached"))
    err.print(f"vmscope fleet: {len(results) - len(failed)} of {len(results)} targets in {took:.1f} s "
              f"({len(results) / took:.1f} targets/s); kernel symbols from a cache for {cached} (the rest decoded)",
              markup=False)
    return 1 if failed else 0
