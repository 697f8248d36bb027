"""How good a reward model is on held-out pairs, and the statistics its scores are normalised with.

    metrics, rewards = evaluate(model, rows, pad_id, buckets=4)          # accuracy, margin, calibration
    normalization(rewards)                                               # {mean, std, n} for the manifest

Accuracy is the share of pairs whose chosen response scores higher (overall and by source); calibration
is accuracy by |margin| quantile bucket (a reward model is calibrated when larger margins are more often
right). The mean and std of the held-out rewards are stored in the reward model's manifest and applied
by reward.scoring.RewardScorer (and by PPO's critic).
"""

from __future__ import annotations

import math
from reward.scoring import SORT_WINDOW, score_ids


def evaluate(model, rows, pad_id: int, buckets: int, chunk: int = 1024) -> tuple[dict, list[float]]:
    """Score encoded pairs with the same code users and PPO call: (pairwise metrics, every reward scored). `rows` is
    a datasets.Dataset with chosen_ids, rejected_ids and source columns, read `chunk` rows at a time (a multiple of
    score_ids' sorting window, so the batches, and the scores, are those of scoring every row at once)."""
    assert chunk % SORT_WINDOW == 0, "chunk must be a multiple of reward.scoring.SORT_WINDOW"
    rc: list[float] = []
    rr: list[float] = []
    sources: list[str] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        rc += score_ids(model, part["chosen_ids"], pad_id)
        rr += score_ids(model, part["rejected_ids"], pad_id)
        sources += part["source"]
    return pairwise_metrics(rc, rr, sources, buckets), rc + rr


def pairwise_metrics(chosen: list[float], rejected: list[float], sources: list[str], buckets: int = 4) -> dict:
    """Accuracy (overall and by source), mean margin, and calibration: accuracy by |margin| quantile bucket."""
    n = len(chosen)
    if n == 0:
        return {}
    margins = [c - r for c, r in zip(chosen, rejected)]
    correct = [m > 0 for m in margins]
    out = {"eval/accuracy": sum(correct) / n, "eval/margin_mean": sum(margins) / n, "eval/pairs": n}
    for src in sorted(set(sources)):
        idx = [i for i, s in enumerate(sources) if s == src]
        out[f"eval/accuracy_{src}"] = sum(correct[i] for i in idx) / len(idx)
    order = sorted(range(n), key=lambda i: abs(margins[i]))
    calib = []
    for b in range(min(buckets, n)):
        part = order[b * n // buckets : (b + 1) * n // buckets] if buckets <= n else order[b : b + 1]
        if not part:
            continue
        calib.append({"abs_margin_min": round(abs(margins[part[0]]), 4),
                      "abs_margin_max": round(abs(margins[part[-1]]), 4),
                      "pairs": len(part), "accuracy": round(sum(correct[i] for i in part) / len(part), 4)})
    out["calibration"] = calib
    return out


def normalization(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
    return {"mean": mean, "std": std if std > 1e-8 else 1.0, "n": n}
