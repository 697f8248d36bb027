"""Benchmark (not a test): our PPO against TRL 1.12's PPOTrainer, side by side in one run on one machine.

    .venv/bin/python bench/ppo_vs_trl.py              # warm-up + 3 repeats of each row (about 15 minutes on 2 cores)
    .venv/bin/python bench/ppo_vs_trl.py --quick      # 1 run each, fewer episodes (about 3 minutes)
    .venv/bin/python bench/ppo_vs_trl.py --against fc03a1c --no-trl   # ours now against ours at an earlier commit

The same work for every row: SmolLM2-135M-Instruct (an SFT policy and a reward model prepared once, by this
project's own stages, under bench/.work/), LoRA r16 on q/k/v/o for the policy (the reference is the disabled
adapter), 8 prompts per step, 32 new tokens, 2 PPO epochs, 2 minibatches, 32 episodes, fp32. Rows:

- TRL 1.12 `trl.experimental.ppo.PPOTrainer` with a separate value model (the reward model's weights, in full):
  installed by this script into bench/.peers/trl-1.12.0 (`pip install --no-deps --target`) and put first on
  PYTHONPATH for that process only, so it never becomes a project dependency;
- ours with `value_model: critic` (the like-for-like row);
- ours with `value_model: head` (a value head on the policy: what TRL cannot do);
- with `--against REF`: the same two rows of ours as of git commit REF (its files exported by `git archive` into
  bench/.work/ and put first on PYTHONPATH for those processes), to measure a change side by side.

Each run is its own process. Reported: PPO training time (the loop, without loading), episodes per second,
the whole process's wall time, and its peak resident memory (VmHWM, polled). Median [min, max] over the
repeats, and the ratios to TRL. The table is appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / ".peers"
WORK = ROOT / "bench" / ".work"
TRL_PEER = "trl==1.12.0"
PY = sys.executable


def record(title: str, setup: str, text: str) -> None:
    """Print a result table and append it to bench/RESULTS.md under a heading with the date and machine."""
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(f"\n## {title}, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores\n\n"
                f"{setup}\n\n{text}\n")


def install_trl_peer() -> Path:
    target = PEERS / "trl-1.12.0"
    if not (target / "trl" / "experimental" / "ppo" / "ppo_trainer.py").exists():
        print(f"installing {TRL_PEER} into {target} (for the peer's process only)", flush=True)
        subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), TRL_PEER], check=True)
    return target


def prepare() -> Path:
    """An SFT policy (LoRA, merged) and a full reward model from SmolLM2, made once by our own stages."""
    run = WORK / "ppo-vs-trl"
    cfg = {"run_dir": str(run), "seed": 0, "models": {"base": "smollm2-135m-instruct"}, "stages": [
        {"stage": "sft", "model": "base", "data": {"train": "synthetic:sft", "max_rows": 128}, "tuning": "lora",
         "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, "max_length": 64,
         "precision": "fp32", "optim": {"lr": 1e-3, "epochs": 1, "per_device_batch_size": 8}},
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
        {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences", "max_length": 64,
         "precision": "fp32", "optim": {"lr": 2e-5, "max_steps": 10, "per_device_batch_size": 8}}]}
    path = WORK / "ppo-vs-trl.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([PY, "-m", "pipeline", "run", str(path)], cwd=ROOT, check=True)
    return run


def measure(cmd: list[str], env: dict) -> dict:
    """Run one peer process; its wall time and peak resident memory (VmHWM, read until it exits)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def poll():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024.0)
            except OSError:
                pass
            time.sleep(0.25)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = proc.communicate()[0]
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{out[-3000:]}")
    return {"wall_seconds": time.time() - t0, "peak_rss_mib": peak[0]}


