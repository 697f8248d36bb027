"""The rows of fastpath Runs, read again from their file when they are needed: single lines (validate's second
pass: the candidates of repeats, found through a `LineIndex`, and the rows it rejected), every Row (`rows`: for
consumers that take Rows), and, for writers that do not need Rows, the canonical JSON lines `rlhf data import`
writes (`canonical_text`) and the text columns `rlhf data stats` measures (`text_columns`). Each is what the
per-line reader gives for the same lines: test_fastpath.py compares them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from json.encoder import encode_basestring  # json.dumps(ensure_ascii=False)'s string encoder (C)
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedback import files
from feedback.fastpath import Run, _Block, _newlines, _read_json, _texts, as_string, found
from feedback.readers import Row, _read_row
from feedback.schema import PreferencePair


def numbered(spool) -> Iterator[tuple[int, Row | Run]]:
    """A scan's spool (digests.RowSpool of Rows and Runs) with the number of each item's (first) row: a Run holds
    run.rows rows."""
    n = 0
    for item in spool:
        yield n, item
        n += item.rows if isinstance(item, Run) else 1


def _run_block(path, run: Run) -> _Block:
    """The lines of a run, read again from the file."""
    with pa.OSFile(str(path)) as f:
        f.seek(run.offset)
        buf = f.read_buffer(run.nbytes)
    return _Block(buf, run.offset, run.line, _newlines(buf))


class LineIndex:
    """Where each line of a scan's Runs starts (4 bytes a row, from its run's first byte, in a file of the scan's
    temporary directory), so that the few lines validate's second pass needs are read alone, not their runs."""

    def __init__(self, path: str):
        self.path, self.rows = path, 0
        self._f = open(path, "wb")

    def add(self, fast) -> Run:
        """A fastpath.Fast's run, its line starts recorded (the Run to keep: it knows where they are)."""
        self._f.write(np.ascontiguousarray(fast.starts, dtype="<u4").tobytes())
        run = dataclasses.replace(fast.run, index=self.rows)
        self.rows += run.rows
        return run

    def close(self) -> None:
        self._f.close()

    def lines(self, path, run: Run, only: list[int]) -> Iterator[tuple[int, int, bytes]]:
        """(index in the run, byte offset in the file, bytes) of some lines of a run (sorted indices)."""
        if not only:
            return
        self._f.flush()
        lo, hi = only[0], min(only[-1] + 2, run.rows)
        starts = np.fromfile(self.path, "<u4", count=hi - lo, offset=4 * (run.index + lo)).astype(np.int64)
        with open(path, "rb") as f:
            for k in only:
                start = int(starts[k - lo])
                end = int(starts[k + 1 - lo]) if k + 1 < run.rows else run.nbytes
                f.seek(run.offset + start)
                yield k, run.offset + start, f.read(end - start)


def line_at(path, offset: int, nbytes: int) -> bytes:
    with pa.OSFile(str(path)) as f:
        f.seek(offset)
        return f.read(nbytes)


def line_row(path, line: int, raw: bytes, keys: dict | None, source: str, ranked: str) -> Row:
    """The Row of one line of a run, read as the per-line reader reads it (parsed by json, its pair built by
    readers._read_row)."""
    return _read_row(files.jsonl_line(Path(path), line, raw), "pairs", keys, source, ranked, [0, None])


def text_columns(path, run: Run, keys: dict | None) -> tuple[_Block, list[pa.Array]]:
    """The run's lines and its prompt, chosen and rejected columns, parsed again by pyarrow."""
    block = _run_block(path, run)
    table = _read_json(block.buf, int((block.ends - block.starts).max()))
    return block, [col for _, col in _texts(table, keys)]


def rows(path, run: Run, keys: dict | None, source: str) -> Iterator[Row]:
    """Every Row of a run, built from the Arrow columns, without parsing each line in Python."""
    where = Path(path)
    block, columns = text_columns(path, run, keys)
    prompts, chosens, rejecteds = (col.to_pylist() for col in columns)
    for k in range(run.rows):
        line = run.line + k
        pair = PreferencePair(prompt=prompts[k], chosen=chosens[k], rejected=rejecteds[k], source=source)
        yield Row(f"{where}:{line}", line, pairs=[pair], raw=block.raw(k).decode("utf-8").rstrip("\r\n"))


def canonical_text(path, run: Run, skip: list[int], keys: dict | None, source: str) -> tuple[int, str]:
    """(how many, the JSON lines) `rlhf data import` writes for the pairs of a run but the rows in `skip`: what
    json.dumps(PreferencePair(...).to_dict(), ensure_ascii=False) gives for each, its id schema.pair_id (the SHA-1
    of the canonical JSON of the three texts), built by pyarrow from each text's JSON string (the text in quotes,
    where it holds nothing to escape; json's own encoder for the others)."""
    block, columns = text_columns(path, run, keys)
    keep = np.ones(run.rows, dtype=bool)
    keep[skip] = False
    escapes = found(as_string(block.buf), r"\\")  # no backslash in the line: nothing to escape in its texts
    p, c, r = (_json_strings(col.filter(pa.array(keep)), escapes) for col in columns)
    canonical = pc.binary_join_element_wise("[", p, ",", c, ",", r, "]", "")
    ids = pa.array([hashlib.sha1(b).hexdigest()[:16] for b in canonical.cast(pa.binary()).to_pylist()], pa.string())
    lines = pc.binary_join_element_wise('{"id": "', ids, '", "prompt": ', p, ', "chosen": ', c, ', "rejected": ', r,
                                        f', "source": {encode_basestring(source)}, "tie": false}}\n', "")
    if not len(lines):
        return 0, ""
    offsets = np.frombuffer(lines.buffers()[1], np.int32)[lines.offset:lines.offset + len(lines) + 1]
    data = lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return len(lines), data.to_pybytes().decode()  # one copy of the lines' bytes, not a str per line


def _json_strings(col: pa.Array, escapes: bool) -> pa.Array:
    """Each text as a JSON string, as json.dumps(ensure_ascii=False) writes it: in quotes, `"`, `\\` and control
    characters escaped (by json's encoder, for the texts that hold one; `escapes`: there may be some)."""
    quoted = pc.binary_join_element_wise('"', col, '"', "")
    if not escapes:
        return quoted
    escape = np.flatnonzero(pc.match_substring_regex(col, r'["\\\x00-\x1f]').to_numpy(zero_copy_only=False))
    if not len(escape):
        return quoted
    mask = np.zeros(len(col), dtype=bool)
    mask[escape] = True
    encoded = [encode_basestring(t) for t in col.take(pa.array(escape)).to_pylist()]
    return pc.replace_with_mask(quoted, pa.array(mask), pa.array(encoded, pa.string()))
