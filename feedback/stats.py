"""`rlhf data stats`: what a preference file holds (pairs; or unpaired rows: desirable and undesirable counts),
including how often annotators agree."""

from __future__ import annotations

import statistics
from collections import Counter

from feedback.schema import prompt_key, text_of
from feedback.validate import Report


def _dist(values: list[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "p50": s[len(s) // 2], "p90": s[min(len(s) - 1, int(len(s) * 0.9))], "max": s[-1],
            "mean": round(statistics.fmean(s), 1)}


def annotator_agreement(report: Report) -> dict:
    """Over pairs labelled more than once (same prompt and responses once Unicode and whitespace are normalised):
    the share of label pairs that agree. Measured by validate_file before repeated pairs are resolved."""
    return report.agreement or {"pairs_labelled_more_than_once": 0, "label_pairs": 0, "agreement": None}


def file_stats(report: Report, tokenizer=None) -> dict:
    pairs = report.pairs

    def length(x) -> int:
        t = text_of(x)
        return len(tokenizer(t)["input_ids"]) if tokenizer is not None else len(t)

    if report.unpaired:
        return _unpaired_stats(report, pairs, length, tokenizer is not None)
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
        "distinct_prompts": len({prompt_key(p.prompt) for p in pairs}),
        "agreement": annotator_agreement(report),
        "notes": report.notes,
    }


def _unpaired_stats(report: Report, rows: list, length, tokens: bool) -> dict:
    """An unpaired file: how many answers are desirable and undesirable (the ratio KTO's weights balance)."""
    desirable = sum(r.label for r in rows)
    return {
        "file": report.path,
        "format": report.format,
        **report.counts(),
        "desirable_share": round(desirable / len(rows), 4) if rows else None,
        "length_unit": "tokens" if tokens else "characters",
        "lengths": {k: _dist([length(getattr(r, k)) for r in rows]) for k in ("prompt", "completion")},
        "prompt_turns": _dist([1 if isinstance(r.prompt, str) else len(r.prompt) for r in rows]),
        "sources": dict(Counter(r.source for r in rows)),
        "annotators": dict(Counter(r.annotator or "(none)" for r in rows).most_common(20)),
        "distinct_prompts": len({prompt_key(r.prompt) for r in rows}),
        "agreement": annotator_agreement(report),
        "notes": report.notes,
    }
