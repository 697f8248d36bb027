"""Read rows from JSONL, JSON arrays, CSV/TSV, Parquet or a local Hugging Face dataset directory.

Every row comes with its location (`FILE:LINE` for text files, `FILE:row N` for JSON arrays and
Parquet, `DIR:SPLIT:row N` for dataset directories) and either the parsed object or the reason it
could not be read, so that callers report each bad row instead of stopping at the first or
dropping it.

Every file is read as written:
- the type comes from the suffix: .jsonl/.ndjson, .json, .csv, .tsv (each also gzip-compressed,
  .jsonl.gz ...), .parquet/.pq, or a directory saved with `save_to_disk`; any other suffix is refused;
- text is UTF-8 (a byte-order mark accepted), or UTF-16/UTF-32 with a byte-order mark (read, with a
  note); UTF-16 without one, and bytes that are not UTF-8 (a file saved as Windows-1252), are errors
  naming the line of the first bad byte;
- a `.json` file holding JSON Lines (the Hugging Face `to_json` default) is read as JSON Lines, and a
  `.jsonl` file holding one JSON array (pretty-printed) as that array, each with a note;
- a key repeated within one JSON object is an error on that row (json would silently keep the last);
  so is a lone surrogate escape (`"\\ud83d"`, half of a character), which is not text;
- CSV goes through the `csv` module (RFC 4180 quoting, strict, no cell size limit): line breaks
  inside quoted cells, U+2028 included, stay in the cell; a broken quote is an error at the line
  where its record starts; spaces after a delimiter are skipped (`"a", "b"` reads as a and b); the
  delimiter is `,`, or the one the header uses when it has no comma (`;` from a European Excel, tab,
  `|`), with a note; .tsv is tab-separated; records whose cells are all empty (a spreadsheet's `,,,`
  rows) are blank lines. Cells are text except the columns we know: `tie` and `margin` are
  converted to their types, `label` (unpaired rows) to a boolean when it reads true/false, 1/0 or
  yes/no (anything else stays text, for the reader to refuse by name), `id`/`annotator`/`source` stay strings (empty = absent), and JSON is
  parsed only where messages (prompt/chosen/rejected/messages/completion) or ranked lists
  (responses/ranks/scores) are expected;
- a dataset directory is read split by split (every split, the one named, or the caller's default
  such as `train`), and columns saved as `Sequence(dict)` (a dict of lists) are turned back into
  lists of dicts.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from rlhf.errors import InvalidInput, UsageError

# CSV columns that may hold a JSON list of {"role", "content"} messages (readers add their aliases and --keys)
MESSAGE_COLUMNS = ("prompt", "chosen", "rejected", "messages", "completion")
LIST_COLUMNS = ("responses", "completions", "ranks", "scores")  # ranked rows: JSON lists
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no", "")
LABEL_TRUE, LABEL_FALSE = ("true", "1", "yes"), ("false", "0", "no")  # an unpaired row's label: no empty cell
csv.field_size_limit(2**31 - 1)  # the default (131,072 characters) rejects long replies; C long on every platform

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".pq": "parquet"}
KNOWN_TYPES = ".jsonl (.ndjson), .json, .csv, .tsv (each also as .gz), .parquet, or a dataset directory (save_to_disk)"
DELIMITERS = (",", ";", "\t", "|")  # a header without commas is read with the one of the others it uses most
PARQUET_BATCH = 4096  # rows of a Parquet file converted to Python objects at a time
ALL_SPLITS = "*"  # iter_records(default_split=ALL_SPLITS): every split of a DatasetDict
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # UTF-32 LE starts like UTF-16 LE
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass
class Record:
    where: str  # "data.jsonl:12"
    line: int  # 1-based line (JSONL, CSV) or row number (JSON array, Parquet, dataset split)
    value: Any = None
    error: str | None = None
    raw: str | None = None  # the original text, kept for rejected-row files
    code: str | None = None  # with error: not_utf8, invalid_json, repeated_key, bad_unicode, csv_quoting, csv_fields,
    #                          wrong_type, not_finite


def file_format(path: Path) -> str:
    """jsonl | json | csv | tsv | parquet | dataset, from the suffix (a trailing .gz is looked through); an unknown
    suffix is a usage error rather than a guess."""
    if path.is_dir():
        return "dataset"
    suffixes = [s.lower() for s in path.suffixes]
    gz = suffixes[-1:] == [".gz"]
    suffix = (suffixes[-2] if len(suffixes) > 1 else "") if gz else (suffixes[-1] if suffixes else "")
    fmt = SUFFIXES.get(suffix)
    if fmt is None or (gz and fmt == "parquet"):
        shown = "".join(path.suffixes[-2:] if gz else path.suffixes[-1:]) or "none"
        raise UsageError(f"{path}: unknown file type (suffix {shown}): expected {KNOWN_TYPES}")
    return fmt


def iter_records(path: str | Path, split: str | None = None, notes: list[str] | None = None,
                 message_columns: Iterable[str] = (), default_split: str | None = ALL_SPLITS,
                 split_key: str = "--split") -> Iterator[Record]:
    """Every row of a data file, in order. A file with no rows at all (empty, only blank lines, an empty
    array or table) is an error, `FILE: no rows`, never an empty success.

    `split` names one split of a dataset directory to read; without it a DatasetDict is read by
    `default_split`: ALL_SPLITS (every split), a split name (e.g. "train": refused when the dict has no such
    split), or None (the split must be named). `split_key` is the setting that names it, for messages.
    `notes` (a list) receives what the reader wants the user to know (splits read and skipped, the encoding
    or delimiter used, a file read as another type than its suffix says); `message_columns` names further CSV
    columns that may hold message lists (e.g. the names given with --keys)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    fmt = file_format(path)
    if split is not None and fmt != "dataset":
        raise UsageError(f"{path}: {split_key} {split} applies to dataset directories (save_to_disk) only")
    notes = [] if notes is None else notes
    if fmt == "dataset":
        records = _dataset_dir(path, split, notes, default_split, split_key)
    elif fmt in ("csv", "tsv"):
        records = _csv(path, (*MESSAGE_COLUMNS, *message_columns), notes, "\t" if fmt == "tsv" else None)
    elif fmt == "parquet":
        records = _parquet(path)
    else:
        records = {"jsonl": _jsonl, "json": _json}[fmt](path, notes)
    n = 0
    for rec in records:
        n += 1
        yield rec
    if n == 0:
        raise InvalidInput(f"{path}: no rows")


