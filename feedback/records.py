"""Read rows from JSONL, JSON arrays, CSV, Parquet or a local Hugging Face dataset directory.

Every row comes with its location (`FILE:LINE` for text files, `FILE:row N` otherwise) and
either the parsed object or the reason it could not be read, so that callers report each bad
row instead of stopping at the first or dropping it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import UsageError


@dataclass
class Record:
    where: str  # "data.jsonl:12"
    line: int  # 1-based line (JSONL, CSV) or row number (JSON array, Parquet, dataset)
    value: Any = None
    error: str | None = None
    raw: str | None = None  # the original text, kept for rejected-row files


def file_format(path: Path) -> str:
    if path.is_dir():
        return "dataset"
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(
        suffix.lower(), "jsonl"
    )


def iter_records(path: str | Path) -> Iterator[Record]:
    """Every row of a data file, in order. A file with no rows at all (empty, only blank lines, an empty
    array or table) is an error, `FILE: no rows`, never an empty success."""
    from pipeline.errors import InvalidInput

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    fmt = file_format(path)
    reader = {"jsonl": _jsonl, "json": _json_array, "csv": _csv, "parquet": _parquet}.get(fmt, _dataset_dir)
    n = 0
    for rec in reader(path):
        n += 1
        yield rec
    if n == 0:
        raise InvalidInput(f"{path}: no rows")


def _jsonl(path: Path) -> Iterator[Record]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    with f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(where, i, error=f"not valid UTF-8 (byte {exc.start})",
                             raw=raw.decode("utf-8", "replace").rstrip("\n"))
                continue
            if not text.strip():
                continue  # blank lines are not rows
            try:
                yield Record(where, i, value=json.loads(text), raw=text.rstrip("\n"))
            except json.JSONDecodeError as exc:
                yield Record(where, i, error=f"invalid JSON: {exc.msg} (column {exc.colno})", raw=text.rstrip("\n"))


def _json_array(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: a .json file must hold a JSON array of rows")
    for i, row in enumerate(data, 1):
        yield Record(f"{path}:row {i}", i, value=row, raw=json.dumps(row, ensure_ascii=False))


def _csv(path: Path) -> Iterator[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    for row in reader:
        line = reader.line_num
        if None in row:
            yield Record(f"{path}:{line}", line, error="more fields than the header has", raw=json.dumps(row))
            continue
        yield Record(f"{path}:{line}", line, value={k: _maybe_json(v) for k, v in row.items()}, raw=json.dumps(row))


def _maybe_json(cell: str | None) -> Any:
    # CSV cells holding message lists are JSON text; plain strings stay strings.
    if cell and cell.lstrip().startswith(("[", "{")):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise UsageError(f"{path}: cannot read Parquet: {exc}") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield Record(f"{path}:row {i}", i, value=row, raw=json.dumps(row, ensure_ascii=False, default=str))


def _dataset_dir(path: Path) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise UsageError(f"{path}: not a dataset saved with `save_to_disk`: {exc}") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise UsageError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds, 1):
        yield Record(f"{path}:row {i}", i, value=row, raw=json.dumps(row, ensure_ascii=False, default=str))
