"""Training rows as memory-mapped Arrow datasets (the `datasets` library): a stage on a million pairs starts training
without holding its pairs, or their token ids, as Python objects.

    lines = jsonl_lines(path, cache)                     # FILE's non-blank lines, on disk: {"line", "text"}
    rows = lines.map(fn, batched=True, num_proc=procs(len(lines)), features=...)   # tokenised, on disk
    kept, skipped = settle(rows, path, columns)         # rows to train on; the ones not used, with reasons

Everything is written under RUN_DIR/.cache/datasets (`cache_dir`). The datasets library names each file by a
fingerprint of what made it (the input file's sha256, the function and its settings, the tokenizer), so a rerun
(`--force`, `--resume`) of the same stage on the same input reuses the tokenised rows instead of tokenising again;
anything else makes new files. The cache may be deleted at any time.

What the old lists gave as side effects is carried in the rows themselves, so that a run that reuses cached rows
reports the same as one that computed them, and a map in several processes the same as one in this process: each
row records why it is not used (`reason`, null when it is), the special tokens neutralised in its text
(`neutralised`, rlhf.text.NEUTRALISED, added to this process's count by `settle`), and a canonical row that does not
parse (`error`: FILE:LINE: reason, raised by `settle` as read_pairs raised it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from pipeline.artifacts import file_sha256
from rlhf.errors import InvalidInput, RLHFError
from rlhf.text import NEUTRALISED

CACHE = Path(".cache") / "datasets"  # under the run directory
ROWS_PER_PROC = 20_000  # a map over fewer rows per core runs in this process: starting workers costs seconds
META = ("line", "id", "source", "reason", "error", "neutralised")  # what settle() reads; never reaches a trainer


def cache_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CACHE


def procs(n_rows: int) -> int | None:
    """Processes for a map over `n_rows` rows: one per core, from ROWS_PER_PROC rows each; None (this process) below."""
    n = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
            n_rows // ROWS_PER_PROC)
    if n < 2:
        return None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers: the tokenizer's own threads off
    return n


def _lines(path: str, sha256: str):
    """The non-blank lines of a file with their numbers (`sha256` only keys the cache: a changed file is read anew)."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield {"line": i, "text": line}


def jsonl_lines(path: str | Path, cache: str | Path):
    """The non-blank lines of a JSONL file as an Arrow dataset on disk ({"line": int, "text": str}), written once per
    file content (keyed by its sha256) under `cache`."""
    from datasets import Dataset, Features, Value

    features = Features({"line": Value("int64"), "text": Value("string")})
    if next(_lines(str(path), ""), None) is None:  # an empty split (all prompts held out, or none): no rows to write
        return Dataset.from_dict({"line": [], "text": []}, features=features)
    return generate(_lines, features, cache, {"path": str(path), "sha256": content_key(path)})


def generate(fn, features, cache: str | Path, gen_kwargs: dict):
    """Dataset.from_generator(fn) written under `cache`; an error of ours that the generator raised (a file without
    rows, a row that cannot be read: FILE:LINE) comes out as itself, not wrapped in datasets' DatasetGenerationError
    (which would end the run in a traceback instead of the message and its exit code)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(fn, features=features, cache_dir=str(cache), gen_kwargs=gen_kwargs)
    except DatasetGenerationError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, RLHFError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def map_rows(rows, fn, features, desc: str, fn_kwargs: dict):
    """rows.map(fn) batched, into `features`, in one process per core for a large dataset (procs); an empty dataset
    (an empty split) gives an empty dataset of `features` (datasets' map would return it with no columns)."""
    from datasets import Dataset

    if not len(rows):
        return Dataset.from_dict({k: [] for k in features}, features=features)
    return rows.map(fn, batched=True, num_proc=procs(len(rows)), features=features, remove_columns=rows.column_names,
                    desc=desc, fn_kwargs=fn_kwargs)


def counted(fn, *args):
    """fn(*args), and the special tokens it neutralised (a JSON object, or None), taken back out of NEUTRALISED: a map
    function leaves no trace in the process it runs in (settle adds the counts up once, from the rows)."""
    before = Counter(NEUTRALISED)
    try:
        out = fn(*args)
    finally:
        added = NEUTRALISED - before
        NEUTRALISED.clear()
        NEUTRALISED.update(before)
    return out, (json.dumps(dict(added), sort_keys=True) if added else None)


def message_features():
    """A message list as training rows hold it: the role and content of each message (what chat templates read)."""
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def plain_messages(value):
    """A message list as message_features holds it ({"role", "content"} each, other keys left out, as the docs say);
    any other value as it is."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content")} for m in value]
    return value


def meta_features() -> dict:
    from datasets import Value

    return {"line": Value("int64"), "id": Value("string"), "source": Value("string"), "reason": Value("string"),
            "error": Value("string"), "neutralised": Value("string")}


def where_set(table, column: str):
    """The rows of an Arrow table whose `column` is set (not null), as a table (small: the exceptions)."""
    import pyarrow.compute as pc

    return table.filter(pc.is_valid(table.column(column)))


def add_neutralised(table) -> None:
    """Add the special tokens neutralised in a mapped table's rows (its `neutralised` column) to NEUTRALISED."""
    for counts in where_set(table.select(["neutralised"]), "neutralised").column("neutralised").to_pylist():
        NEUTRALISED.update(json.loads(counts))


def without(rows, column: str):
    """The rows of a mapped dataset whose `column` is null (a selection by index: nothing is copied to Python)."""
    import numpy as np
    import pyarrow.compute as pc

    keep = np.flatnonzero(pc.is_null(rows.data.table.column(column)).to_numpy(zero_copy_only=False))
    return rows.select(keep) if len(keep) < len(rows) else rows


def settle(rows, path: str | Path, columns: list[str]):
    """(rows to train on, holding `columns` and the meta columns; rows not used: [{"id", "reason", "line"}]) of a
    mapped dataset. A row that is not a canonical row stops here with FILE:LINE: reason; the special tokens
    neutralised in every row are added to NEUTRALISED."""
    table = rows.data.table  # memory-mapped: filters below read columns, never rows as Python objects
    bad = where_set(table.select(["line", "error"]), "error")
    if bad.num_rows:
        first = bad.slice(0, 1).to_pylist()[0]
        raise InvalidInput(f"{path}:{first['line']}: {first['error']}")
    add_neutralised(table)
    skipped = where_set(table.select(["id", "reason", "line"]), "reason").to_pylist()
    return without(rows, "reason").select_columns([*columns, *META]), skipped


def seeded_order(n: int, seed: int):
    """The order random.Random(seed).shuffle gives n rows (the same swaps as shuffling a list of them), as an array of
    row numbers: the rows themselves are not needed to shuffle them, nor a Python object per row."""
    import random
    from array import array

    import numpy as np

    order = array("q", range(n))
    random.Random(seed).shuffle(order)
    return np.frombuffer(order, dtype=np.int64)


def content_key(path: str | Path) -> str:
    """What identifies a data file's content for the cache: its sha256; a dataset directory's, the sha256 of its
    files' names, sizes and modification times."""
    import hashlib

    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