# --------------------------------------------------------------------------- bytes and encodings


def _open(path: Path) -> tuple[BinaryIO, bytes]:
    """The file as a binary stream (gzip decompressed) and its first bytes (up to 4 KiB), not consumed."""
    gz = path.suffix.lower() == ".gz"
    try:
        f = gzip.open(path, "rb") if gz else open(path, "rb")
        head = f.peek(4096)[:4096]  # gzip: a file that is not gzip fails here
    except (OSError, EOFError) as exc:
        raise UsageError(f"{path}: cannot read{' as gzip' if gz else ''}: {exc}") from None
    return f, head


def _opener(path: Path, notes: list[str]) -> Callable[[], BinaryIO]:
    """A function opening the file as a stream of UTF-8 bytes (gzip decompressed). UTF-16/32 with a byte-order mark
    is decoded whole and handed on as UTF-8, with a note; text without one that holds NUL bytes (UTF-16 saved without
    a BOM) is refused by name rather than read as garbage rows."""
    f, head = _open(path)
    enc = next((e for bom, e in _BOMS if head.startswith(bom)), None)
    if enc is not None:
        with f:
            data = f.read()
        try:
            utf8 = data.decode(enc).encode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not valid {enc.upper()} after its byte-order mark (byte {exc.start})") from None
        notes.append(f"{path}: read as {enc.upper()} (byte-order mark)")
        return lambda: io.BytesIO(utf8)
    f.close()
    nul = head.count(b"\x00")
    if nul:
        odd = sum(1 for i in range(1, len(head), 2) if head[i] == 0)
        what = ("UTF-16 (little-endian) without a byte-order mark" if odd > nul * 0.9 else
                "UTF-16 (big-endian) without a byte-order mark" if odd < nul * 0.1 else "binary data")
        raise UsageError(f"{path}: holds NUL bytes: {what}, not UTF-8 text; save it as UTF-8 (or UTF-16 with a "
                         "byte-order mark)")
    return lambda: _open(path)[0]


