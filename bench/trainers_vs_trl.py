"""Benchmark (not a test): our SFT and DPO stages against plain scripts using TRL's SFTTrainer and DPOTrainer
with their defaults, side by side in one run: tokens per second and final training loss.

    .venv/bin/python bench/trainers_vs_trl.py             # 3 runs of each row after a warm-up
    .venv/bin/python bench/trainers_vs_trl.py --repeats 1 --no-warmup

Same work for both rows of a method: SmolLM2-135M-Instruct, full fine-tuning, the shipped synthetic data
(feedback/data/sft.jsonl; preferences.jsonl), batch 8, 10 optimizer steps, fp32 (TRL's configs default to bf16),
the same learning rate (TRL's default: 2e-5 for SFT, 1e-6 for DPO) and the same loss (SFT on every token, as
TRL's default; ours defaults to the assistant's tokens only). Everything else is each side's default: TRL's
configs turn on gradient checkpointing; ours leave it off. Tokens per second: the tokens of the examples the 10
steps consume (chat template applied, chosen + rejected for DPO), divided by the training time. Each run is its
own process; peak resident memory polled. The tables are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import PY, ROOT, WORK, measure, record  # noqa: E402

STEPS, BATCH = 10, 8
LR = {"sft": 2e-5, "dpo": 1e-6}
DATA = {"sft": ROOT / "feedback" / "data" / "sft.jsonl", "dpo": ROOT / "feedback" / "data" / "preferences.jsonl"}


def tokens_per_step(method: str) -> float:
    from pipeline.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    rows = [json.loads(x) for x in DATA[method].read_text().splitlines() if x.strip()]
    if method == "sft":
        n = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    else:
        n = [sum(len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r[k]}], tokenize=True,
                                             return_dict=True)["input_ids"]) for k in ("chosen", "rejected"))
             for r in rows]
    return BATCH * statistics.mean(n)


def trl_row(method: str, model_dir: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    m = measure([PY, str(ROOT / "bench" / "peers" / "trl_trainers.py"), "--method", method, "--model", model_dir,
                 "--data", str(DATA[method]), "--steps", str(STEPS), "--out", str(out)],
                {**os.environ, "WANDB_MODE": "disabled"})
    return {**m, **json.loads(out.read_text())}


def ours_row(method: str, tag: str) -> dict:
    run, name = WORK / "trainers-vs-trl", f"{method}_{tag}"
    optim = {"lr": LR[method], "max_steps": STEPS, "per_device_batch_size": BATCH, "logging_steps": 1, "scheduler": "linear"}
    if method == "sft":
        stage = {"stage": "sft", "name": name, "model": "smollm2-135m-instruct", "assistant_only_loss": False,
                 "data": {"train": "synthetic:sft", "eval_fraction": 0}, "precision": "fp32", "optim": optim}
    else:
        stage = {"stage": "dpo", "name": name, "policy": "smollm2-135m-instruct", "preferences": "stage:prefs",
                 "precision": "fp32", "optim": optim}
    cfg = {"run_dir": str(run), "seed": 0, "stages": [
        {"stage": "preferences", "name": "prefs", "data": {"path": "synthetic:preferences"}, "eval_fraction": 0},
        stage]}
    path = WORK / f"trainers-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = measure([PY, "-m", "pipeline", "run", str(path), "--force"], {**os.environ, "WANDB_MODE": "disabled"})
    manifest = json.loads((run / name / "manifest.json").read_text())
    rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
    loss = [r["train/loss"] for r in rows if "train/loss" in r][-1]
    return {**m, "train_seconds": manifest["metrics"]["train/seconds"], "final_loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-warmup", action="store_true")
    a = p.parse_args()
    from pipeline.models import resolve

    model_dir = resolve("smollm2-135m-instruct")
    lines = ["| method | row | training time (s) | tokens/s | vs TRL | final loss | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for method in ("sft", "dpo"):
        tokens = tokens_per_step(method) * STEPS
        peers = {f"TRL {method.upper()}Trainer, plain script": lambda tag, m=method: trl_row(m, model_dir),
                 f"ours, stage: {method}": lambda tag, m=method: ours_row(m, tag)}
        if not a.no_warmup:
            for fn in peers.values():
                fn("warmup")
        results = {name: [] for name in peers}
        for i in range(a.repeats):
            for name, fn in peers.items():
                results[name].append(fn(str(i)))
                r = results[name][-1]
                print(f"{name} run {i + 1}: {r['train_seconds']:.1f}s, loss {r['final_loss']:.4f}", flush=True)
        base = None
        for name, runs in results.items():
            secs = [r["train_seconds"] for r in runs]
            tps = statistics.median(tokens / s for s in secs)
            base = base or tps
            loss = statistics.median(r["final_loss"] for r in runs)
            peak = statistics.median(r["peak_rss_mib"] for r in runs)
            lines.append(f"| {method.upper()} | {name} | {statistics.median(secs):.1f} [{min(secs):.1f}, {max(secs):.1f}] "
                         f"| {tps:,.0f} | {tps / base:.2f}x | {loss:.4f} | {peak:,.0f} |")
    text = "\n".join(lines)
    record("SFT and DPO, ours against plain TRL trainer scripts (bench/trainers_vs_trl.py)",
           f"SmolLM2-135M-Instruct, full fine-tuning, batch {BATCH}, {STEPS} steps, fp32, same learning rate and "
           f"loss; median [min, max] of {a.repeats} run(s){'' if a.no_warmup else ' after a warm-up'}. Command: "
           f"`.venv/bin/python bench/trainers_vs_trl.py{' --repeats ' + str(a.repeats) if a.repeats != 3 else ''}"
           f"{' --no-warmup' if a.no_warmup else ''}`.", text)

if __name__ == "__main__":
    main()
