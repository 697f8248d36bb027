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

`repeat_digests` gives the digest of a pair's repeat key (validate.repeat_key) from 64-bit hashes of its normalised
texts (`text_hashes`), so that fastpath.py computes it for a block of rows at once, from Arrow columns, and the
per-row path for one row, the same way: equal keys give equal digests within a run (and across runs).

Used by validate.py (`scan_file`), fastpath.py and stats.py; the temporary files live in a directory they are given.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

BUFFER = 1 << 20  # entries held in memory before a flush (16 MiB)
BUCKETS = 256  # files the digests are partitioned into, by their top byte
FLUSH_SLICE = 1 << 17  # entries of the buffer partitioned at a time when it is flushed
SPOOL_CHUNK = 2048  # rows pickled together in a RowSpool (and held while one is read back)
_ENTRY = np.dtype([("h", "<u8"), ("i", "<u8")])


HASH_BATCH = 1024  # texts turned into Python objects at a time to be hashed (what a block holds of them at once)
_K1, _K2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)  # odd constants (64-bit mixing)


def text_hashes(texts) -> np.ndarray:
    """A 64-bit hash of each text's UTF-8 bytes (pandas.util.hash_array: SipHash-1-3 with a fixed key, in C), for a
    list of strings or a pyarrow string array (read as bytes, HASH_BATCH at a time, never the whole column)."""
    from pandas.util import hash_array  # pandas comes with datasets; imported when a file is scanned

    if isinstance(texts, list):
        return hash_array(np.array([t.encode("utf-8", "surrogatepass") for t in texts], dtype=object),
                          categorize=False)
    texts = texts.fill_null("")  # a null text is a row the fast path does not take: any hash will do
    binary = texts.cast(pa.binary()) if pa.types.is_string(texts.type) else texts.cast(pa.large_binary())
    out = np.empty(len(texts), np.uint64)
    for i in range(0, len(texts), HASH_BATCH):  # one batch of bytes objects alive at a time (not bound to a name)
        out[i:i + HASH_BATCH] = hash_array(binary.slice(i, HASH_BATCH).to_numpy(zero_copy_only=False),
                                           categorize=False)
    return out


