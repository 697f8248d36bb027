"""Benchmark (not a test): our reward stage against a plain TRL RewardTrainer script on the real HH-RLHF sample,
side by side in one run.

    .venv/bin/python bench/reward_vs_trl.py --split hh --train 300 --max-length 256   # the HH recipe's split
    .venv/bin/python bench/reward_vs_trl.py                    # 600 train / 300 eval pairs (about an hour)
    .venv/bin/python bench/reward_vs_trl.py --train 300 --eval 150

--split hh: the shipped split of configs/hh.yaml (feedback/data/hh): the first --train valid pairs of its training
part, every valid pair of its held-out evaluation part (no prompt in both); the rows: TRL, ours with the same
settings, and ours with the recipe's own settings (LoRA, learning rate, length grouping, from configs/hh.yaml)
for one epoch.
--split file (the default; needs ../shared/data beside the checkout): the sample's valid pairs in file order.

The pairs: the sample's valid pairs in file order (read by `rlhf data import`, the defective rows rejected with
reasons), the first --train for training and the next --eval for evaluation, the same files for every row.
Rows, each its own process, one run each:
- TRL RewardTrainer, a plain script with its defaults (lr 1e-4, batch 8, gradient checkpointing on), LoRA r16
  on peft's default targets (q_proj, v_proj), max length 384, one epoch, fp32; it drops over-long pairs itself;
- ours with the same settings (`stage: reward`), every pair it leaves out counted in skipped.jsonl;
- ours tuned for speed: no gradient checkpointing, length-grouped batches (`group_by_length`), lr 2e-4.
Reported: training time, held-out accuracy, the pairs each side trained and evaluated on (TRL drops pairs
longer than max_length; ours truncates them and leaves out, counted, only those whose prompt alone fills it),
peak RSS. Appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import PY, ROOT, WORK, measure, record  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"


def prepare_hh(n_train: int) -> tuple[Path, Path]:
    """The HH recipe's split (feedback/data/hh): the first n_train valid training pairs, every valid eval pair."""
    out = WORK / "reward-vs-trl"
    out.mkdir(parents=True, exist_ok=True)
    from feedback import hh

    files = {}
    for part in ("train", "eval"):
        files[part] = out / f"hh-{part}-valid.jsonl"
        subprocess.run([PY, "-m", "pipeline", "data", "import", str(hh.path(part)), "-o", str(files[part]), "--on-error",
                        "skip"], cwd=ROOT, check=True, capture_output=True)
    rows = [x for x in files["train"].read_text().splitlines() if x.strip()]
    train = out / f"hh-train-{n_train}.jsonl"
    train.write_text("\n".join(rows[:n_train]) + "\n")
    return train, files["eval"]


def recipe_row(train: Path, evals: Path, max_length: int) -> dict:
    """Our reward stage with configs/hh.yaml's settings (LoRA, lr, warm-up, length grouping), one epoch."""
    block = next(s for s in yaml.safe_load((ROOT / "configs" / "hh.yaml").read_text())["stages"]
                 if s["stage"] == "reward" and s.get("name", "reward") == "reward")
    optim = {**block["optim"], "epochs": 1}
    optim.pop("max_steps", None)
    return ours_row(train, evals, max_length, "rm_recipe", False,
                    {**block, "max_length": max_length, "optim": optim})


def prepare(n_train: int, n_eval: int) -> tuple[Path, Path]:
    out = WORK / "reward-vs-trl"
    out.mkdir(parents=True, exist_ok=True)
    every = out / "hh-valid.jsonl"
    subprocess.run([PY, "-m", "pipeline", "data", "import", str(DATA), "-o", str(every), "--on-error", "skip"],
                   cwd=ROOT, check=True, capture_output=True)
    rows = [x for x in every.read_text().splitlines() if x.strip()]
    if len(rows) < n_train + n_eval:
        raise SystemExit(f"{DATA}: {len(rows)} valid pairs, fewer than {n_train} + {n_eval}")
    train, evals = out / f"train-{n_train}.jsonl", out / f"eval-{n_eval}.jsonl"
    train.write_text("\n".join(rows[:n_train]) + "\n")
    evals.write_text("\n".join(rows[n_train : n_train + n_eval]) + "\n")
    return train, evals


def trl_row(train: Path, evals: Path, max_length: int) -> dict:
    from pipeline.models import resolve

    out = Path(tempfile.mkdtemp()) / "result.json"
    m = measure([PY, str(ROOT / "bench" / "peers" / "trl_reward.py"), "--model", resolve("smollm2-135m-instruct"),
                 "--train", str(train), "--eval", str(evals), "--max-length", str(max_length), "--out", str(out)],
                {**os.environ, "WANDB_MODE": "disabled"})
    r = json.loads(out.read_text())
    return {**m, "train_seconds": r["train_seconds"], "accuracy": r["accuracy"], "eval_pairs": r["eval_pairs_kept"],
            "train_pairs": r["train_pairs_kept"]}


