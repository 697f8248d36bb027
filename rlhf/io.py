"""Atomic files: written to a temporary file beside the target, flushed to disk, then renamed over it, so that a
crash or a kill leaves either the old file or the new one, never half of one.

    write_atomic(path, text_or_bytes)
    write_json(path, obj)
    write_jsonl(path, rows)      # NaN and Infinity refused, naming the row; nothing written then
    with open_atomic(path) as f: # a file written as it is produced (rows streamed): in place only on success
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from rlhf.errors import InvalidInput, UsageError


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it. Only rank 0 writes (the launcher's RANK,
    as pipeline.distributed reads it): every process of a launched run calls the same writes."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = Path(path)
    if path.is_dir():  # an output path (-o) that names a directory: never replace what we did not write
        raise UsageError(f"{path} is a directory; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself is durable once its directory is flushed
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file to write bit by bit (rows as they are read), put in place like write_atomic when the block ends
    without an exception; on an exception the temporary file is removed and `path` is left as it was. Only rank 0's
    file is put in place (the others write to a temporary file that is removed)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get("RANK", "0") != "0":
            tmp.unlink()
            return
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def json_line(path: str | Path, n: int, row: dict) -> str:
    """Row `n` of the JSON Lines file `path`, with its newline. NaN and Infinity are refused (they are not JSON, and
    other readers fail on them): an error naming the file and the row, and (from inside open_atomic) nothing
    written."""
    try:
        return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as exc:
        raise InvalidInput(f"{path}: row {n} cannot be written as JSON: {exc} (NaN and Infinity are not JSON); "
                           "nothing written") from None


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """One JSON object per line (json_line), written atomically as the rows come (a generator of millions of rows is
    never held in memory)."""
    n = 0
    with open_atomic(path) as f:
        for row in rows:
            n += 1
            f.write(json_line(path, n, row))
    return n
