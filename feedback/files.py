"""Read rows from JSONL, JSON arrays, CSV, Parquet or a local Hugging Face dataset directory.

Every row comes with its location (`FILE:LINE` for text files, `FILE:row N` for JSON arrays and
Parquet, `DIR:SPLIT:row N` for dataset directories) and either the parsed object or the reason it
could not be read, so that callers report each bad row instead of stopping at the first or
dropping it.

Every file is read as written:
- a UTF-8 byte-order mark is accepted at the start of any text file;
- a `.json` file holding JSON Lines (the Hugging Face `to_json` default) is read as JSON Lines;
- CSV goes through the `csv` module (RFC 4180 quoting, strict, no cell size limit): line breaks
  inside quoted cells, U+2028 included, stay in the cell; a broken quote is an error at the line
  where its record starts. Cells are text except the columns we know: `tie` and `margin` are
  converted to their types, `id`/`annotator`/`source` stay strings (empty = absent), and JSON is
  parsed only where messages (prompt/chosen/rejected/messages/completion) or ranked lists
  (responses/ranks/scores) are expected;
- a dataset directory is read split by split (all of them, or the one asked for), and columns
  saved as `Sequence(dict)` (a dict of lists) are turned back into lists of dicts.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.errors import UsageError

# CSV columns that may hold a JSON list of {"role", "content"} messages (readers add their aliases and --keys)
MESSAGE_COLUMNS = ("prompt", "chosen", "rejected", "messages", "completion")
LIST_COLUMNS = ("responses", "completions", "ranks", "scores")  # ranked rows: JSON lists
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no", "")
csv.field_size_limit(2**31 - 1)  # the default (131,072 characters) rejects long replies; C long on every platform


@dataclass
class Record:
    where: str  # "data.jsonl:12"
    line: int  # 1-based line (JSONL, CSV) or row number (JSON array, Parquet, dataset split)
    value: Any = None
    error: str | None = None
    raw: str | None = None  # the original text, kept for rejected-row files
    code: str | None = None  # with error: not_utf8, invalid_json, csv_quoting, csv_fields, wrong_type, not_finite


def file_format(path: Path) -> str:
    if path.is_dir():
        return "dataset"
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(
        suffix.lower(), "jsonl"
    )


def iter_records(path: str | Path, split: str | None = None, notes: list[str] | None = None,
                 message_columns: Iterable[str] = ()) -> Iterator[Record]:
    """Every row of a data file, in order. A file with no rows at all (empty, only blank lines, an empty
    array or table) is an error, `FILE: no rows`, never an empty success.

    `split` picks one split of a dataset directory (default: all); `notes` (a list) receives what the
    reader wants the user to know (the splits read and skipped); `message_columns` names further CSV
    columns that may hold message lists (e.g. the names given with --keys)."""
    from pipeline.errors import InvalidInput

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    fmt = file_format(path)
    if split is not None and fmt != "dataset":
        raise UsageError(f"{path}: --split {split} applies to dataset directories (save_to_disk) only")
    notes = [] if notes is None else notes
    if fmt == "dataset":
        records = _dataset_dir(path, split, notes)
    elif fmt == "csv":
        records = _csv(path, (*MESSAGE_COLUMNS, *message_columns))
    else:
        records = {"jsonl": _jsonl, "json": _json, "parquet": _parquet}[fmt](path)
    n = 0
    for rec in records:
        n += 1
        yield rec
    if n == 0:
        raise InvalidInput(f"{path}: no rows")


def _read_text(path: Path) -> str:
    """The whole file as text, without a leading byte-order mark; not UTF-8 is an unreadable input."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None


# --------------------------------------------------------------------------- JSON Lines and JSON


def _jsonl(path: Path) -> Iterator[Record]:
    """One JSON value per line. Read as bytes and split on b"\\n" only, so that U+2028 or a stray \\r inside a
    string never splits a row; each line is decoded on its own, so one bad byte rejects one row."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    with f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                text = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield Record(where, i, error=f"not valid UTF-8 (byte {exc.start})", code="not_utf8",
                             raw=raw.decode("utf-8", "replace").rstrip("\n"))
                continue
            if not text.strip():
                continue  # blank lines are not rows
            try:
                yield Record(where, i, value=json.loads(text), raw=text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield Record(where, i, error=f"invalid JSON: {exc.msg} (column {exc.colno})", code="invalid_json",
                             raw=text.rstrip("\r\n"))


def _json(path: Path) -> Iterator[Record]:
    """A JSON array of rows; or JSON Lines in a .json file (what `Dataset.to_json` writes by default), recognised
    by a first line that is a whole JSON object on its own, and then read line by line like any JSONL file."""
    text = _read_text(path)
    first = next((line for line in text.split("\n") if line.strip()), "")
    if isinstance(_json_or_none(first), dict):
        yield from _jsonl(path)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: a .json file must hold a JSON array of rows, or one JSON object per line")
    for i, row in enumerate(data, 1):
        yield Record(f"{path}:row {i}", i, value=row, raw=json.dumps(row, ensure_ascii=False))


# --------------------------------------------------------------------------- CSV


def _csv(path: Path, message_columns: tuple[str, ...]) -> Iterator[Record]:
    """RFC 4180 CSV with a header row. A record is located at the line where it starts (a quoted cell may
    span lines); a quoting error or a wrong number of fields rejects that record and reading goes on."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header = None
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if header is None:  # without a header no row can be read
                raise UsageError(f"{path}:{start}: cannot read the CSV header: {exc}") from None
            yield Record(f"{path}:{start}", start, error=_csv_error(exc, start, reader.line_num), code="csv_quoting")
            continue
        if not fields:
            continue  # a blank line is not a record
        if header is None:
            header = fields
            continue
        yield _csv_record(f"{path}:{start}", start, reader.line_num, header, fields, message_columns)


