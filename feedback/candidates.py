"""The second pass of scan_file (validate.py): the rows whose digests repeat (the candidates of repeated pairs and
reused ids), gathered from the spool and resolved with validate_file's own rules (repeats.py) on their real keys.

The candidates are gathered in one pass over the spool (a fastpath Run's read again from the file, only those
lines) and written to temporary files by batch. The copies of a repeated pair share their digest, hence its bucket
(digests.DigestSpill), so batches of whole buckets, about CANDIDATE_BATCH rows each, are resolved one at a time and
memory holds one batch, not every candidate: a file ten times longer, with ten times the repeats, peaks at the
same memory. Reused ids are resolved after the repeats, on the id candidates (a row whose id no other row has
cannot be one) with the repeats' outcomes applied, as validate_file does it. A row in two buckets (a ranked row
whose pairs repeat elsewhere) makes one batch of all the candidates. The files live in the scan's own temporary
directory (mode 0700), the only place anything is unpickled from.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Iterator

import numpy as np

from feedback import runs
from feedback.digests import DigestSpill, RowSpool
from feedback.fastpath import Run
from feedback.readers import Row
from feedback.repeats import _check_ids, _check_repeat_counts, agreement

CANDIDATE_BATCH = 1024  # candidate rows resolved at a time (rounded up to whole buckets)

Outcome = tuple  # (error or None, ((pair index, code, reason), ...), where its line is when in a Run: (offset,
#                  nbytes) or None): what the whole-file checks decided for a row


def resolve(spool: RowSpool, repeats: DigestSpill, ids: DigestSpill, mode: str, path: str, file, read: dict,
            directory, index: runs.LineIndex) -> tuple[dict[int, Outcome], dict]:
    """What the repeated-pair and id checks decide for each candidate row (by number), and the agreement over
    repeated pairs. Only the outcomes of rows that lose something are kept for the replay."""
    batches = _batches(repeats.repeated_by_bucket())
    id_rows = ids.repeated().astype(np.int64)
    rows = np.concatenate(batches) if batches else np.empty(0, np.int64)
    batch = np.concatenate([np.full(len(b), k) for k, b in enumerate(batches)]) if batches else rows
    order = np.argsort(rows)
    rows, batch = rows[order], batch[order]
    names = [f"candidates.{k}" for k in range(len(batches))] + ["candidates.ids"]
    paths = [os.path.join(directory, name) for name in names]  # (strings: see digests.DigestSpill)
    with contextlib.ExitStack() as stack:
        out = [stack.enter_context(open(p, "wb")) for p in paths]
        for n, row, where in _gather(spool, np.union1d(rows, id_rows), file, read, index):
            k = np.searchsorted(rows, n)
            if k < len(rows) and rows[k] == n:
                pickle.dump((n, row, where), out[batch[k]], protocol=pickle.HIGHEST_PROTOCOL)
            k = np.searchsorted(id_rows, n)
            if k < len(id_rows) and id_rows[k] == n:
                pickle.dump((n, row, where), out[-1], protocol=pickle.HIGHEST_PROTOCOL)
    outcomes: dict[int, Outcome] = {}
    counts = np.zeros(3, dtype=np.int64)
    for p in paths[:-1]:  # one batch of repeats at a time
        found = list(_load(p))
        before = [list(row.pairs) for _, row, _ in found]
        counts += _check_repeat_counts([row for _, row, _ in found], mode, path)
        outcomes.update(_outcomes(found, before))
    found = list(_load(paths[-1]))  # reused ids, once the repeats are resolved
    before = [list(row.pairs) for _, row, _ in found]
    for n, row, _ in found:
        if n in outcomes:
            apply(row, outcomes[n])
    _check_ids([row for _, row, _ in found], path)
    outcomes.update(_outcomes(found, before))
    return outcomes, agreement(tuple(int(c) for c in counts))


def _batches(by_bucket: list[np.ndarray]) -> list[np.ndarray]:
    """The candidates of repeats in batches of whole buckets, about CANDIDATE_BATCH rows each (sorted row numbers);
    one batch when a row is in two buckets."""
    if not by_bucket:
        return []
    every = np.concatenate(by_bucket).astype(np.int64)
    if len(np.unique(every)) < len(every):
        return [np.unique(every)]
    out, part, size = [], [], 0
    for rows in by_bucket:
        part.append(rows.astype(np.int64))
        size += len(rows)
        if size >= CANDIDATE_BATCH:
            out.append(np.sort(np.concatenate(part)))
            part, size = [], 0
    if part:
        out.append(np.sort(np.concatenate(part)))
    return out


def _gather(spool: RowSpool, wanted: np.ndarray, file, read: dict,
            index: runs.LineIndex) -> Iterator[tuple[int, Row, tuple | None]]:
    """(row number, Row without its raw text, which the checks do not read, where its line is when in a Run) for
    each wanted row (sorted numbers), in one walk of the spool (a Run's lines read alone: `index`)."""
    for n, item in runs.numbered(spool):
        size = item.rows if isinstance(item, Run) else 1
        lo, hi = np.searchsorted(wanted, [n, n + size])
        if lo == hi:
            if lo == len(wanted):
                return
            continue
        if not isinstance(item, Run):
            item.raw = None
            yield n, item, None
            continue
        for k, offset, raw in index.lines(file, item, (wanted[lo:hi] - n).tolist()):
            row = runs.line_row(file, item.line + k, raw, **read)
            row.raw = None
            yield n + k, row, (offset, len(raw))


def _load(path: str) -> Iterator[tuple[int, Row, tuple | None]]:
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def _outcomes(found: list[tuple[int, Row, tuple | None]], before: list[list]) -> dict[int, Outcome]:
    """The outcomes of the rows that lost something, their dropped pairs named by their index before the checks."""
    out = {}
    for (n, row, where), pairs in zip(found, before):
        index = {id(p): i for i, p in enumerate(pairs)}
        dropped = tuple((index[id(p)], code, reason) for p, code, reason in row.dropped)
        if row.error is not None or dropped:
            out[n] = (row.error, dropped, where)
    return out


def apply(row: Row, outcome: Outcome) -> Row:
    """A row with what the whole-file checks decided (as _reject_pairs and _check_ids left it)."""
    error, dropped, _ = outcome
    if dropped:
        gone = {i for i, _, _ in dropped}
        row.dropped = [(row.pairs[i], code, reason) for i, code, reason in dropped]
        row.pairs = [p for i, p in enumerate(row.pairs) if i not in gone]
    if error is not None and row.error is None:
        row.error = error
    return row