def _undecodable(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where the first byte that is not UTF-8 is, and what the file probably is."""
    col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return (f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {col}): saved in another encoding, such as "
            "Windows-1252 or Latin-1? Save it as UTF-8")


def _read_text(path: Path, notes: list[str]) -> str:
    """The whole file as text, without a leading byte-order mark; bytes that are not UTF-8 are an unreadable input
    named by line."""
    with _opener(path, notes)() as f:
        try:
            data = f.read()
        except OSError as exc:
            raise UsageError(f"{path}: cannot read: {exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{path}:{line}: {_undecodable(data, exc)}") from None


def _text_lines(path: Path, notes: list[str]) -> Iterator[str]:
    """The file as decoded lines split on b"\\n" only (each keeping its ending), read one line at a time so that memory
    does not grow with the file; the byte-order mark dropped. Bytes that are not UTF-8 are an unreadable input named
    by line and column, as when the file was read whole (the lines before it have been handed on by then)."""
    with _opener(path, notes)() as f:
        try:
            for i, raw in enumerate(f, 1):
                try:
                    yield raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UsageError(f"{path}:{i}: {_undecodable(raw, exc)}") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot read: {exc}") from None


_LONE_CR = re.compile(r"(?<=\r)(?!\n|$)")


def _split_cr(lines: Iterable[str]) -> Iterator[str]:
    """Lines split as io.StringIO(newline="") splits them for the csv module: at \\n, \\r\\n and a lone \\r (an old
    Mac file), so that the csv reader's line numbers count the same lines as before it read a stream."""
    for line in lines:
        if "\r" in line[:-1]:
            yield from _LONE_CR.split(line)
        else:
            yield line


# --------------------------------------------------------------------------- JSON Lines and JSON


class RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f"the key {key!r} appears twice in one object (JSON would silently keep the last)")


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise RepeatedKey(k)
        out[k] = v
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_repeats)  # made once: json.loads(hook=...) makes one per call


def loads(text: str) -> Any:
    """json.loads refusing a key repeated within one object (RepeatedKey, a ValueError)."""
    if text.startswith("\ufeff"):  # json.loads's own error for a byte-order mark inside the text
        return json.loads(text, object_pairs_hook=_no_repeats)
    return _DECODER.decode(text)


