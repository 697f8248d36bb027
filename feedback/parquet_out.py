"""Canonical rows written to Parquet as they come (`rlhf data import FILE -o OUT.parquet`), a row group at a time.

The columns are the canonical row's (schema.FIELDS, or UNPAIRED_FIELDS), every one present in every row (null when
absent). A Parquet column has one type, so the texts (prompt, chosen, rejected, completion) are either strings or
lists of {"role", "content"} messages for the whole file, as the first row has them; a later row of the other
shape, or a message with keys besides role and content, is an error naming the row (JSONL holds any mix). `judge`
is written as JSON text. Read it back with `datasets.load_dataset("parquet", data_files=...)` or any Parquet reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from feedback.schema import FIELDS, UNPAIRED_FIELDS
from rlhf.errors import InvalidInput

ROW_GROUP = 4096  # rows written at a time
TEXTS = ("prompt", "chosen", "rejected", "completion")


class ParquetRows:
    """Write canonical row dicts (PreferencePair.to_dict / UnpairedRow.to_dict) to an open binary file."""

    def __init__(self, f: IO[bytes], path: str | Path, unpaired: bool):
        self.f, self.path, self.unpaired = f, path, unpaired
        self.fields = UNPAIRED_FIELDS if unpaired else FIELDS
        self.batch: list[dict] = []
        self.writer = None
        self.messages: bool | None = None  # the texts are message lists (else strings), from the first row
        self.n = 0
        self.closed = False

    def _schema(self):
        import pyarrow as pa

        text = (pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])) if self.messages
                else pa.string())
        types = {"id": pa.string(), "source": pa.string(), "tie": pa.bool_(), "margin": pa.float64(),
                 "annotator": pa.string(), "judge": pa.string(), "label": pa.bool_(),
                 **{k: text for k in TEXTS}}
        return pa.schema([(k, types[k]) for k in self.fields])

    def add(self, row: dict) -> None:
        self.n += 1
        texts = [row[k] for k in TEXTS if k in row]
        messages = isinstance(texts[0], list)
        if self.messages is None:
            self.messages = messages
        if messages != self.messages or any(isinstance(t, list) != messages for t in texts):
            shapes = ("message lists", "strings")
            raise InvalidInput(f"{self.path}: row {self.n} holds {shapes[not messages]} where row 1 holds "
                               f"{shapes[not self.messages]}: a Parquet column has one type; write JSONL instead "
                               "(-o OUT.jsonl), which holds both")
        if messages:
            for t in texts:
                extra = next((sorted(m) for m in t if set(m) != {"role", "content"}), None)
                if extra:
                    raise InvalidInput(f"{self.path}: row {self.n} has a message with keys {extra}: Parquet rows "
                                       "hold role and content only; write JSONL instead (-o OUT.jsonl)")
        out = {k: row.get(k) for k in self.fields}
        if out.get("judge") is not None:
            out["judge"] = json.dumps(out["judge"], ensure_ascii=False, allow_nan=False)
        self.batch.append(out)
        if len(self.batch) >= ROW_GROUP:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            schema = self._schema()
            self.writer = pq.ParquetWriter(self.f, schema)
        if self.batch:
            self.writer.write_table(pa.Table.from_pylist(self.batch, schema=self.writer.schema))
            self.batch = []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.messages is None:
            self.messages = False  # no rows: an empty file of string columns
        self._write()
        self.writer.close()