def trl_row(run: Path, trl_path: Path, episodes: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    env = {**os.environ, "PYTHONPATH": str(trl_path), "WANDB_MODE": "disabled"}
    m = measure([PY, str(ROOT / "bench" / "peers" / "trl_ppo.py"), "--policy", str(run / "sft" / "model"),
                 "--reward", str(run / "reward" / "model"), "--prompts", str(ROOT / "feedback" / "data" / "prompts.jsonl"),
                 "--episodes", str(episodes), "--out", str(out)], env)
    return {**m, **json.loads(out.read_text())}


def checkout(ref: str) -> Path:
    """The project's files as of git commit `ref`, exported once into bench/.work/ref-SHA (never a worktree)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    target = WORK / f"ref-{sha}"
    if not (target / "pipeline").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def ours_row(run: Path, value_model: str, episodes: int, tag: str, code: Path | None = None) -> dict:
    """Our PPO (this checkout, or the project's files at `code`) on the benchmark's work."""
    name = f"bench_{value_model}_{code.name if code else 'now'}_{tag}"
    ppo = {"stage": "ppo", "name": name, "policy": "stage:sft", "reward": {"model": "stage:reward", "normalize": False},
           "prompts": "synthetic:prompts", "eval_fraction": 0, "steps": episodes // 8, "tuning": "lora",
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "value_model": value_model, "precision": "fp32", "rollout": {"prompts_per_step": 8, "max_new_tokens": 32},
           "ppo": {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 4}, "optim": {"lr": 1e-5}}
    cfg = {"run_dir": str(run), "seed": 0, "stages": [
        {"stage": "sft", "model": "smollm2-135m-instruct", "data": {"train": "synthetic:sft"}},
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
        {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences"}, ppo]}
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "WANDB_MODE": "disabled", **({"PYTHONPATH": str(code)} if code else {})}
    m = measure([PY, "-m", "pipeline", "run", str(path), "--stage", name, "--force"], env)
    manifest = json.loads((run / name / "manifest.json").read_text())
    rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
    phases = {k[len("ppo/time/"):]: sum(r[k] for r in rows if k in r) / len(rows)
              for k in rows[0] if k.startswith("ppo/time/")}
    return {**m, "train_seconds": manifest["metrics"]["train/seconds"], "episodes": episodes, "phases": phases}


def phase_table(results: dict[str, list[dict]]) -> str:
    """Where a step's time goes in our rows (ppo/time/* of metrics.jsonl): mean seconds per step, and shares."""
    names = ["generate", "reward", "old_logprobs_values", "reference", "update"]
    lines = ["| row | " + " | ".join(names) + " | step |", "|---" * (len(names) + 2) + "|"]
    for row, runs in results.items():
        if "phases" not in runs[0]:
            continue
        mean = {k: statistics.mean(r["phases"].get(k, 0.0) for r in runs) for k in names + ["step"]}
        lines.append(f"| {row} | " + " | ".join(f"{mean[k]:.2f} s ({mean[k] / mean['step']:.0%})" for k in names)
                     + f" | {mean['step']:.2f} s |")
    return "\n".join(lines)


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("train_seconds", "wall_seconds", "peak_rss_mib"):
        values = [r[key] for r in runs]
        out[key] = (statistics.median(values), min(values), max(values))
    eps = [r["episodes"] / r["train_seconds"] for r in runs]
    out["episodes_per_second"] = (statistics.median(eps), min(eps), max(eps))
    return out


def table(rows: dict[str, dict]) -> str:
    """One line per row, with ratios to the first row (TRL's, unless --no-trl)."""
    first = next(iter(rows))
    base = rows[first]
    short = "TRL" if first.startswith("TRL") else "the first row"
    lines = [f"| row | PPO training time (s) | episodes/s | vs {short} | whole process (s) | peak RSS (MiB) | vs {short} |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda t: f"{t[0]:.1f} [{t[1]:.1f}, {t[2]:.1f}]"  # noqa: E731
    for name, s in rows.items():
        speed = s["episodes_per_second"][0] / base["episodes_per_second"][0]
        mem = s["peak_rss_mib"][0] / base["peak_rss_mib"][0]
        eps = s["episodes_per_second"]
        lines.append(f"| {name} | {fmt(s['train_seconds'])} | {eps[0]:.3f} [{eps[1]:.3f}, {eps[2]:.3f}] | "
                     f"{speed:.2f}x | {fmt(s['wall_seconds'])} | {s['peak_rss_mib'][0]:,.0f} | {mem:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one run of each row, 16 episodes, no warm-up")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--against", metavar="REF", help="also run our PPO as of this git commit, side by side")
    p.add_argument("--no-trl", action="store_true", help="leave TRL's row out (with --against: ours then and now)")
    a = p.parse_args()
    episodes, repeats, warmup = (16, 1, False) if a.quick else (32, a.repeats, True)
    run = prepare()
    peers = {}
    if a.against:
        old = checkout(a.against)
        peers[f"ours at {a.against}, value_model: critic"] = lambda tag: ours_row(run, "critic", episodes, tag, old)
        peers[f"ours at {a.against}, value_model: head"] = lambda tag: ours_row(run, "head", episodes, tag, old)
    if not a.no_trl:
        trl_path = install_trl_peer()
        peers = {"TRL 1.12 PPOTrainer (value model)": lambda tag: trl_row(run, trl_path, episodes), **peers}
    peers.update({"ours, value_model: critic (like for like)": lambda tag: ours_row(run, "critic", episodes, tag),
                  "ours, value_model: head": lambda tag: ours_row(run, "head", episodes, tag)})
    if warmup:  # the first process pays for cold caches (files, DeepSpeed's import): not counted
        for name, fn in peers.items():
            print(f"warm-up: {name}", flush=True)
            fn("warmup")
    results: dict[str, list[dict]] = {name: [] for name in peers}
    for i in range(repeats):  # interleaved, so that drift in the machine's speed affects every row alike
        for name, fn in peers.items():
            results[name].append(fn(str(i)))
            r = results[name][-1]
            print(f"{name} run {i + 1}: {r['train_seconds']:.1f}s training, {r['peak_rss_mib']:.0f} MiB", flush=True)
    rows = {name: summarise(runs) for name, runs in results.items()}
    text = table(rows) + "\n\nWhere our PPO step's time goes (mean seconds per step over the runs, and its share):\n\n" \
        + phase_table(results)
    flags = (" --quick" if a.quick else "") + (f" --against {a.against}" if a.against else "") \
        + (" --no-trl" if a.no_trl else "")
    against = "TRL 1.12" if not a.no_trl else f"ours at {a.against}" if a.against else "itself"
    record(f"PPO, ours against {against} (bench/ppo_vs_trl.py{flags})",
           f"SmolLM2-135M-Instruct, LoRA r16 q/k/v/o, 8 prompts/step, 32 new tokens, 2 epochs x 2 minibatches, "
           f"{episodes} episodes, fp32; median [min, max] of {repeats} run(s) each"
           f"{' after a warm-up' if warmup else ''}, interleaved. Command: `.venv/bin/python bench/ppo_vs_trl.py"
           f"{flags}` (or `make bench`).", text)

if __name__ == "__main__":
    main()
