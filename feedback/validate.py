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

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from feedback import candidates, digests, fastpath, runs
from feedback.digests import DigestSpill, RowSpool, TextSpill
from feedback.fastpath import Run
from feedback.readers import Row, read_rows
from feedback.repeats import _check_ids, _check_repeats, repeat_key, repeat_texts  # noqa: F401 (API)
from feedback.schema import PreferencePair, UnpairedRow, pair_id, unpaired_id
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

    def add_pairs(self, n: int) -> None:
        """`n` valid rows of one pair each (a fastpath.Run's rows that the whole-file checks left alone)."""
        self.rows += n
        self.valid += n
        self.pairs += n

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
    that need the whole file applied (`problem_rows()` only those with a problem); the counts (`tally`) are complete
    once it has been read to the end. Use it as a context manager (its temporary files are removed on exit)."""

    def __init__(self, path, fmt: str | None, notes: list[str], agreement: dict, spool: RowSpool,
                 changed: dict[int, tuple], tmp: tempfile.TemporaryDirectory, read: dict, tokenizer=None,
                 max_length: int | None = None):
        self.path, self.format, self.notes, self.agreement = str(path), fmt, notes, agreement
        self._file, self._read = path, read  # what a fastpath.Run is read again with (keys, source, ranked)
        self._spool, self._changed, self._tmp = spool, changed, tmp
        self._changed_rows = np.array(sorted(changed), dtype=np.int64)
        self._tokenizer, self._max_length = tokenizer, max_length
        # the truncation check tokenizes every row: done on the first whole replay, whose outcomes (the rows it
        # rejects, a few) later replays reuse, so that a second pass (the preferences stage's) costs no tokenizing
        self._truncated: dict[int, tuple] = {}
        self._truncation_known = False
        self.tally = Tally(self.unpaired)

    @property
    def unpaired(self) -> bool:
        return self.format == "unpaired"

    @property
    def source(self) -> str:
        """The source of pairs whose row does not give one (a RunPart's)."""
        return self._read["source"]

    def rows(self) -> Iterator[Row]:
        """Every row once, as validate_file's Report holds it (repeats, ids and truncation resolved)."""
        self.tally = Tally(self.unpaired)
        for n, item in runs.numbered(self._spool):
            rows = runs.rows(self._file, item, self._read["keys"], self._read["source"]) \
                if isinstance(item, Run) else (item,)
            for m, row in enumerate(rows, n):
                yield self._checked(m, row)
        self._truncation_known = self._tokenizer is not None and bool(self._max_length)

    def parts(self) -> Iterator[Row | RunPart]:
        """Every row as rows() gives it, but the rows of a fastpath.Run that the whole-file checks left alone: those
        come as one RunPart, for consumers that take them whole (text_of, columns_of, rows_of), and the others of
        the run as Rows after it (read again where their lines are). Every row is counted (`tally`). With the
        truncation check (a tokenizer), every row is a Row."""
        if self._tokenizer is not None and self._max_length:
            yield from self.rows()
            return
        self.tally = Tally(self.unpaired)
        for n, item in runs.numbered(self._spool):
            if not isinstance(item, Run):
                yield self._checked(n, item)
                continue
            lo, hi = np.searchsorted(self._changed_rows, [n, n + item.rows])
            changed = self._changed_rows[lo:hi].tolist()
            self.tally.add_pairs(item.rows - len(changed))  # valid rows of one pair each
            yield RunPart(item, [m - n for m in changed])
            for m in changed:
                raw = runs.line_at(self._file, *self._changed[m][2])
                yield self._checked(m, runs.line_row(self._file, item.line + m - n, raw, **self._read))

    def problem_rows(self) -> Iterator[Row]:
        """The rows with a problem, in order, as rows() gives them; every row is counted (`tally`)."""
        return (part for part in self.parts() if isinstance(part, Row) and row_problems(part))

    def rows_of(self, part: RunPart) -> Iterator[Row]:
        """The Rows of a RunPart (counted already)."""
        skip = set(part.skip)
        return (row for k, row in enumerate(runs.rows(self._file, part.run, self._read["keys"], self._read["source"]))
                if k not in skip)

    def text_of(self, part: RunPart) -> tuple[int, str]:
        """How many pairs a RunPart holds and their canonical JSON lines (runs.canonical_text)."""
        return runs.canonical_text(self._file, part.run, part.skip, self._read["keys"], self._read["source"])

    def columns_of(self, part: RunPart) -> tuple[list, np.ndarray]:
        """The prompt, chosen and rejected columns of a RunPart's run (Arrow), and which of its rows are the part's."""
        keep = np.ones(part.run.rows, dtype=bool)
        keep[part.skip] = False
        return runs.text_columns(self._file, part.run, self._read["keys"])[1], keep

    def _checked(self, n: int, row: Row) -> Row:
        if n in self._changed:
            row = candidates.apply(row, self._changed[n])
        if self._truncation_known:
            if n in self._truncated:
                row.error = self._truncated[n]
        elif self._tokenizer is not None and self._max_length:
            before = row.error
            _check_truncation([row], self._tokenizer, self._max_length)
            if row.error is not before:
                self._truncated[n] = row.error
        self.tally.add(row)
        return row

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


class RunPart(NamedTuple):
    """The rows of a fastpath.Run but those at `skip` (indices in the run): valid pairs of strings (Scan.parts)."""

    run: Run
    skip: list[int]


def scan_file(path, fmt: str = "auto", keys: dict | None = None, source: str = "human", ranked: str = "all_pairs",
              tokenizer=None, max_length: int | None = None, split: str | None = None, duplicates: str = "fail",
              workdir: str | None = None, buffer: int | None = None, fast: bool = True) -> Scan:
    """validate_file for files of any size: the same rows, problems, counts and agreement, in memory that does not
    grow with the file but by the rows that repeat.

    Pass 1 reads each row once and spools it to a temporary file (in `workdir`, default the system's temporary
    directory: about the size of the input), recording an 8-byte digest of each pair's repeat key and id with its
    row number (digests.DigestSpill: 16 bytes of disk per pair, `buffer` entries of memory, default digests.BUFFER).
    Rows of pairs that nothing flags in a plain JSONL file are read by fastpath.py (`fast`; False reads every row one
    by one) as Runs: the spool keeps where they are, not the rows, and only their repeat keys are digested (an auto
    id, a hash of the texts, repeats when the texts do; the id of another row that looks like one makes the scan
    digest theirs too. Two texts sharing the auto id's 64 bits, about 3 chances in a million at 10M pairs, would be
    a reused id to the per-row path and pass here). The rows whose digest repeats are the only ones that can be duplicates, conflicts or
    reused ids: a second pass over the spool gathers just those rows and resolves them with validate_file's own
    rules (_check_repeats, _check_ids), on their real keys, a batch at a time (candidates.py). `Scan.rows()` then
    replays the spool with those outcomes (and the truncation check) applied."""
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    tmp = tempfile.TemporaryDirectory(prefix="rlhf-scan-", dir=workdir)
    read = {"keys": keys, "source": source, "ranked": ranked}
    try:
        detected: list[str] = []
        notes: list[str] = []
        spool = RowSpool(os.path.join(tmp.name, "rows.pickle"))
        buffer = buffer or digests.BUFFER
        repeats = TextSpill(tmp.name, "repeat", buffer)
        ids = DigestSpill(tmp.name, "id", buffer)
        index = runs.LineIndex(os.path.join(tmp.name, "lines"))
        n, taken, foreign = 0, False, False  # taken: a Run was
        for item in fastpath.read_items(path, fmt, keys, source, ranked, detected, split, notes, fast):
            if isinstance(item, fastpath.Fast):
                spool.add(index.add(item))
                repeats.add_digests(item.digests, n)
                n, taken = n + item.run.rows, True
                continue
            spool.add(item)
            if item.error is None:
                for p in item.pairs:
                    repeats.add_texts(repeat_texts(p), n)
                    ids.add(p.id, n)
                    foreign = foreign or _foreign_id(p)
            n += 1
        if taken and foreign:  # an id that may be a Run row's auto id: digest those too
            for n, item in runs.numbered(spool):
                if isinstance(item, Run):
                    for m, row in enumerate(runs.rows(path, item, keys, source), n):
                        ids.add(row.pairs[0].id, m)
        changed, agreement = candidates.resolve(spool, repeats, ids, duplicates, str(path), path, read, tmp.name,
                                                index)
        index.close()
        found = fmt if fmt != "auto" else (detected[0] if detected else None)
        return Scan(path, found, notes, agreement, spool, changed, tmp, read, tokenizer, max_length)
    except BaseException:
        tmp.cleanup()
        raise


_AUTO_ID = re.compile(r"[0-9a-f]{16}")


def _foreign_id(p: PreferencePair | UnpairedRow) -> bool:
    """An id shaped like an auto id (schema.pair_id) that is not this pair's own: it may be another row's."""
    if not (isinstance(p.id, str) and _AUTO_ID.fullmatch(p.id)):
        return False
    own = unpaired_id(p.prompt, p.completion, p.label) if isinstance(p, UnpairedRow) else pair_id(
        p.prompt, p.chosen, p.rejected)
    return p.id != own