def _lone_surrogate(value: Any, name: str = "") -> str | None:
    """The reason `value` is not valid Unicode text: a lone surrogate (JSON's "\\ud83d" alone, half of an emoji),
    which can be neither compared nor written as UTF-8; None when every string is whole."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{name or 'the row'} holds a lone surrogate \\u{ord(value[exc.start]):04x} at character "
                    f"{exc.start + 1} (half of a character, e.g. a cut emoji): not valid Unicode text")
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            err = _lone_surrogate(k, "a key") or _lone_surrogate(v, f"{name}.{k}" if name else f"'{k}'")
            if err:
                return err
    if isinstance(value, list):
        for i, v in enumerate(value):
            err = _lone_surrogate(v, f"{name}[{i}]")
            if err:
                return err
    return None


def _json_record(where: str, i: int, text: str) -> Record:
    """One JSON value (a JSONL line), or the reason it is not one."""
    raw = text.rstrip("\r\n")
    try:
        value = loads(text)
    except RepeatedKey as exc:
        return Record(where, i, error=str(exc), code="repeated_key", raw=raw)
    except json.JSONDecodeError as exc:
        return Record(where, i, error=f"invalid JSON: {exc.msg} (column {exc.colno})", code="invalid_json", raw=raw)
    err = _lone_surrogate(value) if _SURROGATE_ESCAPE.search(text) else None
    if err:
        return Record(where, i, error=err, code="bad_unicode", raw=raw)
    return Record(where, i, value=value, raw=raw)


def _jsonl(path: Path, notes: list[str]) -> Iterator[Record]:
    """One JSON value per line. Read as bytes and split on b"\\n" only, so that U+2028 or a stray \\r inside a
    string never splits a row; each line is decoded on its own, so one bad byte rejects one row. A file that is one
    JSON array (pretty-printed, its first line not a JSON value) is read as that array, with a note."""
    opener = _opener(path, notes)
    first = True
    with opener() as f:
        for i, raw in enumerate(f, 1):
            rec = jsonl_line(path, i, raw)
            if rec is None:
                continue  # blank lines are not rows
            if first and rec.code == "invalid_json" and rec.raw.lstrip().startswith("["):
                array = _whole_array(opener)
                if array is not None:
                    notes.append(f"{path}: holds one JSON array, not JSON Lines: read as a JSON array")
                    yield from _array_records(path, array)
                    return
            first = False
            yield rec


def jsonl_line(path: Path, i: int, raw: bytes) -> Record | None:
    """Line `i` of a JSON Lines file (its bytes, with their line ending) as a Record, or None for a blank line. Each
    line is decoded on its own, so one bad byte rejects one row (fastpath.py reads the lines it does not take so)."""
    where = f"{path}:{i}"
    try:
        text = raw.decode("utf-8-sig" if i == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return Record(where, i, error=_undecodable(raw, exc), code="not_utf8",
                      raw=raw.decode("utf-8", "replace").rstrip("\n"))
    if not text.strip():
        return None
    return _json_record(where, i, text)


def _whole_array(opener) -> list | None:
    """The file parsed as one JSON array, or None when it is not one."""
    with opener() as f:
        data = f.read()
    try:
        value = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_marking)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, list) else None


class _Repeated(dict):
    """An object of a JSON array in which a key was repeated (json keeps the last value; the row is rejected)."""

    repeated: str = ""


def _marking(pairs: list[tuple[str, Any]]) -> dict:
    try:
        return _no_repeats(pairs)
    except RepeatedKey:
        out = _Repeated(pairs)
        out.repeated = next(k for j, (k, _) in enumerate(pairs) if k in dict(pairs[:j]))
        return out


def _repeated_in(value: Any) -> str | None:
    if isinstance(value, _Repeated):
        return value.repeated
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((k for k in map(_repeated_in, children) if k is not None), None)


def _array_records(path: Path, data: list) -> Iterator[Record]:
    for i, row in enumerate(data, 1):
        where = f"{path}:row {i}"
        repeated = _repeated_in(row)
        err = str(RepeatedKey(repeated)) if repeated is not None else _lone_surrogate(row)
        if err:
            yield Record(where, i, error=err, code="repeated_key" if repeated is not None else "bad_unicode",
                         raw=json.dumps(row))
            continue
        yield Record(where, i, value=row, raw=json.dumps(row, ensure_ascii=False))


def _json(path: Path, notes: list[str]) -> Iterator[Record]:
    """A JSON array of rows; or JSON Lines in a .json file (what `Dataset.to_json` writes by default), recognised
    by a first line that is a whole JSON object on its own, and then read line by line like any JSONL file."""
    sniffed: list[str] = []  # the notes about the encoding, given once
    lines = _text_lines(path, sniffed)
    first = next((line for line in lines if line.strip()), "")
    lines.close()
    if isinstance(_json_or_none(first, strict=False), dict):
        notes += sniffed
        for _ in _text_lines(path, []):  # bytes that are not UTF-8 anywhere: the file is refused, as a whole read did
            pass
        yield from _jsonl(path, [])  # streamed, one line at a time
        return
    text = _read_text(path, notes)  # one JSON array: parsed whole
    try:
        data = json.loads(text, object_pairs_hook=_marking)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: a .json file must hold a JSON array of rows, or one JSON object per line")
    yield from _array_records(path, data)


# --------------------------------------------------------------------------- CSV


def _delimiter(path: Path, first_line: str, notes: list[str]) -> str:
    """`,` unless the header line has none and uses another delimiter (`;` from a European Excel, tab, `|`)."""
    header = first_line.split("\n", 1)[0]
    unquoted = re.sub(r'"[^"]*"', "", header)
    counts = {d: unquoted.count(d) for d in DELIMITERS}
    if counts[","] or not any(counts.values()):
        return ","
    best = max(counts, key=counts.get)
    notes.append(f"{path}: the header has no commas: read with {best!r} as the delimiter")
    return best


def _csv(path: Path, message_columns: tuple[str, ...], notes: list[str], delimiter: str | None) -> Iterator[Record]:
    """RFC 4180 CSV (or TSV) with a header row. A record is located at the line where it starts (a quoted cell may
    span lines); a quoting error or a wrong number of fields rejects that record and reading goes on."""
    lines = _text_lines(path, notes)
    first = next(lines, "")
    delimiter = delimiter or _delimiter(path, first, notes)
    reader = csv.reader(_split_cr(itertools.chain([first] if first else [], lines)), delimiter=delimiter,
                        skipinitialspace=True, strict=True)
    header = None
    empty = 0
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if header is None:  # without a header no row can be read
                raise UsageError(f"{path}:{start}: cannot read the CSV header: {exc}") from None
            yield Record(f"{path}:{start}", start, error=_csv_error(exc, start, reader.line_num), code="csv_quoting")
            continue
        if not any(f.strip() for f in fields):
            empty += bool(fields)  # a blank line is not a record, nor is a record of empty cells (",,,")
            continue
        if header is None:
            header = fields
            continue
        yield _csv_record(f"{path}:{start}", start, reader.line_num, header, fields, message_columns)
    if empty:
        notes.append(f"{path}: {empty} record{'s' * (empty != 1)} with only empty cells (a spreadsheet's trailing "
                     f"'{delimiter * 3}' rows) read as blank lines")


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
        code = "not_finite" if "finite" in str(exc) else "repeated_key" if "appears twice" in str(exc) else "wrong_type"
        return Record(where, start, raw=raw, error=str(exc), code=code)


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
    if name == "label":
        v = cell.strip().lower()
        return True if v in LABEL_TRUE else False if v in LABEL_FALSE else cell
    if name in ("id", "annotator", "source"):
        return cell or None
    try:
        if name == "judge":
            parsed = _json_or_none(cell)
            return parsed if isinstance(parsed, dict) else (cell or None)
        if name in message_columns:
            parsed = _json_or_none(cell)
            return parsed if _is_messages(parsed) else cell
        if name in LIST_COLUMNS:
            parsed = _json_or_none(cell)
            return parsed if isinstance(parsed, list) else cell
    except RepeatedKey as exc:
        raise ValueError(f"'{name}' cell: {exc}") from None
    return cell


def _json_or_none(cell: str, strict: bool = True) -> Any:
    """The JSON value of a cell that looks like an array or object, or None. A repeated key raises RepeatedKey
    (strict), so that a message list is never read with one of its keys silently overwritten."""
    if not cell.lstrip().startswith(("[", "{")):
        return None
    try:
        return loads(cell) if strict else json.loads(cell)
    except json.JSONDecodeError:
        return None


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


# --------------------------------------------------------------------------- Parquet and datasets


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH)
        i = 0
        for batch in batches:  # one batch of rows at a time: memory does not grow with the file
            for row in batch.to_pylist():
                i += 1
                yield _table_record(f"{path}:row {i}", i, row)
    except Exception as exc:  # pyarrow raises several types for a broken file, when opened or mid-way
        raise UsageError(f"{path}: cannot read Parquet: {exc}") from None


def _dataset_dir(path: Path, split: str | None, notes: list[str], default_split: str | None,
                 split_key: str) -> Iterator[Record]:
    """A `save_to_disk` directory: a Dataset, or the splits of a DatasetDict (`split`, else by `default_split`)."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise UsageError(f"{path}: not a dataset saved with `save_to_disk`: {exc}") from None
    if not isinstance(ds, DatasetDict):
        if split is not None:
            raise UsageError(f"{path}: a single dataset without splits; {split_key} {split} does not apply")
        for i, row in enumerate(ds, 1):
            yield _table_record(f"{path}:row {i}", i, row)
        return
    names = list(ds)
    if split is not None and split not in ds:
        raise UsageError(f"{path}: no split {split!r} (splits: {names})")
    if split is None and default_split != ALL_SPLITS and default_split not in ds:
        why = f"and no {default_split!r} split" if default_split else "and nothing says which to read"
        raise UsageError(f"{path}: a dataset with splits {names} {why}: name the split to read with {split_key}")
    chosen = [split] if split is not None else names if default_split == ALL_SPLITS else [default_split]
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
