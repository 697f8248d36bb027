"""One `rlhf monitor` run: read the traffic log, score what is new, summarise, write monitor.json and monitor.html.

    result = monitor("traffic.db", "runs/tiny/monitor", reward_model="runs/tiny/reward",
                     rule="feedback.synthetic:rule_score", baseline="runs/tiny/evaluate", window="200")
"""

from __future__ import annotations

import time
from pathlib import Path

from feedback.traffic import TrafficLog
from pipeline.artifacts import MANIFEST, load_artifact, write_atomic, write_json
from pipeline.monitor.baseline import Baseline, load_baseline, served_names
from pipeline.monitor.page import render
from pipeline.monitor.scoring import (JudgeScorer, RewardModelScorer, RuleScorer, ScoreStore, score_new,
                                      traffic_items)
from pipeline.monitor.summary import distribution, parse_window, split, summarise
from rlhf.errors import InvalidInput, UsageError

SCORES = "scores.sqlite"


def _reward_path(path: str) -> str:
    """A reward-model artifact (or its model/ directory), checked before anything is scored."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--reward-model {path} does not exist (a reward stage's artifact, e.g. runs/tiny/reward)")
    if (p / MANIFEST).exists():
        try:
            load_artifact(p, "reward_model", role="--reward-model")
        except InvalidInput as exc:
            raise UsageError(str(exc)) from None
    return path


def build_scorers(reward_model: str | None, rule: str | None, judge: str | None, baseline: Baseline | None,
                  trust_remote_code: bool, batch_size: int) -> list:
    if judge and baseline is None:
        raise UsageError("--judge compares each answer with the evaluate stage's baseline answer to the same prompt: "
                         "give --baseline RUN_DIR/evaluate")
    if judge and not baseline.references:
        raise UsageError(f"--judge: {baseline.dir} holds no answers of its baseline policy to judge against")
    scorers = []
    if reward_model:
        scorers.append(RewardModelScorer(_reward_path(reward_model), trust_remote_code, batch_size))
    if rule:
        scorers.append(RuleScorer(rule))
    if judge:
        scorers.append(JudgeScorer(judge, baseline.references, f"{baseline.dir}:{baseline.reference}"))
    return scorers


def _baseline_summary(b: Baseline, scores: dict[str, dict]) -> tuple[dict, dict[str, list[float]]]:
    """What the monitor says of the baseline, and its values per drift metric (reward and rule as scored here)."""
    ids = [it.id for it in b.items()]
    values = {name: [s[i] for i in ids if s.get(i) is not None] for name, s in scores.items() if name != "judge"}
    values["length"] = [x for x in b.lengths if isinstance(x, (int, float))]
    eos = [e for e in b.eos if isinstance(e, bool)]
    info = {"dir": str(b.dir), "policy": b.policy, "reference": b.reference, "answers": len(b.responses),
            "scores": {k: distribution(v) for k, v in values.items() if v},
            "eos_rate": sum(eos) / len(eos) if eos else None, "evaluate_metrics": b.metrics}
    return info, values


def monitor(db: str, out_dir: str, reward_model: str | None = None, rule: str | None = None,
            judge: str | None = None, baseline: str | None = None, baseline_policy: str | None = None,
            window: str = "100", alpha: float = 0.01, min_rows: int = 20, trust_remote_code: bool = False,
            batch_size: int = 32) -> dict:
    """Score the new rows, summarise every row, write OUT_DIR/monitor.json and OUT_DIR/monitor.html."""
    win = parse_window(window)
    if not 0 < alpha < 1 or min_rows < 2:
        raise UsageError(f"--alpha must be in (0, 1) and --min-rows at least 2, got {alpha} and {min_rows}")
    if not (reward_model or rule or judge):
        raise UsageError("nothing to score: give --reward-model, --rule or --judge (or several)")
    log = TrafficLog(db, readonly=True)
    try:
        rows, feedback, counts = list(log.completions()), list(log.feedback()), log.counts()
    finally:
        log.close()
    split(rows, win)  # a time window too short for the log's span is refused before anything is scored
    base = load_baseline(baseline, baseline_policy, served_names(rows)) if baseline else None
    scorers = build_scorers(reward_model, rule, judge, base, trust_remote_code, batch_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out_dir}: not a directory")
    store = ScoreStore(out / SCORES)
    items = traffic_items(rows)
    scored, scores = {}, {}
    try:
        for s in scorers:
            scored[s.name] = {"identity": s.identity, **score_new(store, s, items)}
            if base is not None and s.name != "judge":  # the baseline's answers, by the same scorer
                scored[s.name]["baseline"] = score_new(store, s, base.items())
            scores[s.name] = store.values(s.name)
    finally:
        store.close()
    base_info, base_values = _baseline_summary(base, scores) if base else (None, None)
    result = {"db": str(Path(db).resolve()), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "counts": {**counts, "thumbs": sum(1 for f in feedback if f.get("rating")),
                         "preferences": sum(1 for f in feedback if f.get("preferred_over"))},
              "scorers": scored, "baseline": base_info,
              **summarise(rows, feedback, scores, win, base_values, alpha, min_rows)}
    write_json(out / "monitor.json", result)
    write_atomic(out / "monitor.html", render(result))
    return result
