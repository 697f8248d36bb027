"""`rlhf data stats`: what a preference file holds, including how often annotators agree."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from feedback.schema import canonical, text_of
from feedback.validate import Report


def _dist(values: list[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "p50": s[len(s) // 2], "p90": s[min(len(s) - 1, int(len(s) * 0.9))], "max": s[-1],
            "mean": round(statistics.fmean(s), 1)}


def annotator_agreement(report: Report) -> dict:
    """Over pairs labelled more than once (same prompt and responses): the share of label pairs that agree."""
    labels: dict[str, list[str]] = defaultdict(list)
    for row in report.rows:
        if row.error is not None and row.error[0] not in ("duplicate", "conflict"):
            continue  # unreadable rows carry no label
        for p in row.pairs:
            key = canonical([p.prompt, sorted([canonical(p.chosen), canonical(p.rejected)])])
            labels[key].append("tie" if p.tie else canonical(p.chosen))
    agree = total = groups = 0
    for ls in labels.values():
        if len(ls) < 2:
            continue
        groups += 1
        for i in range(len(ls)):
            for j in range(i + 1, len(ls)):
                total += 1
                agree += ls[i] == ls[j]
    return {"pairs_labelled_more_than_once": groups, "label_pairs": total,
            "agreement": round(agree / total, 4) if total else None}


def file_stats(report: Report, tokenizer=None) -> dict:
    pairs = report.pairs

    def length(x) -> int:
        t = text_of(x)
        return len(tokenizer(t)["input_ids"]) if tokenizer is not None else len(t)

    return {
        "file": report.path,
        "format": report.format,
        **report.counts(),
        "length_unit": "tokens" if tokenizer is not None else "characters",
        "lengths": {k: _dist([length(getattr(p, k)) for p in pairs]) for k in ("prompt", "chosen", "rejected")},
        "prompt_turns": _dist([1 if isinstance(p.prompt, str) else len(p.prompt) for p in pairs]),
        "ties": sum(p.tie for p in pairs),
        "with_margin": sum(p.margin is not None for p in pairs),
        "sources": dict(Counter(p.source for p in pairs)),
        "annotators": dict(Counter(p.annotator or "(none)" for p in pairs).most_common(20)),
        "distinct_prompts": len({canonical(p.prompt) for p in pairs}),
        "agreement": annotator_agreement(report),
    }