def _csv_record(where: str, start: int, end: int, header: list[str], fields: list[str],
                message_columns: tuple[str, ...]) -> Record:
    """One CSV record (lines start-end) as a row of typed cells, or the reason it is not one."""
    raw = json.dumps(dict(zip(header, fields)) if len(fields) == len(header) else fields, ensure_ascii=False)
    if len(fields) != len(header):
        span = f" (the record spans lines {start}-{end}: an unbalanced quote?)" if end > start else ""
        return Record(where, start, raw=raw, code="csv_fields",
                      error=f"{len(fields)} fields but the header has {len(header)}{span}")
    try:
        return Record(where, start, raw=raw, value={k: _csv_cell(k, v, message_columns) for k, v in zip(header, fields)})
    except ValueError as exc:
        return Record(where, start, raw=raw, error=str(exc), code="not_finite" if "finite" in str(exc) else "wrong_type")


def _csv_error(exc: csv.Error, start: int, end: int) -> str:
    if "unexpected end of data" in str(exc):
        return (f"unterminated quoted cell: the quote opened in the record starting here is never closed "
                f"(lines {start}-{end}, the end of the file, are inside it)")
    return f"bad CSV quoting: {exc}"


def _csv_cell(name: str, cell: str, message_columns: tuple[str, ...]) -> Any:
    """A CSV cell as the value its column holds. Raises ValueError naming the column and the cell."""
    if name == "tie":
        v = cell.strip().lower()
        if v not in TRUE + FALSE:
            raise ValueError(f"'tie' is {cell!r}; expected true/false, 1/0, yes/no or an empty cell")
        return v in TRUE
    if name == "margin":
        try:
            v = float(cell) if cell.strip() else None
        except ValueError:
            raise ValueError(f"'margin' is {cell!r}; expected a number or an empty cell") from None
        if v is not None and not math.isfinite(v):
            raise ValueError(f"'margin' is {cell!r}; expected a finite number")
        return v
    if name in ("id", "annotator", "source"):
        return cell or None
    if name == "judge":
        parsed = _json_or_none(cell)
        return parsed if isinstance(parsed, dict) else (cell or None)
    if name in message_columns:
        parsed = _json_or_none(cell)
        return parsed if _is_messages(parsed) else cell
    if name in LIST_COLUMNS:
        parsed = _json_or_none(cell)
        return parsed if isinstance(parsed, list) else cell
    return cell


def _json_or_none(cell: str) -> Any:
    if not cell.lstrip().startswith(("[", "{")):
        return None
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return None


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


# --------------------------------------------------------------------------- Parquet and datasets


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise UsageError(f"{path}: cannot read Parquet: {exc}") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield _table_record(f"{path}:row {i}", i, row)


def _dataset_dir(path: Path, split: str | None, notes: list[str]) -> Iterator[Record]:
    """A `save_to_disk` directory: a Dataset, or every split of a DatasetDict (or only `split`)."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise UsageError(f"{path}: not a dataset saved with `save_to_disk`: {exc}") from None
    if not isinstance(ds, DatasetDict):
        if split is not None:
            raise UsageError(f"{path}: a single dataset without splits; --split {split} does not apply")
        for i, row in enumerate(ds, 1):
            yield _table_record(f"{path}:row {i}", i, row)
        return
    names = list(ds)
    if split is not None and split not in ds:
        raise UsageError(f"{path}: no split {split!r} (splits: {names})")
    chosen = [split] if split is not None else names
    skipped = [n for n in names if n not in chosen]
    notes.append(f"{path}: read split{'s' if len(chosen) > 1 else ''} {', '.join(chosen)}"
                 + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    for name in chosen:
        for i, row in enumerate(ds[name], 1):
            yield _table_record(f"{path}:{name}:row {i}", i, row)


def _table_record(where: str, i: int, row: dict) -> Record:
    row = {k: _unzip(v) for k, v in row.items()}
    return Record(where, i, value=row, raw=json.dumps(row, ensure_ascii=False, default=str))


def _unzip(value: Any) -> Any:
    """A `Sequence(dict)` column arrives as a dict of equal-length lists ({"role": [...], "content": [...]}):
    turn it back into the list of dicts it was saved from. Anything else is returned as it is."""
    if not (isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values())):
        return value
    lengths = {len(v) for v in value.values()}
    if len(lengths) != 1:
        return value
    keys = list(value)
    return [dict(zip(keys, items)) for items in zip(*value.values())]
