"""Check every row of a preference file and account for each one.

Row checks come from the readers (JSON, UTF-8, CSV quoting, keys, types, finite numbers, empty
text, chosen == rejected, HH structure, ranked rows, unpaired labels). This module adds the checks
that need the whole file, on normalised text (`schema.text_key`: Unicode NFC, whitespace collapsed):
- repeated pairs (same prompt and responses), resolved by `duplicates`:
  `fail` (default): later copies with the same label are duplicates, and when the labels differ
  every copy is a conflict; `first`: the first copy is kept, the others rejected; `majority`: the
  label most copies give is kept once, the others outvoted, a tie of votes rejects them all;
  unpaired rows repeat when they hold the same prompt and completion, their label being the label;
- explicit ids used twice (the later row is rejected, naming the first);
- given the stage's tokenizer and max_length, pairs that become empty or identical when truncated
  (unpaired rows: whose prompt alone fills max_length).
A row that expands to several pairs (ranked) loses only the pairs concerned (`Row.dropped`).
Nothing is dropped silently: `Report` counts every row read as valid or invalid, with reasons,
and how often repeated pairs agree.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from feedback import digests
from feedback.digests import DigestSpill, RowSpool
from feedback.readers import Row, read_rows
from feedback.schema import PreferencePair, UnpairedRow, canonical, text_key
from reward.text import encode

DUPLICATES = ("fail", "first", "majority")


@dataclass
class Report:
    path: str
    format: str | None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the file was read (splits, ignored columns)
    agreement: dict = field(default_factory=dict)  # over pairs labelled more than once

    @property
    def valid(self) -> list[Row]:
        return [r for r in self.rows if r.error is None]

    @property
    def invalid(self) -> list[Row]:
        return [r for r in self.rows if r.error is not None]

    @property
    def dropped(self) -> list[tuple[Row, PreferencePair, str, str]]:
        """Pairs set aside from rows that are otherwise valid (a ranked row with one duplicated pair)."""
        return [(r, *d) for r in self.valid for d in r.dropped]

    @property
    def ok(self) -> bool:
        return not self.invalid and not self.dropped

    @property
    def pairs(self) -> list[PreferencePair | UnpairedRow]:
        """What the valid rows yield: preference pairs, or unpaired rows (a file holds one format)."""
        return [p for r in self.valid for p in r.pairs]

    @property
    def unpaired(self) -> bool:
        """The file holds unpaired rows (answers labelled desirable or not) rather than pairs."""
        return self.format == "unpaired"

    def problems(self) -> list[str]:
        return [line for r in self.rows for line in row_problems(r)]

    def tally(self) -> "Tally":
        tally = Tally(self.unpaired)
        for r in self.rows:
            tally.add(r)
        return tally

    def summary(self) -> str:
        return self.tally().summary()

    def counts(self) -> dict:
        return self.tally().counts()

    def rejected_rows(self) -> list[dict]:
        return [rec for r in self.rows for rec in rejected_records(r)]


class Tally:
    """The counts of a Report, kept row by row (a streamed file's rows are not held): summary() and counts()."""

    def __init__(self, unpaired: bool):
        self.unpaired = unpaired
        self.rows = self.valid = self.invalid = self.pairs = self.dropped = self.desirable = 0
        self.invalid_codes: Counter = Counter()
        self.dropped_codes: Counter = Counter()

    def add(self, row: Row) -> None:
        self.rows += 1
        if row.error is not None:
            self.invalid += 1
            self.invalid_codes[row.error[0]] += 1
            return
        self.valid += 1
        self.pairs += len(row.pairs)
        if self.unpaired:
            self.desirable += sum(bool(p.label) for p in row.pairs)
        self.dropped += len(row.dropped)
        self.dropped_codes.update(code for _, code, _ in row.dropped)

    @property
    def ok(self) -> bool:
        return not self.invalid and not self.dropped

    def summary(self) -> str:
        n = self.dropped
        return (f"{self.rows} rows: {self.valid} valid, {self.invalid} invalid"
                + (f"; {n} pair{'s' * (n != 1)} of valid rows rejected" if n else ""))

    def counts(self) -> dict:
        reasons = self.invalid_codes + self.dropped_codes
        yielded = ({"desirable": self.desirable, "undesirable": self.pairs - self.desirable} if self.unpaired
                   else {"pairs": self.pairs, "pairs_rejected": self.dropped})
        return {
            "rows_read": self.rows,
            "accepted": self.valid,
            "rejected": self.invalid,
            **yielded,
            "rejected_by_reason": dict(reasons),
        }


def row_problems(r: Row) -> list[str]:
    """The problem lines of one row (FILE:LINE: reason), as `rlhf data validate` prints them."""
    if r.error is not None:
        return [f"{r.where}: {r.error[1]}"]
    return [f"{r.where}: {_pair_name(p)}: {reason}" for p, _, reason in r.dropped]


def rejected_records(r: Row) -> list[dict]:
    """What a rejected-rows file holds for one row: the row with its reason, or each pair set aside from it."""
    if r.error is not None:
        return [{"where": r.where, "line": r.line, "code": r.error[0], "reason": r.error[1], "row": r.raw}]
    return [{"where": r.where, "line": r.line, "code": code, "reason": reason, "row": r.raw, "pair": p.to_dict()}
            for p, code, reason in r.dropped]


def _pair_name(p: PreferencePair | UnpairedRow, width: int = 30) -> str:
    def short(x) -> str:
        t = x if isinstance(x, str) else " ".join(m.get("content", "") for m in x)
        return repr(t if len(t) <= width else t[: width - 1] + "…")

    if isinstance(p, UnpairedRow):
        return f"the answer {short(p.completion)}"
    return f"the pair {short(p.chosen)} over {short(p.rejected)}"


# --------------------------------------------------------------------------- repeated pairs

Copy = tuple[Row, int]  # one copy of a repeated pair: its row and the pair's index in row.pairs
Rejection = tuple[Row, int, str, str]  # (row, pair index, code, reason)


def _label(p: PreferencePair | UnpairedRow) -> str:
    if isinstance(p, UnpairedRow):
        return "desirable" if p.label else "undesirable"
    return "tie" if p.tie else text_key(p.chosen)


def repeat_key(p: PreferencePair | UnpairedRow) -> str:
    """The same prompt and the same two responses, in either order (unpaired: the same completion), on normalised
    text."""
    if isinstance(p, UnpairedRow):
        return canonical([text_key(p.prompt), text_key(p.completion)])
    return canonical([text_key(p.prompt), sorted([text_key(p.chosen), text_key(p.rejected)])])


def repeat_digest_key(p: PreferencePair | UnpairedRow) -> str:
    """A string equal for two pairs exactly when their repeat_key is (the same normalised components, joined by a
    NUL, which canonical JSON never holds unescaped): what scan_file digests, cheaper than the JSON of repeat_key."""
    if isinstance(p, UnpairedRow):
        return f"{text_key(p.prompt)}\0{text_key(p.completion)}"
    c, r = sorted([text_key(p.chosen), text_key(p.rejected)])
    return f"{text_key(p.prompt)}\0{c}\0{r}"


def _texts(p: PreferencePair | UnpairedRow) -> list:
    return [p.prompt, p.completion] if isinstance(p, UnpairedRow) else [p.prompt, p.chosen, p.rejected]


def _what(p: PreferencePair | UnpairedRow) -> tuple[str, str]:
    """How messages name what repeats and what its copies disagree on."""
    return ("prompt and completion", "label") if isinstance(p, UnpairedRow) else ("prompt and responses",
                                                                                  "preference")


def _repeat_groups(rows: list[Row]) -> list[list[Copy]]:
    """The pairs of valid rows labelled more than once, grouped by repeat_key, in file order."""
    groups: dict[str, list[Copy]] = defaultdict(list)
    for row in rows:
        if row.error is None:
            for i, p in enumerate(row.pairs):
                groups[repeat_key(p)].append((row, i))
    return [g for g in groups.values() if len(g) > 1]


def _agreement(groups: list[list[Copy]]) -> dict:
    """Over pairs labelled more than once: the share of label pairs (two copies) that agree."""
    agree = total = 0
    for g in groups:
        labels = [_label(row.pairs[i]) for row, i in g]
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                total += 1
                agree += labels[a] == labels[b]
    return {"pairs_labelled_more_than_once": len(groups), "label_pairs": total,
            "agreement": round(agree / total, 4) if total else None}


def _where(row: Row, path: str) -> str:
    """How a message names another row: "line 12" in text files, "row 3" or "train:row 3" otherwise."""
    loc = row.where[len(path) + 1:] if row.where.startswith(path + ":") else row.where
    return f"line {loc}" if loc.isdigit() else loc


def _same_text(a: PreferencePair | UnpairedRow, b: PreferencePair | UnpairedRow) -> bool:
    return canonical(_texts(a)) == canonical(_texts(b))


def _pair(m: Copy) -> PreferencePair:
    return m[0].pairs[m[1]]


def _resolve(group: list[Copy], mode: str, path: str) -> list[Rejection]:
    """The copies of one repeated pair to reject. `fail`: every copy when the labels differ, else the later copies;
    `first`: the later copies; `majority`: all but the first copy of the winning label (every copy on a tie)."""
    labels = [_label(_pair(m)) for m in group]
    if mode == "first":
        kept = _where(group[0][0], path)
        return [(*m, "duplicate", f"{'duplicate' if lab == labels[0] else 'repeat with a different label'} of "
                 f"{kept}, which is kept (--duplicates first)") for m, lab in zip(group[1:], labels[1:])]
    if mode == "fail" and len(set(labels)) > 1:
        same, differs = _what(_pair(group[0]))
        return [(*m, "conflict", f"conflicting duplicate of {_where(_first_other(group, labels, lab)[0], path)} "
                 f"(same {same}, different {differs})") for m, lab in zip(group, labels)]
    return _resolve_votes(group, labels, path)


def _first_other(group: list[Copy], labels: list[str], label: str) -> Copy:
    """The first copy whose label differs from `label`."""
    return next(m for m, lab in zip(group, labels) if lab != label)


def _resolve_votes(group: list[Copy], labels: list[str], path: str) -> list[Rejection]:
    """Keep the first copy of the label most copies give: the other agreeing copies are duplicates, the rest
    outvoted; when two labels have as many votes, no copy is kept."""
    votes = Counter(labels).most_common()
    winner, top = votes[0]
    if len(votes) > 1 and votes[1][1] == top:
        split = "-".join(str(n) for _, n in votes)
        where = ", ".join(_where(m[0], path) for m in group)
        return [(*m, "conflict", f"conflicting duplicate with no majority (votes {split} across {where})")
                for m in group]
    kept = group[labels.index(winner)]
    out = []
    for m, lab in zip(group, labels):
        if m is kept:
            continue
        if lab != winner:
            out.append((*m, "outvoted", f"outvoted ({top} of {len(group)} {_winner_says(winner, lab)})"))
        elif _same_text(_pair(m), _pair(kept)):
            out.append((*m, "duplicate", f"exact duplicate of {_where(kept[0], path)}"))
        else:
            out.append((*m, "duplicate", f"duplicate of {_where(kept[0], path)} (same {_what(_pair(m))[0]} and label "
                                         "once Unicode and whitespace are normalised)"))
    return out


def _winner_says(winner: str, loser: str) -> str:
    if winner in ("desirable", "undesirable"):
        return f"labelled it {winner}"
    if winner == "tie":
        return "called it a tie"
    return "preferred one of the responses" if loser == "tie" else "preferred the other response"


def _reject_pairs(rejections: list[Rejection]) -> None:
    """Apply pair rejections: a row losing all its pairs is rejected (first reason); otherwise only those pairs go."""
    by_row: dict[int, list] = defaultdict(list)
    rows = {}
    for row, i, code, reason in rejections:
        by_row[id(row)].append((i, code, reason))
        rows[id(row)] = row
    for key, items in by_row.items():
        row, gone = rows[key], {i for i, _, _ in items}
        if len(gone) == len(row.pairs):
            i, code, reason = min(items)
            row.error = (code, reason)
        else:
            row.dropped += [(row.pairs[i], code, reason) for i, code, reason in sorted(items)]
            row.pairs = [p for i, p in enumerate(row.pairs) if i not in gone]


def _check_repeats(rows: list[Row], mode: str, path: str) -> dict:
    """Resolve repeated pairs per `mode`; returns the agreement over them (measured before resolving)."""
    groups = _repeat_groups(rows)
    agreement = _agreement(groups)
    _reject_pairs([r for g in groups for r in _resolve(g, mode, path)])
    return agreement


def _check_ids(rows: list[Row], path: str) -> None:
    """An id used by two kept rows: the later one is rejected, naming the first."""
    seen: dict[str, Row] = {}
    for row in rows:
        if row.error is not None:
            continue
        for p in row.pairs:
            if p.id in seen and seen[p.id] is not row:
                row.error = ("duplicate_id", f"duplicate id {p.id!r}: {_where(seen[p.id], path)} has it too")
                break
            seen.setdefault(p.id, row)


def _check_truncation(rows: list[Row], tokenizer, max_length: int) -> None:
    for row in rows:
        if row.error:
            continue
        for p in row.pairs:
            if isinstance(p, UnpairedRow):
                _, n_prompt = encode(tokenizer, p.prompt, p.completion, max_length)
                if n_prompt >= max_length:
                    row.error = ("truncation", f"the prompt alone is {n_prompt} tokens: the completion would be empty "
                                               f"after truncation to max_length {max_length}")
                    break
                continue
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
                  ranked: str = "all_pairs", tokenizer=None, max_length: int | None = None,
                  split: str | None = None, duplicates: str = "fail") -> Report:
    """Read and check every row of `path`. `split` reads one split of a dataset directory (default: all);
    `duplicates` (fail | first | majority) says how repeated pairs are resolved."""
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    detected: list[str] = []
    notes: list[str] = []
    rows = list(read_rows(path, fmt, keys, source, ranked, detected, split=split, notes=notes))
    agreement = _check_repeats(rows, duplicates, str(path))
    _check_ids(rows, str(path))
    if tokenizer is not None and max_length:
        _check_truncation(rows, tokenizer, max_length)
    return Report(str(path), fmt if fmt != "auto" else (detected[0] if detected else None), rows, notes, agreement)


