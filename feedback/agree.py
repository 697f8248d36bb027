"""Agreement before trust: how a judge's labels compare with human labels on the same pairs.

Each human pair is shown with the human-preferred response as A or B by a seeded coin, so the
human labels are balanced between A and B and Cohen's kappa is meaningful; the judge sees both
orders anyway. Accuracy counts pairs where both the human and the judge picked a side.
"""

from __future__ import annotations

import random
from collections import Counter

from feedback.judges import JudgeItem, judge_both_orders, position_consistency, read_counts


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa between two label lists: (p_o - p_e) / (1 - p_e)."""
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def agreement(pairs, judge, position, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = random.Random(seed)
    items, human = [], []
    for p in pairs:
        if rng.random() < 0.5:
            items.append(JudgeItem(p.prompt, p.chosen, p.rejected, id=p.id))
            human.append("tie" if p.tie else "a")
        else:
            items.append(JudgeItem(p.prompt, p.rejected, p.chosen, id=p.id))
            human.append("tie" if p.tie else "b")
    results = judge_both_orders(judge, items, position.policy, position.disagreement, position.tie_band)
    judged = [r.choice for r in results]
    decided = [(h, j) for h, j in zip(human, judged) if h != "tie" and j in ("a", "b")]
    both = [(h, j) for h, j in zip(human, judged) if j != "abstain"]
    n = len(pairs)
    report = {
        "pairs": n,
        "accuracy": round(sum(h == j for h, j in decided) / len(decided), 4) if decided else None,
        "decided": len(decided),
        "cohen_kappa": None if not both else round(cohen_kappa([h for h, _ in both], [j for _, j in both]), 4),
        "tie_rate": round(judged.count("tie") / n, 4) if n else None,
        "abstain_rate": round(judged.count("abstain") / n, 4) if n else None,
        "position_consistency": position_consistency(results),
        **({"read": read_counts(results)} if read_counts(results) else {}),
        "judge": {"name": judge.name, "identity": judge.identity(), **judge.stats()},
    }
    rows = [{"id": it.id, "human": h, "judge": r.choice, "prob_a": r.prob_a, "consistent": r.consistent,
             **({"read": r.read} if r.read else {})}
            for it, h, r in zip(items, human, results)]
    return report, rows
