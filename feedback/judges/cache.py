"""A persistent verdict cache (SQLite), so a rerun after a crash pays for no call twice.

Key: judge identity + template hash + prompt + the two responses in the order asked. Each
verdict is committed as soon as it arrives; only definite answers (not transport failures)
are stored, so a rerun retries what failed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from feedback.judges import JudgeItem, Verdict
from feedback.schema import canonical


class VerdictCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL)")
        self._db.commit()
        self.hits = self.misses = 0

    @staticmethod
    def key(identity: dict, template_hash: str, item: JudgeItem) -> str:
        return hashlib.sha256(canonical([identity, template_hash, item.prompt, item.response_a,
                                         item.response_b]).encode()).hexdigest()

    def get(self, key: str) -> Verdict | None:
        with self._lock:
            row = self._db.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        v = Verdict.from_dict(json.loads(row[0]))
        v.cached = True
        return v

    def put(self, key: str, verdict: Verdict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, json.dumps(verdict.to_dict())))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedJudge:
    """Wraps a judge: cached items are answered from disk, the rest go to the judge and are stored."""

    def __init__(self, judge, cache: VerdictCache, template_hash: str = ""):
        self.inner, self.cache, self.template_hash = judge, cache, template_hash
        self.name = judge.name

    def identity(self) -> dict:
        return self.inner.identity()

    def stats(self) -> dict:
        return {**self.inner.stats(), "cache_hits": self.cache.hits, "cache_misses": self.cache.misses}

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        ident = self.inner.identity()
        keys = [VerdictCache.key(ident, self.template_hash, it) for it in items]
        out: list[Verdict | None] = [self.cache.get(k) for k in keys]
        reads = getattr(self.inner, "reads", "")  # a judge that reads every verdict one way (local: logprobs)
        for v in out:
            if v is not None and not v.read and reads:  # stored before verdicts recorded how they were read
                v.read = reads
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            batch, store = [items[i] for i in todo], self._store(keys, todo)
            if getattr(self.inner, "streams_results", False):
                fresh = self.inner.judge(batch, on_result=store)  # stored as each answer arrives
            else:
                fresh = self.inner.judge(batch)
                for j, v in enumerate(fresh):
                    store(j, v)
            for i, v in zip(todo, fresh):
                out[i] = v
        return out  # type: ignore[return-value]

    def _store(self, keys, todo):
        def on_result(j: int, v: Verdict) -> None:
            if not v.reason.startswith("transport"):
                self.cache.put(keys[todo[j]], v)
        return on_result