def ours_row(train: Path, evals: Path, max_length: int, name: str, fast: bool, block: dict | None = None) -> dict:
    """Our reward stage: TRL's settings (fast: tuned for speed), or `block` (a reward stage of a config)."""
    run = WORK / "reward-vs-trl" / "run"
    stage = {"stage": "reward", "name": name, "model": "smollm2-135m-instruct", "preferences": "stage:hh_train",
             "eval_preferences": "stage:hh_eval", "tuning": "lora",
             "lora": {"r": 16, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
             "max_length": max_length, "precision": "fp32", "gradient_checkpointing": not fast,
             "optim": {"lr": 2e-4 if fast else 1e-4, "epochs": 1, "per_device_batch_size": 8, "logging_steps": 10,
                       "group_by_length": fast}}
    if block is not None:  # the model is SmolLM2 itself here (the recipe starts from its SFT stage)
        stage.update({k: v for k, v in block.items() if k not in ("model", "preferences", "eval_preferences")},
                     name=name)
    cfg = {"run_dir": str(run), "seed": 0, "stages": [
        {"stage": "preferences", "name": "hh_train", "data": {"path": str(train)}, "eval_fraction": 0},
        # every prompt of the evaluation file held out (the split rounds the number of held-out prompts up)
        {"stage": "preferences", "name": "hh_eval", "data": {"path": str(evals)}, "eval_fraction": 0.999}, stage]}
    path = WORK / "reward-vs-trl" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = measure([PY, "-m", "pipeline", "run", str(path), "--stage", "hh_train", "--stage", "hh_eval", "--stage", name,
                 "--force"], {**os.environ, "WANDB_MODE": "disabled"})
    man = json.loads((run / name / "manifest.json").read_text())
    return {**m, "train_seconds": man["metrics"]["train/seconds"], "accuracy": man["metrics"]["eval/accuracy"],
            "eval_pairs": man["counts"]["evaluated_on"], "train_pairs": man["counts"]["trained_on"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--eval", type=int, default=300)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--split", choices=("file", "hh"), default="file", help="file: the sample in file order (needs "
                   "../shared/data); hh: the shipped split of configs/hh.yaml")
    p.add_argument("--only", nargs="+", metavar="ROW", help="run only the rows whose name starts with these words "
                   "(e.g. TRL; the TRL row always runs: it is the baseline)")
    a = p.parse_args()
    if a.split == "hh":
        train, evals = prepare_hh(a.train)
        a.eval = sum(1 for x in evals.read_text().splitlines() if x.strip())
    elif not DATA.exists():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data beside the checkout")
    else:
        train, evals = prepare(a.train, a.eval)
    rows = {"TRL RewardTrainer, plain script": lambda: trl_row(train, evals, a.max_length),
            "ours, same settings": lambda: ours_row(train, evals, a.max_length, "rm_same", False),
            "ours, tuned for speed": lambda: ours_row(train, evals, a.max_length, "rm_fast", True)}
    if a.split == "hh":  # the speed row is the file split's question; this split asks about the recipe's settings
        del rows["ours, tuned for speed"]
        rows["ours, the HH recipe's settings (configs/hh.yaml)"] = lambda: recipe_row(train, evals, a.max_length)
    if a.only:
        rows = {n: fn for n, fn in rows.items() if n.startswith("TRL") or any(n.startswith(w) for w in a.only)}
    results = {}
    for name, fn in rows.items():
        results[name] = fn()
        r = results[name]
        print(f"{name}: {r['train_seconds']:.0f} s, accuracy {r['accuracy']:.3f} on {r['eval_pairs']} pairs", flush=True)
    base = results["TRL RewardTrainer, plain script"]
    lines = ["| row | training time (s) | time vs TRL | held-out accuracy | train pairs used | eval pairs used | "
             "peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['train_seconds']:.0f} | {r['train_seconds'] / base['train_seconds']:.2f}x | "
                     f"{r['accuracy']:.3f} | {r['train_pairs']} of {a.train} | {r['eval_pairs']} of {a.eval} | "
                     f"{r['peak_rss_mib']:,.0f} |")
    text = "\n".join(lines)
    what = (f"the HH recipe's split (feedback/data/hh): the first {a.train} valid pairs of its training part to train, "
            f"its {a.eval} valid held-out evaluation pairs to evaluate" if a.split == "hh" else
            f"the first {a.train} valid pairs to train, the next {a.eval} to evaluate")
    record("Reward model, ours against a plain TRL RewardTrainer script (bench/reward_vs_trl.py"
           + (" --split hh)" if a.split == "hh" else ")"),
           f"HH-RLHF harmless sample: {what}; "
           f"SmolLM2-135M-Instruct + LoRA r16 (q_proj, v_proj), max length {a.max_length}, one epoch, batch 8, "
           f"fp32 (the recipe row: its own LoRA and optimiser settings); one run each. Command: "
           f"`.venv/bin/python bench/reward_vs_trl.py "
           + (f"--split hh --train {a.train} --max-length {a.max_length}`." if a.split == "hh"
              else f"--train {a.train} --eval {a.eval}`."), text)

if __name__ == "__main__":
    main()
