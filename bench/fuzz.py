#!/usr/bin/env python3
"""A long coverage-guided campaign against the stub (atheris), per target,
and the line coverage it reaches in vmscope/rsp and vmscope/gdbserver.

    python bench/fuzz.py [--seconds 300] [--targets emu,kvm]

Each campaign starts from the corpus kept in tests/fuzz/corpus/rsp (copied:
the repository's stays as it is) and prints libFuzzer's summary, the packets
fed to the session and packets/s; the coverage run then replays the final
corpus under ``coverage`` and prints the percentage of lines reached.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "fuzz", "rsp_atheris.py")
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus", "rsp")


def campaign(target: str, seconds: int, work: str) -> dict:
    r = subprocess.run([sys.executable, HARNESS, "--target", target, f"-max_total_time={seconds}", "-timeout=30",
                        f"-artifact_prefix={work}/", work], capture_output=True, text=True)
    stats = [ln for ln in r.stderr.splitlines() if ln.startswith("vmscope-fuzz:")]
    done = re.findall(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE)\s+cov: (\d+)", r.stderr)
    crashes = [f for f in os.listdir(work) if f.startswith(("crash-", "timeout-"))]
    return {"rc": r.returncode, "last": stats[-1] if stats else "(no packets)", "runs": done[-1][0] if done else "?",
            "edges": done[-1][1] if done else "?", "crashes": crashes, "tail": r.stderr[-1500:]}


def coverage_of(corpus_dir: str, target: str) -> str:
    data = os.path.join(corpus_dir, ".coverage")
    subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}", "--source=vmscope.rsp,vmscope.gdbserver",
                    HARNESS, "--target", target, "--replay", corpus_dir], capture_output=True, text=True, cwd=ROOT)
    rep = subprocess.run([sys.executable, "-m", "coverage", "report", f"--data-file={data}"], capture_output=True,
                         text=True, cwd=ROOT)
    total = [ln for ln in rep.stdout.splitlines() if ln.startswith("TOTAL")]
    return total[0] if total else rep.stdout[-500:] + rep.stderr[-500:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--targets", default="emu,kvm")
    args = ap.parse_args()
    failed = False
    for target in args.targets.split(","):
        work = tempfile.mkdtemp(prefix=f"vmscope-fuzz-{target}-")
        shutil.rmtree(work)
        shutil.copytree(CORPUS, work)
        res = campaign(target, args.seconds, work)
        print(f"{target}: {res['runs']} inputs, {res['edges']} coverage edges; {res['last']}")
        print(f"{target}: line coverage of vmscope/rsp and vmscope/gdbserver over the final corpus: "
              f"{coverage_of(work, target)}")
        if res["crashes"] or res["rc"]:
            failed = True
            print(f"{target}: FOUND {res['crashes']} (exit {res['rc']}); corpus and artifacts in {work}\n{res['tail']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
