"""Benchmark (not a test): from `rlhf run` to the reward stage's first training step on a large preferences artifact,
the Arrow data path (pipeline/arrow.py) against the lists it replaced, side by side in one run.

    .venv/bin/python bench/stage_data.py [--pairs 1000000] [--eval-fraction 0.01] [--old PATH] [--work DIR]

Writes a preferences artifact of `--pairs` generated pairs (canonical rows, ids given, as the preferences stage
writes them), then runs the reward stage (tiny model, max_length 64, max_steps 1) in a fresh process for each row:

- `--old PATH`: the code at PATH (e.g. a git worktree of the commit before the Arrow path) on PYTHONPATH, when given
- ours, fresh: the Arrow cache (RUN_DIR/.cache/datasets) removed first, so every pair is parsed and tokenised
- ours, cached: the same run again, reading the tokenised rows the first one left

Each process stops at the first call of the trainer's training_step and records the seconds since it started and
its peak resident memory (VmHWM) then; the map's worker processes (ours, on a large file) are measured apart (their
largest peak, from getrusage of the finished children). Appends the table to bench/RESULTS.md; the generated files
are removed at the end (--keep keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
t0 = float(sys.argv[1])
out = sys.argv[2]
import trl

def first_step(self, *args, **kwargs):
    peak = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(out, "w") as f:
        json.dump({"seconds": time.time() - t0, "peak_rss_mib": peak, "workers_peak_rss_mib": workers,
                   "rows": len(self.train_dataset)}, f)
    sys.stdout.flush()
    os._exit(0)

trl.RewardTrainer.training_step = first_step
from pipeline.cli import main
sys.exit(main(["run", sys.argv[3], "--stage", "reward", "--force"]))
"""


def generate(run_dir: Path, n: int, eval_fraction: float) -> None:
    """A complete preferences artifact of n generated pairs (the last eval_fraction of them held out)."""
    sys.path.insert(0, str(ROOT))
    from pipeline import artifacts

    stage = run_dir / "preferences"
    stage.mkdir(parents=True, exist_ok=True)
    n_eval = max(1, int(n * eval_fraction))
    topics = ["river", "garden", "city", "library", "mountain", "forest", "bakery", "ocean", "bridge", "village"]
    for name, rows in (("preferences.jsonl", range(n - n_eval)), ("eval.jsonl", range(n - n_eval, n))):
        with open(stage / name, "w") as f:
            for i in rows:
                t = topics[i % len(topics)]
                f.write(json.dumps({"id": f"p{i}", "prompt": f"Tell me about the {t} number {i}.",
                                    "chosen": f"The {t} {i} is calm and lovely, with {i % 97} green banks.",
                                    "rejected": f"The {t} {i} is dirty and loud.", "source": "human",
                                    "tie": False}) + "\n")
    manifest = artifacts.build_manifest(stage="preferences", kind="preferences", config_hash="bench", inputs={},
                                        outputs={"train": "preferences.jsonl", "eval": "eval.jsonl"}, metrics={},
                                        counts={"train": n - n_eval, "eval": n_eval})
    artifacts.write_json(stage / artifacts.MANIFEST, manifest)


def config(work: Path, run_dir: Path) -> Path:
    import yaml

    path = work / "reward.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "seed": 0,
        "stages": [{"stage": "preferences", "data": {"path": str(run_dir / "preferences" / "preferences.jsonl")}},
                   {"stage": "reward", "model": "tiny", "preferences": "stage:preferences", "max_length": 64,
                    "precision": "fp32", "optim": {"max_steps": 1, "per_device_batch_size": 8, "logging_steps": 1}}],
    }, sort_keys=False))
    return path


def measure(code: Path, cfg: Path, work: Path, label: str) -> dict:
    out = work / f"{label.replace(' ', '_').replace(',', '')}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(t0), str(out), str(cfg)], env=env, cwd=str(work),
                          capture_output=True, text=True)
    if not out.exists():
        raise SystemExit(f"{label}: no training step reached (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    print(f"{label}: {result}", flush=True)
    return {"row": label, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--eval-fraction", type=float, default=0.01)
    ap.add_argument("--old", type=Path, default=None, help="the code before the Arrow path (a git worktree)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "stage-data")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-results", action="store_true", help="print the table only")
    args = ap.parse_args()

    work = args.work.resolve()
    run_dir = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.time()
    generate(run_dir, args.pairs, args.eval_fraction)
    size = (run_dir / "preferences" / "preferences.jsonl").stat().st_size + (run_dir / "preferences" / "eval.jsonl").stat().st_size
    print(f"generated {args.pairs:,} pairs ({size / 2**20:.0f} MiB) in {time.time() - t:.0f}s", flush=True)
    cfg = config(work, run_dir)
    rows = []
    if args.old:
        rows.append(measure(args.old.resolve(), cfg, work, "lists (before)"))
    shutil.rmtree(run_dir / ".cache", ignore_errors=True)
    rows.append(measure(ROOT, cfg, work, "Arrow, fresh"))
    rows.append(measure(ROOT, cfg, work, "Arrow, cached"))

    base = rows[0]
    lines = ["| row | seconds to first step | vs first row | peak RSS (MiB) | vs first row | map workers' peak RSS (MiB) "
             "| training rows |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['seconds']:.0f} | {r['seconds'] / base['seconds']:.2f}x | "
                     f"{r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | "
                     f"{r['workers_peak_rss_mib']:,.0f} | {r['rows']:,} |")
    table = "\n".join(lines)
    header = (f"\n## Reward stage data path, start to first training step (bench/stage_data.py), "
              f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores\n\n"
              f"{args.pairs:,} generated pairs ({size / 2**20:.0f} MiB of JSONL), {args.eval_fraction:g} held out; "
              "tiny model, max_length 64, the process stopped at its first training step.\n\n")
    print(header + table)
    if not args.no_results:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(header + table + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
