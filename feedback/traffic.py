"""The traffic log: what a served policy answered, and what its users said of the answers, in one SQLite file.

`rlhf serve policy RUN_DIR/STAGE --monitor DB` writes it (pipeline/serve), `rlhf monitor DB` scores and summarises
it, and `rlhf feedback export DB` turns its feedback into the next round's training data. The standard library's
sqlite3 is the whole engine: one file, WAL mode (readers such as `rlhf monitor` never block the server), every
completion and every feedback row committed in its own transaction with synchronous=FULL, so a server that is
killed loses no row it has answered for.

Stored per completion (table `completions`): `seq` (the order rows were written), `id` (the id the client got
back, e.g. "chatcmpl-..."), `created` (Unix time, seconds), `model` (the served name), `stage` (RUN_DIR/STAGE
as served), `messages` (the request's messages, JSON), `response`, `finish_reason`, `prompt_tokens`,
`completion_tokens`, `latency_ms` (request received to answer complete) and `sampling` (temperature, top_p,
max_tokens, seed, as the request gave them; JSON). Never request headers, keys or client addresses.

Per feedback (table `feedback`): `seq`, `created`, `id` (the completion it is about), then either `rating` ("up" or
"down") or `preferred_over` (the id of another answer to the same messages, which this one beat), and an optional
`comment`.

With `max_rows`, the oldest completions beyond the bound are deleted together with their feedback (a bounded
file; the deletion is counted in `meta.pruned`).

    log = TrafficLog("traffic.db")                 # creates the file and its tables, or opens it
    log.record(Completion(id="chatcmpl-1", ...))   # one committed row
    log.add_feedback("chatcmpl-1", rating="up")    # UnknownCompletion for an id never recorded
    for row in log.completions(after_seq=0): ...   # dicts in seq order (monitor reads only the new ones)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from feedback.schema import canonical
from rlhf.errors import InvalidInput, UsageError

SCHEMA_VERSION = 1
RATINGS = ("up", "down")
MAX_COMMENT = 4000  # characters kept of a feedback comment

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS completions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    stage TEXT NOT NULL,
    messages TEXT NOT NULL,
    response TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms REAL,
    sampling TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    id TEXT NOT NULL,
    rating TEXT CHECK (rating IN ('up', 'down')),
    preferred_over TEXT,
    comment TEXT,
    CHECK ((rating IS NULL) != (preferred_over IS NULL))
);
CREATE INDEX IF NOT EXISTS feedback_id ON feedback (id);
"""


class UnknownCompletion(InvalidInput):
    """A feedback row names a completion id the log does not hold (never recorded, or pruned); `param` says which
    of the two ids ('id' or 'preferred_over')."""

    def __init__(self, message: str, param: str = "id"):
        super().__init__(message)
        self.param = param


@dataclass
class Completion:
    id: str
    model: str
    stage: str
    messages: list
    response: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    sampling: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)


