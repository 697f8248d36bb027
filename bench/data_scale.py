"""Benchmark (not a test): `rlhf data validate`, `import` and `stats`, and the preferences stage (`rlhf run` of a
config holding only it), on generated preference files of 1M and 10M pairs, side by side with
`datasets.load_dataset("json")` of the same file: wall time, the ratio to load_dataset's, and peak RSS.

    .venv/bin/python bench/data_scale.py                      # 1M and 10M pairs
    .venv/bin/python bench/data_scale.py --rows 1000000        # 1M only
    .venv/bin/python bench/data_scale.py --rows 20000 --no-record   # a quick look

Each file is generated as a stream (never held in memory) into --dir (default bench/.work/data_scale, on the disk of
the checkout; the free space is checked first: the file, the scan's spool and import's output take about 3.5x the
file), then each command runs in its own process under /usr/bin/time -v (peak RSS: "Maximum resident set size"),
one after the other. load_dataset gets a fresh cache directory each time, so that it converts the file to Arrow as a
first load does (a cached load would measure nothing). Each file is removed after its row.

The rows: pairs of 20-120 word texts (about 590 bytes a row, the issue's 587 MB per 1M), of which 0.1% repeat an
earlier pair (half with the other label: conflicts, so validate exits 1 and names them) and 0.01% have chosen ==
rejected: every line is valid JSON, so load_dataset reads the file as it is. The issue's targets: on 1M pairs
validate <= 2x load_dataset's time, validate and import <= 1.5 GB peak RSS; at 10M peak RSS within 10% of 1M's.
Appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import PY, ROOT, WORK, record  # noqa: E402

WORDS = ("the river is clean and calm today while a small boat drifts past old stone bridges under a grey sky "
         "people walk along the bank and talk about weather markets music trains books gardens letters maps "
         "lamps clocks windows bread apples tea coffee salt snow rain wind light shadow quiet loud bright dark").split()
BYTES_PER_ROW = 600  # what the generator writes, about


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def generate(path: Path, rows: int, seed: int = 0) -> int:
    """Write `rows` pairs as JSONL, streamed; returns the file's size in bytes."""
    rng = random.Random(seed)
    recent: list[dict] = []  # a window of earlier rows to repeat from (bounded)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            r = rng.random()
            if r < 0.001 and recent:
                row = dict(rng.choice(recent))
                if rng.random() < 0.5:
                    row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            elif r < 0.0011:
                same = text(rng, 20, 60)
                row = {"prompt": text(rng, 5, 20), "chosen": same, "rejected": same}
            else:
                row = {"prompt": text(rng, 5, 20), "chosen": text(rng, 20, 60), "rejected": text(rng, 20, 60)}
                if len(recent) < 1000:
                    recent.append(row)
                else:
                    recent[rng.randrange(1000)] = row
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` under /usr/bin/time -v: wall seconds, peak RSS (MiB), exit code."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if rss is None:
        raise RuntimeError(f"{cmd}: no /usr/bin/time output:\n{proc.stderr[-2000:]}")
    return {"seconds": wall, "rss_mib": int(rss.group(1)) / 1024, "rc": proc.returncode,
            "tail": proc.stderr.strip().splitlines()[:3]}


LOAD = ("import sys, datasets; datasets.disable_progress_bars(); "
        "ds = datasets.load_dataset('json', data_files=sys.argv[1], split='train', cache_dir=sys.argv[2]); "
        "print(len(ds))")


def stage_config(path: Path, work: Path) -> Path:
    """A run of one preferences stage on `path` (its rejected rows skipped and listed, 1% of prompts held out)."""
    cfg = work / "preferences.yaml"
    cfg.write_text(json.dumps({"run_dir": str(work / "run"), "seed": 0, "stages": [
        {"stage": "preferences", "data": {"path": str(path), "on_error": "skip"}, "eval_fraction": 0.01}]}))
    return cfg  # JSON is YAML


def run_one(rows: int, work: Path) -> list[dict]:
    path = work / f"pairs-{rows}.jsonl"
    print(f"generating {rows:,} pairs in {path} ...", flush=True)
    size = generate(path, rows)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(work)}  # the scan's spool on the same disk
    out = []
    try:
        cache = work / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        runs = [("datasets.load_dataset('json')", [PY, "-c", LOAD, str(path), str(cache)]),
                ("rlhf data validate", [PY, "-m", "pipeline", "data", "validate", str(path)]),
                ("rlhf data import --on-error skip", [PY, "-m", "pipeline", "data", "import", str(path), "-o",
                                                      str(work / "out.jsonl"), "--on-error", "skip"]),
                ("rlhf data stats", [PY, "-m", "pipeline", "data", "stats", str(path)]),
                ("preferences stage (rlhf run)", [PY, "-m", "pipeline", "run", str(stage_config(path, work))])]
        for name, cmd in runs:
            print(f"  {name} ...", flush=True)
            m = measure(cmd, env)
            shutil.rmtree(cache, ignore_errors=True)
            out.append({"rows": rows, "mb": size / 1e6, "what": name, **m})
            print(f"    {m['seconds']:.1f} s, {m['rss_mib']:.0f} MiB, exit {m['rc']}", flush=True)
    finally:
        for p in (path, work / "out.jsonl", work / "out.rejected.jsonl", work / "preferences.yaml"):
            p.unlink(missing_ok=True)
        shutil.rmtree(work / "run", ignore_errors=True)
    return out


def table(results: list[dict]) -> str:
    lines = ["| pairs | file (MB) | command | time (s) | vs load_dataset | peak RSS (MiB) | vs load_dataset | exit |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["rows"]: r for r in results if r["what"].startswith("datasets")}
    for r in results:
        b = base[r["rows"]]
        lines.append(f"| {r['rows']:,} | {r['mb']:.0f} | {r['what']} | {r['seconds']:.1f} | "
                     f"{r['seconds'] / b['seconds']:.2f}x | {r['rss_mib']:,.0f} | {r['rss_mib'] / b['rss_mib']:.2f}x | "
                     f"{r['rc']} |")
    by = {(r["rows"], r["what"]): r for r in results}
    sizes = sorted(base)
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        growth = [f"{w}: {by[(hi, w)]['rss_mib'] / by[(lo, w)]['rss_mib']:.2f}x"
                  for (n, w) in by if n == lo and (hi, w) in by]
        lines.append(f"\nPeak RSS at {hi:,} pairs over {lo:,}: " + "; ".join(growth))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dir", type=Path, default=WORK / "data_scale")
    ap.add_argument("--no-record", action="store_true", help="print the table only (not to bench/RESULTS.md)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:  # each size recorded as soon as it is measured (the 10M one takes a while)
        need = rows * BYTES_PER_ROW * 3.5
        free = shutil.disk_usage(args.dir).free
        if free < need:
            print(f"skipping {rows:,} pairs: {free / 1e9:.1f} GB free in {args.dir}, about {need / 1e9:.1f} GB "
                  "needed", file=sys.stderr)
            continue
        results += run_one(rows, args.dir)
        text = table(results)
        if args.no_record:
            print(text)
        else:
            record(f"Preference data at scale (bench/data_scale.py), up to {rows:,} pairs",
                   f"Generated pairs JSONL (0.1% repeated pairs, 0.01% chosen == rejected); each command in its own "
                   f"process under /usr/bin/time -v, one at a time. Command: `.venv/bin/python bench/data_scale.py "
                   f"--rows {' '.join(map(str, args.rows))}` (or `make bench`).", text)
    shutil.rmtree(args.dir / "hf-cache", ignore_errors=True)


if __name__ == "__main__":
    main()