# --------------------------------------------------------------------------- streaming: files of any size


class Scan:
    """A file checked in bounded memory (see `scan_file`): `rows()` replays every row, in order, with the checks
    that need the whole file applied; the counts (`tally`) are complete once it has been read to the end. Use it as
    a context manager (its temporary files are removed on exit)."""

    def __init__(self, path: str, fmt: str | None, notes: list[str], agreement: dict, spool: RowSpool,
                 changed: dict[int, tuple], tmp: tempfile.TemporaryDirectory, tokenizer=None,
                 max_length: int | None = None):
        self.path, self.format, self.notes, self.agreement = path, fmt, notes, agreement
        self._spool, self._changed, self._tmp = spool, changed, tmp
        self._tokenizer, self._max_length = tokenizer, max_length
        self.tally = Tally(self.unpaired)

    @property
    def unpaired(self) -> bool:
        return self.format == "unpaired"

    def rows(self) -> Iterator[Row]:
        """Every row once, as validate_file's Report holds it (repeats, ids and truncation resolved)."""
        self.tally = Tally(self.unpaired)
        for n, row in enumerate(self._spool):
            if n in self._changed:
                row = _apply(row, self._changed[n])
            if self._tokenizer is not None and self._max_length:
                _check_truncation([row], self._tokenizer, self._max_length)
            self.tally.add(row)
            yield row

    @property
    def ok(self) -> bool:
        return self.tally.ok

    def summary(self) -> str:
        return self.tally.summary()

    def counts(self) -> dict:
        return self.tally.counts()

    def close(self) -> None:
        self._spool.close()
        self._tmp.cleanup()

    def __enter__(self) -> "Scan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scan_file(path, fmt: str = "auto", keys: dict | None = None, source: str = "human", ranked: str = "all_pairs",
              tokenizer=None, max_length: int | None = None, split: str | None = None, duplicates: str = "fail",
              workdir: str | None = None, buffer: int | None = None) -> Scan:
    """validate_file for files of any size: the same rows, problems, counts and agreement, in memory that does not
    grow with the file but by the rows that repeat.

    Pass 1 parses each row once, spools it to a temporary file (in `workdir`, default the system's temporary
    directory: about the size of the input) and records an 8-byte digest of each pair's repeat_key and id with its
    row number (digests.DigestSpill: 16 bytes of disk per pair, `buffer` entries of memory, default digests.BUFFER). The rows whose digest
    repeats are the only ones that can be duplicates, conflicts or reused ids: a second pass over the spool
    gathers just those rows and resolves them with validate_file's own rules (_check_repeats, _check_ids), on their
    real keys. `Scan.rows()` then replays the spool with those outcomes (and the truncation check) applied."""
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    tmp = tempfile.TemporaryDirectory(prefix="rlhf-scan-", dir=workdir)
    try:
        detected: list[str] = []
        notes: list[str] = []
        spool = RowSpool(Path(tmp.name) / "rows.pickle")
        buffer = buffer or digests.BUFFER
        repeats = DigestSpill(tmp.name, "repeat", buffer)
        ids = DigestSpill(tmp.name, "id", buffer)
        for n, row in enumerate(read_rows(path, fmt, keys, source, ranked, detected, split=split, notes=notes)):
            spool.add(row)
            if row.error is None:
                for p in row.pairs:
                    repeats.add(repeat_digest_key(p), n)
                    ids.add(p.id, n)
        candidates = np.union1d(repeats.repeated(), ids.repeated())
        changed, agreement = _resolve_candidates(spool, candidates, duplicates, str(path))
        found = fmt if fmt != "auto" else (detected[0] if detected else None)
        return Scan(str(path), found, notes, agreement, spool, changed, tmp, tokenizer, max_length)
    except BaseException:
        tmp.cleanup()
        raise


