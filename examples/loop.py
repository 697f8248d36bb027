"""Deploy, monitor, maintain: the whole loop on the demo's policies, with simulated users. `make loop` runs it
(after `make demo`); by hand: `python examples/loop.py [--run-dir runs/quickstart] [--out runs/loop]`.

1. serve the demo's SFT policy with `--monitor` (the traffic log, an SQLite file);
2. replay prompts through the official `openai` client, two answers per prompt: the traffic;
3. give feedback on every answer, a thumbs up or down and, for each prompt, which of its two answers is better.
   The "users" are SIMULATED: the shipped task's rule (feedback.synthetic:rule_score) stands in for them, and every
   feedback row says so in its comment;
4. `rlhf monitor` scores the traffic (reward model and rule) against the demo's evaluate stage;
5. `rlhf feedback export` turns the thumbs into unpaired rows (`rlhf data validate` checks them);
6. `rlhf run configs/loop.yaml`: round 2, a KTO stage on the exported feedback, starting from the served policy,
   then the evaluate stage: round 2 against round 1 on held-out prompts, with win rate and interval;
7. `rlhf report` of the loop's run.

The traffic's prompts are the training part of the synthetic prompts: the evaluation's held-out prompts never reach
the server, so round 2 is not measured on prompts its feedback came from.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RLHF = [sys.executable, "-m", "pipeline"]
RULE = "feedback.synthetic:rule_score"


def rlhf(*args: str) -> None:
    print("$ rlhf " + " ".join(args), flush=True)
    subprocess.run([*RLHF, *args], cwd=ROOT, check=True)


def traffic_prompts(n: int, seed: int = 0) -> list[str]:
    """The prompts the demo's policies were trained on (the held-out ones stay for the evaluation)."""
    from pipeline.data import read_prompts, resolve_data_path, split_by_prompt

    prompts = read_prompts(resolve_data_path("synthetic:prompts"))
    train, _ = split_by_prompt(prompts, 0.2, seed, prompt_of=lambda p: p)
    return train[:n]


def start_server(stage: Path, db: Path, key_env: str) -> tuple[subprocess.Popen, str]:
    """`rlhf serve policy STAGE --monitor DB` on a free port; its base URL once it answers."""
    proc = subprocess.Popen([*RLHF, "serve", "policy", str(stage), "--port", "0", "--monitor", str(db),
                             "--api-key-env", key_env], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:  # "serving dpo at http://127.0.0.1:PORT/v1 ..."
        print(f"  [serve] {line.rstrip()}", flush=True)
        if " at http://" in line:
            return proc, line.split(" at ", 1)[1].split()[0]
    raise SystemExit(f"the server stopped before it was ready (exit {proc.wait()})")


def replay_and_rate(base_url: str, key: str, model: str, prompts: list[str]) -> dict:
    """Two answers per prompt through the openai client; simulated feedback on each (a rating) and on each pair."""
    from openai import OpenAI

    from feedback.synthetic import rule_score

    client = OpenAI(base_url=base_url, api_key=key)
    counts = {"completions": 0, "ratings": 0, "preferences": 0, "up": 0}
    note = f"simulated user: {RULE}"
    for i, prompt in enumerate(prompts):
        answers = []
        for k in range(2):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=24, temperature=1.0, seed=1000 * i + k)
            text = reply.choices[0].message.content or ""
            answers.append((reply.id, rule_score(prompt, text)))
            counts["completions"] += 1
        for cid, score in answers:
            rating = "up" if score >= 0.6 else "down"
            client.post("/feedback", body={"id": cid, "rating": rating, "comment": note}, cast_to=object)
            counts["ratings"] += 1
            counts["up"] += rating == "up"
        (a, sa), (b, sb) = answers
        if sa != sb:
            better, worse = (a, b) if sa > sb else (b, a)
            client.post("/feedback", body={"id": better, "preferred_over": worse, "comment": note}, cast_to=object)
            counts["preferences"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/quickstart", help="the demo's run (make demo)")
    ap.add_argument("--out", default="runs/loop", help="where the traffic log, monitor and round 2 go")
    ap.add_argument("--prompts", type=int, default=96, help="prompts replayed (two answers each)")
    args = ap.parse_args(argv)
    run, out = ROOT / args.run_dir, ROOT / args.out
    for stage in ("sft", "reward", "evaluate"):
        if not (run / stage / "manifest.json").exists():
            raise SystemExit(f"{run / stage}: missing; run `make demo` first")
    out.mkdir(parents=True, exist_ok=True)
    db = out / "traffic.db"
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        f.unlink(missing_ok=True)  # each loop starts a fresh log

    key_env = "RLHF_LOOP_KEY"
    os.environ[key_env] = secrets.token_urlsafe(24)  # the server reads the key from the environment only
    server, url = start_server(run / "sft", db, key_env)
    try:
        started = time.monotonic()
        counts = replay_and_rate(url, os.environ[key_env], "sft", traffic_prompts(args.prompts))
        print(f"replayed {counts['completions']} completions in {time.monotonic() - started:.0f} s; simulated "
              f"feedback: {counts['ratings']} ratings ({counts['up']} up), {counts['preferences']} preferences",
              flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)

    rlhf("monitor", str(db), "--reward-model", str(run / "reward"), "--rule", RULE, "--baseline",
         str(run / "evaluate"), "-o", str(out / "monitor"))
    feedback = out / "feedback.unpaired.jsonl"
    rlhf("feedback", "export", str(db), "-o", str(feedback), "--kind", "unpaired")
    rlhf("data", "validate", str(feedback))
    rlhf("run", "configs/loop.yaml", "--set", f"run_dir={out / 'round2'}",
         "--set", f"stages.preferences.data.path={feedback}", "--set", f"models.round1={run / 'sft' / 'model'}")
    rlhf("report", str(out / "round2"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
