"""Check every row of a preference file and account for each one.

Row checks come from the readers (JSON, UTF-8, keys, types, empty text, chosen == rejected,
HH structure, ranked rows). This module adds the checks that need the whole file: exact
duplicate pairs, conflicting duplicates (same prompt and responses, opposite preference), and,
given the stage's tokenizer and max_length, pairs that become empty or identical when truncated.
Nothing is dropped silently: `Report` counts every row read as valid or invalid, with reasons.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from feedback.readers import Row, read_rows
from feedback.schema import PreferencePair, canonical


@dataclass
class Report:
    path: str
    format: str | None
    rows: list[Row] = field(default_factory=list)

    @property
    def valid(self) -> list[Row]:
        return [r for r in self.rows if r.error is None]

    @property
    def invalid(self) -> list[Row]:
        return [r for r in self.rows if r.error is not None]

    @property
    def pairs(self) -> list[PreferencePair]:
        return [p for r in self.valid for p in r.pairs]

    def problems(self) -> list[str]:
        return [f"{r.where}: {r.error[1]}" for r in self.invalid]

    def summary(self) -> str:
        return f"{len(self.rows)} rows: {len(self.valid)} valid, {len(self.invalid)} invalid"

    def counts(self) -> dict:
        return {
            "rows_read": len(self.rows),
            "accepted": len(self.valid),
            "rejected": len(self.invalid),
            "pairs": len(self.pairs),
            "rejected_by_reason": dict(Counter(r.error[0] for r in self.invalid)),
        }

    def rejected_rows(self) -> list[dict]:
        return [{"where": r.where, "line": r.line, "code": r.error[0], "reason": r.error[1], "row": r.raw}
                for r in self.invalid]


def _check_duplicates(rows: list[Row]) -> None:
    exact: dict[str, Row] = {}
    unordered: dict[str, tuple[Row, str]] = {}
    for row in rows:
        if row.error:
            continue
        for p in row.pairs:
            key = canonical([p.prompt, p.chosen, p.rejected])
            if key in exact:
                row.error = ("duplicate", f"exact duplicate of line {exact[key].line}")
                break
            exact[key] = row
            if p.tie:
                continue
            ukey = canonical([p.prompt, sorted([canonical(p.chosen), canonical(p.rejected)])])
            if ukey in unordered:
                other, winner = unordered[ukey]
                if winner != canonical(p.chosen):
                    row.error = ("conflict", f"conflicting duplicate of line {other.line} "
                                             "(same prompt and responses, opposite preference)")
                    if other.error is None:
                        other.error = ("conflict", f"conflicting duplicate of line {row.line} "
                                                   "(same prompt and responses, opposite preference)")
                    break
            else:
                unordered[ukey] = (row, canonical(p.chosen))


def _check_truncation(rows: list[Row], tokenizer, max_length: int) -> None:
    from reward.text import encode

    for row in rows:
        if row.error:
            continue
        for p in row.pairs:
            c, n_prompt = encode(tokenizer, p.prompt, p.chosen, max_length)
            r, _ = encode(tokenizer, p.prompt, p.rejected, max_length)
            if n_prompt >= max_length:
                row.error = ("truncation", f"the prompt alone is {n_prompt} tokens: the responses would be empty "
                                           f"after truncation to max_length {max_length}")
                break
            if c == r:
                row.error = ("truncation", f"chosen and rejected are identical after truncation to max_length "
                                           f"{max_length} tokens")
                break


def validate_file(path, fmt: str = "auto", keys: dict | None = None, source: str = "human",
                  ranked: str = "all_pairs", tokenizer=None, max_length: int | None = None) -> Report:
    detected: list[str] = []
    rows = list(read_rows(path, fmt, keys, source, ranked, detected))
    _check_duplicates(rows)
    if tokenizer is not None and max_length:
        _check_truncation(rows, tokenizer, max_length)
    return Report(str(path), fmt if fmt != "auto" else (detected[0] if detected else None), rows)
