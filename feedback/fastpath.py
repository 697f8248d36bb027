"""The fast path of `scan_file` (validate.py) for the common case: a JSON Lines file of prompt/chosen/rejected strings.

The file is read in blocks of whole lines (BLOCK bytes, cut after a newline, so that each block knows the number of
its first line), each parsed with `pyarrow.json` and checked column by column with `pyarrow.compute`. Consecutive
rows that pass every check become a `Run` (where they are in the file) with the digests of their repeat keys, and
are not turned into Python objects on the first pass. Everything else is handed, line by line, to the per-line
reader (files.jsonl_line, readers.RowReader), so that its rows and messages are those of the slow path:
- a part of a block that pyarrow cannot parse as one object per line is halved until its parts parse, down to
  MIN_LINES lines read one by one: a broken line, a repeated key, a raw control character or a surrogate escape
  that is not half of a pair in a string, a value of another type than its column's, two objects on one line, bytes
  that are not UTF-8 (checked first: pyarrow.json takes any bytes inside a string);
- a line that does not start with "{" (a blank or indented line; a line `null` would also crash pyarrow.json);
- a row a check flags: prompt, chosen or rejected missing, null or not a string; a text that may be blank; chosen
  and rejected equal once normalised; texts that may be HH transcripts (the format would be hh); a field with a
  check of its own (id, source, tie, margin, annotator, judge) or another name of prompt/chosen/rejected (question,
  response_chosen, ...) given a value;
- every row of a part with a `responses` or `completions` column (those make a row ranked by being there).
A run is taken only while the reader reads rows as the pairs format (readers.RowReader.takes_pairs); otherwise its
lines go to the reader too.

Texts are normalised as schema.norm_text normalises them (NFC, whitespace runs collapsed, ends stripped) without
Python where that provably leaves them unchanged: ASCII with no control character, no double space and no space at
either end. Any other text is normalised by norm_text itself. Runs are read again from the file when their rows are
needed (runs.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from feedback import files
from feedback.digests import repeat_digests, text_hashes
from feedback.readers import ALIASES, OPTIONAL, Row, RowReader, read_rows
from feedback.schema import is_blank, norm_text

BLOCK = 4 << 20  # bytes read and parsed at a time
NEWLINE_SCAN = 1 << 18  # bytes of a block searched for newlines (or double spaces) at a time
MIN_LINES = 8  # a part of a block that does not parse is halved down to this many lines, then read line by line
RANKED = ("responses", "completions")  # a row holding one of these keys is ranked, whatever its value
CHECKED = set(OPTIONAL) | {n for names in ALIASES.values() for n in names}  # fields whose value the per-row path reads


@dataclass(frozen=True)
class Run:
    """Consecutive rows the fast path took, one per line: where they are in the file."""

    offset: int  # of the first line's first byte
    nbytes: int
    line: int  # the first row's line number
    rows: int
    index: int = -1  # where its lines' starts are in a runs.LineIndex (set when one records them)


class Fast(NamedTuple):
    """A run proposed to the reader, with the digests of its rows' repeat keys (digests.repeat_digests) and where
    each of its lines starts (bytes from the run's first)."""

    run: Run
    digests: np.ndarray
    starts: np.ndarray


def eligible(path, fmt: str, split: str | None) -> bool:
    """A plain (not gzip) JSON Lines file starting with "{", read as pairs or with the format detected: the files the
    fast path reads. Any other file is read by read_rows as before (the first line decides a JSON array, BOMs...)."""
    path = Path(path)
    if fmt not in ("auto", "pairs") or split is not None or not path.is_file():
        return False
    if files.file_format(path) != "jsonl" or path.suffix.lower() == ".gz":
        return False
    with open(path, "rb") as f:
        return f.read(1) == b"{"


def read_items(path, fmt: str = "auto", keys: dict | None = None, source: str = "human", ranked: str = "all_pairs",
               detected: list | None = None, split: str | None = None, notes: list | None = None,
               fast: bool = True) -> Iterator[Row | Fast]:
    """read_rows, with the rows the fast path takes given as `Fast` runs instead of one Row each (their Rows:
    runs.rows). `fast=False` reads every row through read_rows."""
    notes = [] if notes is None else notes
    if not (fast and eligible(path, fmt, split)):
        yield from read_rows(path, fmt, keys, source, ranked, detected, split=split, notes=notes)
        return
    where = Path(path)  # how files.py names lines: f"{Path(path)}:{line}"
    files._opener(where, notes)  # the per-line reader's checks of the whole file (NUL bytes: UTF-16 without a BOM)
    reader = RowReader(path, fmt, keys, source, ranked, detected, notes)
    with pa.OSFile(str(where)) as f:
        for block, parsed in _parsed_blocks(f):
            for item in _items(block, keys, parsed):
                if isinstance(item, Fast) and reader.takes_pairs():
                    reader.took_pairs(f"{where}:{item.run.line}", item.run.rows)
                    yield item
                    continue
                span = range(item.run.line - block.line, item.run.line - block.line + item.run.rows) \
                    if isinstance(item, Fast) else (item,)
                for k in span:
                    rec = files.jsonl_line(where, block.line + k, block.raw(k))
                    if rec is not None:
                        yield reader.read(rec)
    reader.finish()


# --------------------------------------------------------------------------- blocks of lines


class _Block:
    """Whole lines of the file: their bytes (an Arrow buffer, outside Python's heap), where each line starts and
    ends, the number of the first line and its byte offset."""

    def __init__(self, buf: pa.Buffer, offset: int, line: int, newlines: np.ndarray):
        self.buf, self.offset, self.line = buf, offset, line
        if len(buf) and (not len(newlines) or newlines[-1] != len(buf) - 1):
            newlines = np.append(newlines, len(buf) - 1)  # the file's last line, without a newline
        self.ends = newlines
        self.ends += 1  # (in place: a block's arrays are all of its memory that grows with its rows)
        self.starts = np.empty_like(self.ends)
        self.starts[:1], self.starts[1:] = 0, self.ends[:-1]
        self.lines = len(self.ends)
        self.bytes = np.frombuffer(buf, np.uint8)  # a view: no copy

    def raw(self, k: int) -> bytes:
        return self.buf.slice(self.starts[k], self.ends[k] - self.starts[k]).to_pybytes()

    def part(self, a: int, b: int) -> pa.Buffer:
        return self.buf.slice(self.starts[a], self.ends[b - 1] - self.starts[a])


def _newlines(buf: pa.Buffer) -> np.ndarray:
    """Positions of the newlines in buf, NEWLINE_SCAN bytes at a time: the comparison's temporary stays that small."""
    data = np.frombuffer(buf, np.uint8)
    found = [np.flatnonzero(data[i:i + NEWLINE_SCAN] == 10) + i for i in range(0, len(data), NEWLINE_SCAN)]
    return np.concatenate(found) if found else np.empty(0, np.int64)


def _double_space(buf: pa.Buffer) -> bool:
    """Whether two spaces follow each other anywhere in buf (a text that norm_text changes). numpy, NEWLINE_SCAN
    bytes at a time: a search for the literal costs more, spaces being everywhere."""
    data = np.frombuffer(buf, np.uint8)
    for i in range(0, len(data) - 1, NEWLINE_SCAN):
        space = data[i:i + NEWLINE_SCAN + 1] == 32  # one byte more: a pair across the boundary
        if (space[:-1] & space[1:]).any():
            return True
    return False


def _blocks(f: pa.OSFile) -> Iterator[_Block]:
    """The file in blocks of whole lines, about BLOCK bytes each (more when one line is longer)."""
    offset, line, size = 0, 1, BLOCK
    while True:
        f.seek(offset)
        buf = f.read_buffer(size)
        if not len(buf):
            return
        newlines = _newlines(buf)
        if len(buf) == size:  # not the end of the file: cut after the last newline
            if not len(newlines):
                size *= 2  # one line longer than the block: read more of it
                continue
            buf = buf.slice(0, int(newlines[-1]) + 1)
        block = _Block(buf, offset, line, newlines)
        yield block
        offset += len(buf)
        line += block.lines
        size = BLOCK


# --------------------------------------------------------------------------- parsing and checks


def _parsed_blocks(f: pa.OSFile) -> Iterator[tuple[_Block, tuple | None]]:
    """Each block with its lines parsed (_table, when they all start with "{"), the next block parsed on a thread
    while the caller checks this one: pyarrow releases the GIL, so that parsing and checking share the two cores."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for block in _blocks(f):
            parsing = pool.submit(_whole_table, block)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (block, parsing)
        if pending is not None:
            yield pending[0], pending[1].result()


def _whole_table(block: _Block) -> tuple | None:
    return _table(block, 0, block.lines) if (block.bytes[block.starts] == ord("{")).all() else None


def _items(block: _Block, keys: dict | None, parsed: tuple | None) -> Iterator[Fast | int]:
    """The lines of a block: Fast runs, and the numbers (in the block) of the lines the per-line reader reads.
    `parsed`: _table of the whole block, when its lines all start with "{"."""
    if parsed is not None:
        yield from _parse(block, 0, block.lines, keys, parsed)
        return
    a, b = 0, block.lines
    odd = np.flatnonzero(block.bytes[block.starts] != ord("{")).tolist()  # blank or indented lines
    for k in [*odd, b]:
        if a < k:
            yield from _parse(block, a, k, keys)
        if k < b:
            yield int(k)
        a = k + 1


def _table(block: _Block, a: int, b: int) -> tuple[pa.Array, pa.Table | None]:
    """Lines a..b of the block as one Arrow string (for the checks of their bytes) and parsed by pyarrow (None when
    it cannot parse them, or when they are not UTF-8)."""
    data = block.part(a, b)
    whole = as_string(data)
    try:
        whole.validate(full=True)  # UTF-8: pyarrow.json takes any bytes inside a string
        return whole, _read_json(data, int((block.ends[a:b] - block.starts[a:b]).max()))
    except (pa.ArrowException, ValueError):  # (a message quoting bytes that are not UTF-8: UnicodeDecodeError)
        return whole, None


def _parse(block: _Block, a: int, b: int, keys: dict | None, parsed: tuple | None = None) -> Iterator[Fast | int]:
    """Lines a..b (all starting with "{"): runs of the rows that pass the checks, the numbers of the others; a part
    pyarrow cannot parse as one row per line is halved, down to MIN_LINES lines read one by one."""
    whole, table = parsed or _table(block, a, b)
    if table is None or table.num_rows != b - a:
        if b - a <= MIN_LINES:
            yield from range(a, b)
        else:
            mid = (a + b) // 2
            yield from _parse(block, a, mid, keys)
            yield from _parse(block, mid, b, keys)
        return
    checked = _check(table, block.part(a, b), whole, keys)
    if checked is None:
        yield from range(a, b)
        return
    slow, digests = checked
    k = a
    for s in [*(np.flatnonzero(slow) + a).tolist(), b]:  # (Python ints: line numbers end up in JSON)
        if k < s:
            run = Run(block.offset + int(block.starts[k]), int(block.ends[s - 1] - block.starts[k]), block.line + k,
                      int(s - k))
            yield Fast(run, digests[k - a:s - a], block.starts[k:s] - block.starts[k])
        if s < b:
            yield int(s)
        k = s + 1


def _read_json(data: pa.Buffer, longest: int) -> pa.Table:
    """pyarrow parses in chunks of block_size bytes (on its threads), each of which must hold the longest line."""
    return pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(block_size=max(1 << 20, 2 * longest)))


def _texts(table: pa.Table, keys: dict | None) -> list[tuple[str, pa.Array]] | None:
    """The prompt, chosen and rejected columns (name, strings), named as the per-row path finds them
    (readers._find_key: the given --keys name, else the first alias present), when they hold strings."""
    out = []
    for role in ("prompt", "chosen", "rejected"):
        names = (keys[role],) if keys and role in keys else ALIASES[role]
        name = next((n for n in names if n in table.column_names), None)
        if name is None:
            return None
        col = table.column(name).combine_chunks()
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            return None
        out.append((name, col))
    return out


def _check(table: pa.Table, data: pa.Buffer, whole: pa.Array, keys: dict | None):
    """(rows the per-line reader must read, the digests of every row's repeat key), or None for all of them. What
    most rows do not hold is looked for in the whole part first (one pass over its bytes), in each text only when
    found there."""
    if any(n in table.column_names for n in RANKED):
        return None
    named = _texts(table, keys)
    if named is None:
        return None
    texts = [col for _, col in named]
    used = {name for name, _ in named}
    slow = np.zeros(table.num_rows, dtype=bool)
    for name in table.column_names:  # a field the per-row path checks (or reads instead), where a row gives it
        col = table.column(name)
        if name in CHECKED and name not in used and col.null_count < len(col):
            slow |= _np(pc.is_valid(col))
    # what the raw bytes show of the texts: a \u escape may be any character (a space, a control one, non-ASCII)
    escaped = found(whole, r"\\u")
    if escaped or found(whole, "Human:"):
        slow |= _np(pc.and_(pc.match_substring_regex(texts[1], "Human:"),
                            pc.match_substring_regex(texts[2], "Human:")))
    double = escaped or _double_space(data)
    control = escaped or found(whole, r"\\[bfnrt]")  # \n, \t...: whitespace that norm_text collapses
    fixed, hashes = [], []
    for col in texts:
        slow |= _blank(col)
        h, normed = norm_hashes(col, slow, double, control)
        fixed.append(normed)
        hashes.append(h)
    slow |= _identical(texts[1], texts[2], fixed[1], fixed[2], hashes[1], hashes[2])
    return slow, repeat_digests(*hashes)


def norm_hashes(col: pa.Array, skip: np.ndarray | None = None, double: bool = True,
                control: bool = True) -> tuple[np.ndarray, tuple[np.ndarray, list[str]]]:
    """text_hashes of the texts once normalised (schema.norm_text), and (indices, texts) of those normalised in
    Python: non-ASCII, with a space at either end, a double space (`double`: there may be one) or a control
    character (`control`: there may be one). The others are their own normal form. Rows in `skip` are left as
    they are (the per-line reader reads them)."""
    needs = _np(pc.starts_with(col, " ")) | _np(pc.ends_with(col, " "))
    needs |= ~_np(pc.string_is_ascii(col))
    if double:
        needs |= _np(pc.match_substring_regex(col, "  "))
    if control:
        needs |= _np(pc.match_substring_regex(col, "[\\x00-\\x1f]"))
    h = text_hashes(col)
    idx = np.flatnonzero(needs if skip is None else needs & ~skip)
    normed = [norm_text(t) for t in col.take(pa.array(idx, pa.int64())).to_pylist()] if len(idx) else []
    if normed:
        h[idx] = text_hashes(normed)
    return h, (idx, normed)


def as_string(data: pa.Buffer) -> pa.Array:
    """Bytes as one Arrow string (no copy), for the checks of a whole part at once."""
    return pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, len(data)], np.int32)), data])


def found(whole: pa.Array, pattern: str) -> bool:
    """Whether the bytes of a part (one Arrow value) hold `pattern` (RE2 syntax: it finds even a plain string faster
    than match_substring does)."""
    return bool(pc.match_substring_regex(whole, pattern)[0].as_py())


def _np(mask) -> np.ndarray:
    """A boolean pyarrow result as numpy, null as False (a null text is flagged by _blank). (pc.fill_null costs
    milliseconds a call; coalesce does the same.)"""
    return (mask if not mask.null_count else pc.coalesce(mask, False)).to_numpy(zero_copy_only=False)


def _blank(col: pa.Array) -> np.ndarray:
    """Rows whose text is blank (schema.is_blank) or null (missing: the per-row path names the key): any text
    holding a visible ASCII character is not; the others (few) are asked of is_blank itself."""
    maybe = np.flatnonzero(~_np(pc.match_substring_regex(col, "[!-~]")))
    out = np.zeros(len(col), dtype=bool)
    if len(maybe):
        out[maybe] = [s is None or is_blank(s) for s in col.take(pa.array(maybe)).to_pylist()]
    return out


def _identical(chosen: pa.Array, rejected: pa.Array, c_fixed, r_fixed, hc: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """Rows whose chosen and rejected are equal once normalised (the per-row path rejects them by name): the same
    text where neither needed normalising, otherwise the normalised texts compared in Python (the rows whose hashes
    are equal, a superset)."""
    out = _np(pc.equal(chosen, rejected))
    for k in np.flatnonzero((hc == hr) & ~out):
        out[k] = _norm_at(chosen, c_fixed, k) == _norm_at(rejected, r_fixed, k)
    return out


def _norm_at(col: pa.Array, fixed: tuple, k: int) -> str:
    idx, texts = fixed
    j = np.searchsorted(idx, k)
    return texts[j] if j < len(idx) and idx[j] == k else col[k].as_py()
