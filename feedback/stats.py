"""`rlhf data stats`: what a preference file holds (pairs; or unpaired rows: desirable and undesirable counts),
including how often annotators agree.

`PairStats` takes the pairs one at a time (or a fastpath Run's at once, as Arrow columns: `add_columns`) and keeps
what does not grow with the file: lengths as counts per length (exact quantiles from a histogram), counters of
sources and annotators, and distinct prompts as 8-byte digests of their normal form spilled to disk
(digests.TextSpill). `file_stats(report)` describes a validate_file Report; the CLI feeds PairStats the parts of a
streamed scan (validate.scan_file).
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from feedback.digests import TextSpill
from feedback.fastpath import norm_hashes
from feedback.repeats import norm_key
from feedback.schema import PreferencePair, UnpairedRow, text_of
from feedback.validate import Report


def _dist(values: Counter) -> dict:
    """min, p50, p90, max and mean of integer values given as {value: how many}: what sorting them all gives."""
    n = sum(values.values())
    if not n:
        return {}
    items = sorted(values.items())
    wanted = {"p50": n // 2, "p90": min(n - 1, int(n * 0.9))}  # the positions in the sorted values
    out, seen = {}, 0
    for value, count in items:
        for name, pos in wanted.items():
            if name not in out and seen <= pos < seen + count:
                out[name] = value
        seen += count
    return {"min": items[0][0], "p50": out["p50"], "p90": out["p90"], "max": items[-1][0],
            "mean": round(math.fsum(v * c for v, c in items) / n, 1)}


def annotator_agreement(report) -> dict:
    """Over pairs labelled more than once (same prompt and responses once Unicode and whitespace are normalised):
    the share of label pairs that agree. Measured by validate_file before repeated pairs are resolved."""
    return report.agreement or {"pairs_labelled_more_than_once": 0, "label_pairs": 0, "agreement": None}


class PairStats:
    """The statistics of `rlhf data stats`, accumulated pair by pair (or unpaired row by row)."""

    def __init__(self, unpaired: bool, tokenizer=None, workdir: str | None = None):
        self.unpaired, self.tokenizer = unpaired, tokenizer
        self.fields = ("prompt", "completion") if unpaired else ("prompt", "chosen", "rejected")
        self.lengths = {k: Counter() for k in self.fields}
        self.turns: Counter = Counter()
        self.sources: Counter = Counter()
        self.annotators: Counter = Counter()
        self.ties = self.with_margin = self.n = self.desirable = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="rlhf-stats-", dir=workdir)
        self.prompts = TextSpill(self._tmp.name, "prompt")

    def _length(self, x) -> int:
        t = text_of(x)
        return len(self.tokenizer(t)["input_ids"]) if self.tokenizer is not None else len(t)

    def add(self, p: PreferencePair | UnpairedRow) -> None:
        self.n += 1
        for k in self.fields:
            self.lengths[k][self._length(getattr(p, k))] += 1
        self.turns[1 if isinstance(p.prompt, str) else len(p.prompt)] += 1
        self.sources[p.source] += 1
        self.annotators[p.annotator or "(none)"] += 1
        if self.unpaired:
            self.desirable += bool(p.label)
        else:
            self.ties += bool(p.tie)
            self.with_margin += p.margin is not None
        self.prompts.add_texts((norm_key(p.prompt),), 0)

    def add_columns(self, columns: list, keep: np.ndarray, source: str) -> None:
        """The pairs of a fastpath Run at once: its prompt, chosen and rejected columns (Arrow strings), the rows in
        `keep` (valid pairs with no optional field: source `source`, no tie, margin or annotator). What add() counts
        for each, without a Python object per row (lengths in characters: no tokenizer)."""
        n = int(keep.sum())
        self.n += n
        for k, col in zip(self.fields, columns):
            values, counts = np.unique(pc.utf8_length(col).to_numpy()[keep], return_counts=True)
            self.lengths[k].update(dict(zip(values.tolist(), counts.tolist())))
        self.turns[1] += n
        self.sources[source] += n
        self.annotators["(none)"] += n
        self.prompts.add_digests(norm_hashes(columns[0])[0][keep], 0)

    def result(self, report) -> dict:
        """The stats dict; `report` (a Report or a finished Scan) gives the file, format, counts, agreement, notes."""
        try:
            common = {"file": report.path, "format": report.format, **report.counts()}
            if self.unpaired:
                common["desirable_share"] = round(self.desirable / self.n, 4) if self.n else None
            out = {**common,
                   "length_unit": "tokens" if self.tokenizer is not None else "characters",
                   "lengths": {k: _dist(self.lengths[k]) for k in self.fields},
                   "prompt_turns": _dist(self.turns)}
            if not self.unpaired:
                out.update({"ties": self.ties, "with_margin": self.with_margin})
            out.update({"sources": dict(self.sources),
                        "annotators": dict(self.annotators.most_common(20)),
                        "distinct_prompts": self.prompts.distinct(),
                        "agreement": annotator_agreement(report),
                        "notes": report.notes})
            return out
        finally:
            self._tmp.cleanup()


def file_stats(report: Report, tokenizer=None) -> dict:
    stats = PairStats(report.unpaired, tokenizer)
    for p in report.pairs:
        stats.add(p)
    return stats.result(report)