class TrafficLog:
    """One SQLite traffic log. Safe to share between threads (one connection behind a lock: SQLite writes one
    transaction at a time anyway); other processes may read it at the same time (WAL)."""

    def __init__(self, path: str | Path, max_rows: int | None = None, readonly: bool = False):
        if max_rows is not None and max_rows < 1:
            raise UsageError(f"--monitor-max-rows must be at least 1, got {max_rows}")
        self.path, self.max_rows = Path(path), max_rows
        if readonly and not self.path.is_file():
            raise UsageError(f"{self.path}: no traffic log (serve with --monitor {self.path} to record one)")
        self._lock = threading.Lock()
        try:
            uri = f"file:{self.path.resolve()}?mode={'ro' if readonly else 'rwc'}"
            self._db = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False, isolation_level=None)
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{self.path}: not a traffic log ({exc})") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise UsageError(f"{self.path}: traffic log schema {version and version[0]}, expected {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ writing (the server)

    def record(self, c: Completion) -> None:
        """Commit one completion (and prune beyond max_rows) before returning."""
        row = asdict(c)
        row["messages"], row["sampling"] = json.dumps(c.messages), json.dumps(c.sampling, sort_keys=True)
        cols = [k for k in row]
        with self._lock, self._transaction():
            self._db.execute(f"INSERT INTO completions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                             [row[k] for k in cols])
            if self.max_rows is not None:
                self._prune()

    def add_feedback(self, id: str, rating: str | None = None, preferred_over: str | None = None,
                     comment: str | None = None) -> int:
        """Commit one feedback row; returns its seq. Exactly one of rating / preferred_over; the ids must be
        recorded, and a preferred_over answer must answer the same messages."""
        if (rating is None) == (preferred_over is None):
            raise InvalidInput("give either 'rating' ('up' or 'down') or 'preferred_over' (another answer's id)")
        if rating is not None and rating not in RATINGS:
            raise InvalidInput(f"'rating' must be 'up' or 'down', got {rating!r}")
        if preferred_over is not None and preferred_over == id:
            raise InvalidInput("'preferred_over' names the same answer as 'id'")
        with self._lock, self._transaction():
            mine = self._messages_of(id)
            if preferred_over is not None:
                other = self._messages_of(preferred_over, "preferred_over")
                if canonical(json.loads(mine)) != canonical(json.loads(other)):
                    raise InvalidInput(f"'{id}' and '{preferred_over}' answer different messages: a preference "
                                       "compares two answers to the same prompt")
            cur = self._db.execute("INSERT INTO feedback (created, id, rating, preferred_over, comment) "
                                   "VALUES (?, ?, ?, ?, ?)", (time.time(), id, rating, preferred_over,
                                                              None if comment is None else comment[:MAX_COMMENT]))
            return int(cur.lastrowid)

    def _messages_of(self, id: str, param: str = "id") -> str:
        found = self._db.execute("SELECT messages FROM completions WHERE id = ?", (id,)).fetchone()
        if found is None:
            raise UnknownCompletion(f"no completion with id '{id}' in the traffic log", param)
        return found[0]

    def _prune(self) -> None:
        count = self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
        if count <= self.max_rows:
            return
        cut = self._db.execute("SELECT seq FROM completions ORDER BY seq DESC LIMIT 1 OFFSET ?",
                               (self.max_rows,)).fetchone()[0]
        self._db.execute("DELETE FROM feedback WHERE id IN (SELECT id FROM completions WHERE seq <= ?) OR "
                         "preferred_over IN (SELECT id FROM completions WHERE seq <= ?)", (cut, cut))
        gone = self._db.execute("DELETE FROM completions WHERE seq <= ?", (cut,)).rowcount
        self._db.execute("INSERT INTO meta VALUES ('pruned', ?) ON CONFLICT(key) DO UPDATE SET value = "
                         "CAST(value AS INTEGER) + ?", (str(gone), gone))

    def _transaction(self):
        return _Transaction(self._db)

    # ------------------------------------------------------------------ reading (monitor, export)

    def completions(self, after_seq: int = 0) -> Iterator[dict]:
        """Completions with seq > after_seq, in order; messages and sampling decoded."""
        yield from self._rows("SELECT * FROM completions WHERE seq > ? ORDER BY seq", (after_seq,))

    def feedback(self, after_seq: int = 0) -> Iterator[dict]:
        yield from self._select("SELECT * FROM feedback WHERE seq > ? ORDER BY seq", (after_seq,))

    def get(self, id: str) -> dict | None:
        return next((r for r in self._rows("SELECT * FROM completions WHERE id = ?", (id,))), None)

    def _rows(self, sql: str, args: tuple) -> Iterator[dict]:
        for row in self._select(sql, args):
            row["messages"], row["sampling"] = json.loads(row["messages"]), json.loads(row["sampling"])
            yield row

    def _select(self, sql: str, args: tuple, chunk: int = 1000) -> Iterator[dict]:
        """Rows as dicts, fetched in chunks under the lock (a reader on another thread never shares a writer's
        open transaction) and yielded outside it (a slow consumer never holds the writer up)."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute(sql, args)
            names = [d[0] for d in cur.description]
        while True:
            with self._lock:
                values = cur.fetchmany(chunk)
            if not values:
                return
            yield from (dict(zip(names, v)) for v in values)

    def counts(self) -> dict[str, Any]:
        """How many completions and feedback rows the log holds, and how many completions max_rows deleted."""
        with self._lock:
            pruned = self._db.execute("SELECT value FROM meta WHERE key='pruned'").fetchone()
            return {"completions": self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0],
                    "feedback": self._db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
                    "pruned": int(pruned[0]) if pruned else 0}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception): a row is either committed whole or not at all."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, exc, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
