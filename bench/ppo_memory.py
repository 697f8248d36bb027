"""Benchmark (not a test): PPO's memory per process by placement, side by side in one run.

    .venv/bin/python bench/ppo_memory.py [--model smollm2-135m-instruct] [--steps N] [--run-dir DIR]

Trains a small reward model from the same base (the reward stage, a few steps: its accuracy is
not the point), then runs the same PPO stage (policy, value head, reference, reward model) as:

- one process (no DeepSpeed)
- ZeRO-2 on 2 processes (the baseline of the ratios)
- ZeRO-3 on 2 processes: trained and frozen models sharded
- ZeRO-3 on 2 processes with frozen.offload (the frozen shards in CPU memory)
- ZeRO-3 on 2 processes with frozen.zero3: false (whole frozen copies on every process)

and prints each run's peak resident memory per process (the stage records it in its manifest),
seconds per step, and the ratios to ZeRO-2. On a CPU machine "offload" moves nothing (the
shards are in CPU memory already), and the peak includes ~0.5 GiB of libraries per process;
on GPUs the manifest also records peak GPU memory. Appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [  # name, ZeRO config or None, extra PPO keys
    ("one process", None, {}),
    ("ZeRO-2", "zero2", {}),
    ("ZeRO-3", "zero3", {}),
    ("ZeRO-3 + frozen.offload", "zero3", {"frozen": {"zero3": True, "offload": True},
                                          "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json")}),
    ("ZeRO-3, frozen whole", "zero3", {"frozen": {"zero3": False},
                                       "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json")}),
]
BASELINE = "ZeRO-2"


def _launch(args: list[str], zero: str | None) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    if zero is None:
        cmd = [sys.executable, "-m", "pipeline", *args]
    else:
        launcher = str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--master_port", str(random.randint(29600, 29999)),
               "--module", "pipeline", *args, "--deepspeed", str(ROOT / "configs" / "deepspeed" / f"{zero}.json")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--run-dir", default="runs/bench-ppo-memory")
    args = ap.parse_args()
    ppo = {"stage": "ppo", "policy": args.model, "reward": {"model": "stage:reward"}, "prompts": "synthetic:prompts",
           "max_eval_prompts": 4, "steps": args.steps, "rollout": {"prompts_per_step": 4, "max_new_tokens": 16},
           "ppo": {"epochs": 1, "minibatch_size": 4, "micro_batch_size": 2}, "optim": {"lr": 1e-6},
           "precision": "fp32"}
    stages = [
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}, "eval_fraction": 0.2},
        {"stage": "reward", "model": args.model, "preferences": "stage:preferences", "max_length": 64,
         "precision": "fp32", "optim": {"lr": 1e-5, "max_steps": 2, "per_device_batch_size": 4, "logging_steps": 1}},
    ] + [{**ppo, "name": f"ppo_{i}", **extra} for i, (_, _, extra) in enumerate(VARIANTS)]
    cfg_path = Path(args.run_dir) / "bench.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump({"run_dir": args.run_dir, "seed": 0, "stages": stages}, sort_keys=False))

    _launch(["run", str(cfg_path), "--stage", "preferences", "--stage", "reward"], None)
    rows = {}
    for i, (name, zero, _) in enumerate(VARIANTS):
        t0 = time.time()
        _launch(["run", str(cfg_path), "--stage", f"ppo_{i}", "--force"], zero)
        m = json.loads((Path(args.run_dir) / f"ppo_{i}" / "manifest.json").read_text())
        rows[name] = {"rss": m["distributed"]["memory_per_process"]["peak_rss_mib"],
                      "step_s": m["metrics"]["train/seconds"] / args.steps, "wall_s": time.time() - t0,
                      "placement": m["model"]["placement"]}
        print(f"{name}: peak RSS per process {rows[name]['rss']} MiB, {rows[name]['step_s']:.1f} s/step", flush=True)

    base = rows[BASELINE]
    base_rss, base_step = max(base["rss"]), base["step_s"]
    date, machine = time.strftime("%Y-%m-%d"), platform.machine()
    lines = [f"\n## PPO memory by placement (bench/ppo_memory.py), {date}, {args.model}, {args.steps} steps, "
             f"{os.cpu_count()} CPU cores, {machine}\n",
             "| run | processes | peak RSS per process (MiB) | vs ZeRO-2 | s/step | vs ZeRO-2 | reference / reward model |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {len(r['rss'])} | {' / '.join(f'{x:.0f}' for x in r['rss'])} | "
                     f"{max(r['rss']) / base_rss:.2f} | {r['step_s']:.1f} | {r['step_s'] / base_step:.2f} | "
                     f"{r['placement']['reference']} / {r['placement']['reward_model']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