def repeat_digests(prompt: np.ndarray, a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """The digests of repeat keys from text_hashes: a pair's from its prompt's and its two responses' in either order
    (the smaller hash and the larger), an unpaired row's (b None) from its prompt's and its completion's."""
    # multiplications wrap modulo 2**64 (numpy integer arrays do not warn): a mix, not arithmetic. In place where
    # it can be: these arrays are a block's rows long.
    out = prompt * _K1
    if b is None:
        out ^= _rotl(a * _K2)
        return out
    lo = np.minimum(a, b)
    lo *= _K2
    out ^= lo
    np.maximum(a, b, out=lo)
    out ^= _rotl(lo)
    return out


def _rotl(x: np.ndarray) -> np.ndarray:
    high = x >> np.uint64(41)
    x <<= np.uint64(23)
    x |= high
    return x


def digest(key: str) -> int:
    """An 8-byte digest of a key, as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class DigestSpill:
    """(digest, row number) entries, partitioned to disk; see the module docstring."""

    def __init__(self, directory: str | Path, name: str, buffer: int = BUFFER, buckets: int = BUCKETS):
        # paths as plain strings: pathlib interns every part of a path, and a scan's temporary directory has a new
        # name each time (growing the interpreter's table of interned strings, a resize of which costs megabytes)
        self.dir, self.name, self.buffer, self.buckets = str(directory), name, buffer, buckets
        self._shift = np.uint64(64 - (buckets - 1).bit_length())
        # the buffer allocated once at its full size (its pages touched as it fills): growing it would copy it
        self._h, self._i, self._n = np.empty(buffer, np.uint64), np.empty(buffer, np.uint64), 0
        self.count = 0

    def add(self, key: str, row: int) -> None:
        self._h[self._n], self._i[self._n] = digest(key), row
        self._n += 1
        self.count += 1
        if self._n >= self.buffer:
            self._flush()

    def add_digests(self, digests: np.ndarray, rows: np.ndarray | int) -> None:
        """Digests already computed (repeat_digests), with their row numbers (an int: the first of consecutive
        rows); flushed as add() flushes, whenever the buffer is full."""
        done = 0
        while done < len(digests):
            take = min(len(digests) - done, self.buffer - self._n)
            self._h[self._n:self._n + take] = digests[done:done + take]
            self._i[self._n:self._n + take] = (np.arange(rows + done, rows + done + take) if isinstance(rows, int)
                                               else rows[done:done + take])
            self._n += take
            done += take
            if self._n >= self.buffer:
                self._flush()
        self.count += len(digests)

    def _bucket(self, b: int) -> str:
        return os.path.join(self.dir, f"{self.name}.{b:03d}")

    def _flush(self) -> None:
        """The buffer appended to the bucket files, FLUSH_SLICE entries at a time: a flush comes while a block is
        being read, and its temporaries (the order by bucket, a radix sort of one byte per entry) stay that small."""
        for lo in range(0, self._n, FLUSH_SLICE):
            h, i = self._h[lo:min(self._n, lo + FLUSH_SLICE)], self._i[lo:min(self._n, lo + FLUSH_SLICE)]
            bucket = (h >> self._shift).astype(np.uint8 if self.buckets <= 256 else np.uint32)
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(self.buckets + 1))
            for b in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
                idx = order[bounds[b]:bounds[b + 1]]
                part = np.empty(len(idx), dtype=_ENTRY)
                part["h"], part["i"] = h[idx], i[idx]
                with open(self._bucket(b), "ab") as f:
                    part.tofile(f)
        self._n = 0

    def _each_bucket(self) -> Iterator[np.ndarray]:
        self._flush()
        for b in range(self.buckets):
            path = self._bucket(b)
            if os.path.exists(path):
                yield np.fromfile(path, dtype=_ENTRY)

    def repeated(self) -> np.ndarray:
        """The row numbers (sorted, each once) whose digest another entry has too."""
        found = self.repeated_by_bucket()
        return np.unique(np.concatenate(found)) if found else np.empty(0, np.uint64)

    def repeated_by_bucket(self) -> list[np.ndarray]:
        """repeated(), bucket by bucket (the row numbers of one bucket sorted, each once): the copies of a key are in
        one bucket."""
        found = []
        for entries in self._each_bucket():
            entries = entries[np.argsort(entries["h"], kind="stable")]
            h = entries["h"]
            same = h[1:] == h[:-1]
            mask = np.zeros(len(h), dtype=bool)
            mask[1:] |= same
            mask[:-1] |= same
            if mask.any():
                found.append(np.unique(entries["i"][mask]))
        return found

    def distinct(self) -> int:
        """How many distinct digests were added."""
        return sum(len(np.unique(entries["h"])) for entries in self._each_bucket())


class TextSpill(DigestSpill):
    """A DigestSpill of keys made of normalised texts (repeats.norm_key): digests of whole blocks (fastpath.py) added
    as they come, the texts of rows read one by one hashed HASH_BATCH rows at a time (hashing one row at a time costs
    more than reading it). Three texts are a pair's repeat key, two an unpaired row's (repeat_digests), one a key of
    its own (a prompt: its text_hashes)."""

    def __init__(self, directory: str | Path, name: str, buffer: int = BUFFER, buckets: int = BUCKETS):
        super().__init__(directory, name, buffer, buckets)
        self._texts: dict[int, tuple[list[str], list[int]]] = {}  # by how many texts a key has

    def add_texts(self, texts: tuple[str, ...], row: int) -> None:
        flat, rows = self._texts.setdefault(len(texts), ([], []))
        flat += texts
        rows.append(row)
        if len(rows) >= HASH_BATCH:
            self._hash_texts()

    def _hash_texts(self) -> None:
        pending, self._texts = self._texts, {}  # taken first: add_digests may flush, which comes back here
        for k, (flat, rows) in pending.items():
            h = text_hashes(flat).reshape(len(rows), k)
            digests = h[:, 0] if k == 1 else repeat_digests(h[:, 0], h[:, 1], h[:, 2] if k == 3 else None)
            self.add_digests(digests, np.array(rows, dtype=np.uint64))

    def _flush(self) -> None:
        self._hash_texts()
        super()._flush()


class RowSpool:
    """Rows written once (pickled, `chunk` at a time) and replayed in order as often as needed."""

    def __init__(self, path: str | Path, chunk: int | None = None):
        self.path, self.chunk = str(path), chunk or SPOOL_CHUNK  # (a string: see DigestSpill)
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
