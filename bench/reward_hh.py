"""Benchmark (not a test): a reward model from SmolLM2-135M-Instruct on the real HH-RLHF sample.

    .venv/bin/python bench/reward_hh.py [--steps N] [--max-length N] [--run-dir DIR]

Imports the valid pairs of ../shared/data/hh-rlhf-harmless-sample.jsonl (1,198 of 1,200 rows since rows with
consecutive turns of one role are merged, not rejected; the defective ones are rejected with reasons), splits them by
prompt (10% held out), trains a LoRA reward
model, and prints held-out pairwise accuracy beside the untrained model's, and the time.
Appends the result to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--run-dir", default="runs/bench-reward-hh")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data beside the checkout")
    cfg = {
        "run_dir": args.run_dir,
        "seed": 0,
        "stages": [
            {"stage": "preferences", "data": {"path": str(DATA), "on_error": "skip"}, "eval_fraction": 0.1},
            {"stage": "reward", "model": "smollm2-135m-instruct", "preferences": "stage:preferences",
             "tuning": "lora", "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
             "max_length": args.max_length, "precision": "auto",
             "optim": {"lr": 2e-4, "max_steps": args.steps, "per_device_batch_size": args.batch_size, "logging_steps": 10,
                       "warmup_ratio": 0.05}},
        ],
    }
    cfg_path = Path(args.run_dir) / "bench.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    from pipeline.config import load_pipeline
    from pipeline.runner import run_pipeline

    t0 = time.time()
    run_pipeline(load_pipeline(cfg_path), force=True)
    seconds = time.time() - t0
    m = json.loads((Path(args.run_dir) / "reward" / "manifest.json").read_text())
    p = json.loads((Path(args.run_dir) / "preferences" / "manifest.json").read_text())
    line = (f"| {time.strftime('%Y-%m-%d')} | smollm2-135m-instruct LoRA r16 | {p['counts']['train']} / "
            f"{p['counts']['eval']} | {args.steps} x {args.batch_size} | {args.max_length} | "
            f"{m['metrics']['eval/accuracy_initial']:.3f} | {m['metrics']['eval/accuracy']:.3f} | "
            f"{m['metrics']['train/seconds']:.0f} s ({seconds:.0f} s total) | {platform.processor() or platform.machine()} |")
    print(line)
    results = ROOT / "bench" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results\n\n## Reward model on HH-RLHF harmless sample (bench/reward_hh.py)\n\n"
                           "| date | model | train / eval pairs | steps x batch | max_length | accuracy untrained | "
                           "accuracy trained | train time | machine |\n|---|---|---|---|---|---|---|---|---|\n")
    with open(results, "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
