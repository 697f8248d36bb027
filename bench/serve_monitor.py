"""Benchmark (not a test): what `--monitor DB` (the traffic log, one committed SQLite row per answer) costs a served
policy's latency, side by side with the same server without it.

    .venv/bin/python bench/serve_monitor.py                           # smollm2-135m-instruct, 30 requests each way
    .venv/bin/python bench/serve_monitor.py --model tiny --requests 60

Two `rlhf serve policy` processes of the same model (a policy artifact made here around a copy of it), both
alive for the whole run, one with `--monitor` (the log in bench/.work), one without. The same prompts, greedy, the
same max_tokens, so both generate the same tokens (checked); one request at a time through the official `openai`
client, alternating which server goes first in each round, after a warm-up of 3 requests each. Reported: median,
mean and p95 latency as the client sees it (request sent to answer parsed), the ratio with/without of the medians
and of the totals, and the median of the per-round ratios. The issue's bar: within 10% (ratio <= 1.10).
Appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import PY, ROOT, WORK, record  # noqa: E402

PROMPTS = ["Tell me about the river.", "Describe the sea.", "Name three colours.", "What is a cloud?",
           "Write a line about winter.", "Why do birds sing?", "Explain rain to a child.", "What is a map for?",
           "Give me a tip for sleeping well.", "Describe a quiet street."]


def policy_artifact(model: str, where: Path) -> Path:
    """RUN_DIR/policy: a manifest and a copy of the model directory (an artifact may hold no symbolic link)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.models import resolve

    stage = where / "run" / "policy"
    shutil.copytree(resolve(model), stage / "model")
    (stage / "manifest.json").write_text(json.dumps({"schema_version": 1, "stage": "policy", "kind": "policy",
                                                     "status": "complete", "outputs": {"model": "model"}}))
    return stage


def start(stage: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PY, "-m", "pipeline", "serve", "policy", str(stage), "--port", "0", *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        m = re.match(r"serving \S+ at http://127\.0\.0\.1:(\d+)/v1", line)
        if m:
            return proc, int(m.group(1))
    raise SystemExit(f"server exited {proc.wait()} before it was ready:\n{''.join(seen)}")


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=30, help="timed requests to each server")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    import openai

    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        stage, db = policy_artifact(args.model, Path(tmp)), Path(tmp) / "traffic.db"
        servers = {"without --monitor": start(stage, []), "with --monitor": start(stage, ["--monitor", str(db)])}
        try:
            clients = {k: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
                       for k, (_, port) in servers.items()}
            times: dict[str, list[float]] = {k: [] for k in servers}

            def ask(name: str, prompt: str) -> tuple[float, str]:
                t0 = time.perf_counter()
                r = clients[name].chat.completions.create(model="policy", messages=[{"role": "user", "content": prompt}],
                                                          temperature=0, max_tokens=args.max_tokens)
                return time.perf_counter() - t0, r.choices[0].message.content

            for i in range(3):  # warm-up: first requests pay for lazy initialisation
                for name in servers:
                    ask(name, PROMPTS[i])
            for i in range(args.requests):
                order = list(servers) if i % 2 == 0 else list(reversed(servers))
                answers = {}
                for name in order:
                    seconds, answers[name] = ask(name, PROMPTS[i % len(PROMPTS)])
                    times[name].append(seconds)
                assert len(set(answers.values())) == 1, f"the two servers answered round {i} differently"
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
        sys.path.insert(0, str(ROOT))
        from feedback.traffic import TrafficLog

        rows = TrafficLog(db, readonly=True).counts()["completions"]
        assert rows == args.requests + 3, f"the traffic log holds {rows} rows, expected {args.requests + 3}"

    off, on = times["without --monitor"], times["with --monitor"]
    lines = ["| server | median latency (ms) | mean (ms) | p95 (ms) | with / without (medians) | (totals) |",
             "|---|---|---|---|---|---|"]
    for name, xs in (("without --monitor", off), ("with --monitor", on)):
        ratio = (statistics.median(xs) / statistics.median(off), sum(xs) / sum(off))
        lines.append(f"| {name} | {1000 * statistics.median(xs):.1f} | {1000 * statistics.mean(xs):.1f} | "
                     f"{1000 * p95(xs):.1f} | {ratio[0]:.3f} | {ratio[1]:.3f} |")
    per_round = statistics.median(a / b for a, b in zip(on, off))
    text = "\n".join(lines) + f"\n\nMedian of the per-round ratios (with / without): {per_round:.3f}; bar: <= 1.10."
    setup = (f"{args.model}, {args.requests} sequential greedy requests to each server (max_tokens "
             f"{args.max_tokens}, the same {len(PROMPTS)} prompts in turn), interleaved, after 3 warm-up requests "
             f"each; the log in bench/.work. Command: `.venv/bin/python bench/serve_monitor.py --model {args.model} "
             f"--requests {args.requests}`.")
    record("Serving latency with and without the traffic log (bench/serve_monitor.py)", setup, text)


if __name__ == "__main__":
    main()