Outcome = tuple  # (error or None, ((pair index, code, reason), ...)): what the whole-file checks decided for a row


def _resolve_candidates(spool: RowSpool, candidates, mode: str, path: str) -> tuple[dict[int, Outcome], dict]:
    """What the repeated-pair and id checks decide for each candidate row (by number), resolved on the candidates
    gathered from the spool (without their raw text, which the checks do not read); the agreement over repeated
    pairs. Only the outcomes of rows that lose something are kept for the replay."""
    if not len(candidates):
        return {}, _agreement([])
    wanted = iter(candidates.tolist())  # sorted row numbers: walked with the spool, no set of them built
    nxt = next(wanted, None)
    rows: dict[int, Row] = {}
    for n, row in enumerate(spool):
        if n == nxt:
            row.raw = None
            rows[n] = row
            nxt = next(wanted, None)
            if nxt is None:
                break
    before = {n: list(row.pairs) for n, row in rows.items()}
    subset = list(rows.values())
    agreement = _check_repeats(subset, mode, path)
    _check_ids(subset, path)
    outcomes = {}
    for n, row in rows.items():
        index = {id(p): i for i, p in enumerate(before[n])}
        dropped = tuple((index[id(p)], code, reason) for p, code, reason in row.dropped)
        if row.error is not None or dropped:
            outcomes[n] = (row.error, dropped)
    return outcomes, agreement


def _apply(row: Row, outcome: Outcome) -> Row:
    """A spooled row with what the whole-file checks decided (as _reject_pairs and _check_ids left it)."""
    error, dropped = outcome
    if dropped:
        gone = {i for i, _, _ in dropped}
        row.dropped = [(row.pairs[i], code, reason) for i, code, reason in dropped]
        row.pairs = [p for i, p in enumerate(row.pairs) if i not in gone]
    if error is not None and row.error is None:
        row.error = error
    return row
