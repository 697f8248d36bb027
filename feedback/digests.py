"""Bounded-memory helpers for checks that need a whole file: 8-byte digests spilled to disk, and a spool of rows.

`DigestSpill` answers "which rows hold a key another row holds too" (repeated pairs, reused ids) and "how many
distinct keys" (distinct prompts) for any number of rows: each key is reduced to an 8-byte BLAKE2b digest, kept with
its row number in a buffer of at most `buffer` entries (16 bytes each), and the buffer is flushed to `buckets` files
by the digest's top byte (a hash partition: an external sort). The answer is computed one bucket at a time, so
memory holds one buffer and one bucket, never the file; the disk holds 16 bytes per key. A digest shared by two
different keys (about 1 in 3 million at 10M rows) only makes a row a candidate: validate.py compares the real keys
of the candidates before it calls anything a duplicate.

`RowSpool` keeps the rows read on the first pass (pickled in chunks in a temporary file) so that later passes
replay them instead of parsing the file again. Only a spool this process wrote, in its own temporary directory
(mode 0700), is ever unpickled.

Used by validate.py (`scan_file`) and stats.py; the temporary files live in a directory they are given.
"""

from __future__ import annotations

import hashlib
import pickle
from array import array
from pathlib import Path
from typing import Any, Iterator

import numpy as np

BUFFER = 1 << 20  # entries held in memory before a flush (16 MiB)
BUCKETS = 256  # files the digests are partitioned into, by their top byte
SPOOL_CHUNK = 2048  # rows pickled together in a RowSpool (and held while one is read back)
_ENTRY = np.dtype([("h", "<u8"), ("i", "<u8")])


def digest(key: str) -> int:
    """An 8-byte digest of a key, as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class DigestSpill:
    """(digest, row number) entries, partitioned to disk; see the module docstring."""

    def __init__(self, directory: str | Path, name: str, buffer: int = BUFFER, buckets: int = BUCKETS):
        self.dir, self.name, self.buffer, self.buckets = Path(directory), name, buffer, buckets
        self._shift = np.uint64(64 - (buckets - 1).bit_length())
        self._h, self._i = array("Q"), array("Q")
        self.count = 0

    def add(self, key: str, row: int) -> None:
        self._h.append(digest(key))
        self._i.append(row)
        self.count += 1
        if len(self._h) >= self.buffer:
            self._flush()

    def _bucket(self, b: int) -> Path:
        return self.dir / f"{self.name}.{b:03d}"

    def _flush(self) -> None:
        if not self._h:
            return
        entries = np.empty(len(self._h), dtype=_ENTRY)
        entries["h"], entries["i"] = np.frombuffer(self._h, np.uint64), np.frombuffer(self._i, np.uint64)
        self._h, self._i = array("Q"), array("Q")
        bucket = entries["h"] >> self._shift
        order = np.argsort(bucket, kind="stable")
        entries, bucket = entries[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(self.buckets + 1))
        for b in range(self.buckets):
            if bounds[b] < bounds[b + 1]:
                with open(self._bucket(b), "ab") as f:
                    entries[bounds[b]:bounds[b + 1]].tofile(f)

    def _each_bucket(self) -> Iterator[np.ndarray]:
        self._flush()
        for b in range(self.buckets):
            path = self._bucket(b)
            if path.exists():
                yield np.fromfile(path, dtype=_ENTRY)

    def repeated(self) -> np.ndarray:
        """The row numbers (sorted, each once) whose digest another entry has too."""
        found = []
        for entries in self._each_bucket():
            entries = entries[np.argsort(entries["h"], kind="stable")]
            h = entries["h"]
            same = h[1:] == h[:-1]
            mask = np.zeros(len(h), dtype=bool)
            mask[1:] |= same
            mask[:-1] |= same
            found.append(entries["i"][mask])
        rows = np.unique(np.concatenate(found)) if found else np.empty(0, np.uint64)
        return rows

    def distinct(self) -> int:
        """How many distinct digests were added."""
        return sum(len(np.unique(entries["h"])) for entries in self._each_bucket())


class RowSpool:
    """Rows written once (pickled, `chunk` at a time) and replayed in order as often as needed."""

    def __init__(self, path: str | Path, chunk: int | None = None):
        self.path, self.chunk = Path(path), chunk or SPOOL_CHUNK
        self._f = open(self.path, "wb")
        self._pending: list[Any] = []

    def add(self, row: Any) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.chunk:
            self._write()

    def _write(self) -> None:
        if self._pending:
            pickle.dump(self._pending, self._f, protocol=pickle.HIGHEST_PROTOCOL)
            self._pending = []

    def close(self) -> None:
        if not self._f.closed:
            self._write()
            self._f.close()

    def __iter__(self) -> Iterator[Any]:
        self.close()
        with open(self.path, "rb") as f:
            while True:
                try:
                    chunk = pickle.load(f)
                except EOFError:
                    return
                yield from chunk
