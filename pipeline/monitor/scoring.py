"""Scoring recorded answers for `rlhf monitor`, each answer once per scorer: the scores live in OUT_DIR/scores.sqlite,
keyed by (completion id, scorer), so a second run scores only the rows recorded since.

    store = ScoreStore(out_dir / "scores.sqlite")
    counts = score_new(store, RuleScorer("feedback.synthetic:rule_score"), items)   # {"scored": 12, "cached": 88}
    store.values("rule")                                                            # {id: score or None}

Scorers (each has a `name`, an `identity` and a batched `score(items)`):
  reward  RewardModelScorer: a reward-model artifact's normalised score (as the evaluate stage's reward_mean)
  rule    RuleScorer: a `module:function(prompt, response)` rule, loaded as the evaluate stage loads `rule:`
  judge   JudgeScorer: a judge config's verdict on the answer against the reference answer to the same prompt
          (the evaluate stage's baseline policy's answer): 1 win, 0.5 tie, 0 loss, both orders; no reference or an
          abstention is no score
A scorer's identity (the reward artifact's manifest hash, the rule, the judge and its references) is kept with its
scores: when it changes, that scorer's old scores are dropped and every row is scored again.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from feedback.judges import JudgeItem, judge_both_orders
from feedback.judges.rule import load_callable
from feedback.schema import canonical, prompt_key
from pipeline.artifacts import MANIFEST, manifest_hash
from pipeline.judging import build_judge
from rlhf.errors import UsageError

CHUNK = 256  # items scored, then committed, at a time: a killed run keeps what it scored
VERDICT_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}


@dataclass
class Item:
    """One answer to score: a recorded completion (id) or a baseline answer (id "baseline:...")."""

    id: str
    prompt: str | list  # a string for a single user turn (as the evaluate stage passes prompts), else the messages
    response: str

    @property
    def last_user(self) -> str:
        """What a rule sees as the prompt: the last user turn's text."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m.get("content", "") for m in self.prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""

    @property
    def key(self) -> str:
        return prompt_key(as_prompt(self.prompt))


def as_prompt(messages) -> str | list:
    """A single user turn as its text (the layout the evaluate stage scores), anything else as the messages."""
    if isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict) \
            and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str):
        return messages[0]["content"]
    return messages


class ScoreStore:
    """The scores of earlier runs: SQLite, one committed transaction per chunk."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.executescript(
                "CREATE TABLE IF NOT EXISTS scorers (scorer TEXT PRIMARY KEY, identity TEXT NOT NULL);"
                "CREATE TABLE IF NOT EXISTS scores (id TEXT NOT NULL, scorer TEXT NOT NULL, value REAL, "
                "PRIMARY KEY (id, scorer));")
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{path}: not a monitor score store ({exc}); remove it or choose another -o") from None

    def use(self, scorer: str, identity: dict) -> bool:
        """Make `identity` the scorer's; returns True when it replaced another (whose scores are dropped)."""
        ident = canonical(identity)
        old = self.db.execute("SELECT identity FROM scorers WHERE scorer = ?", (scorer,)).fetchone()
        if old is not None and old[0] == ident:
            return False
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM scores WHERE scorer = ?", (scorer,))
            self.db.execute("INSERT OR REPLACE INTO scorers VALUES (?, ?)", (scorer, ident))
        return old is not None

    def values(self, scorer: str) -> dict[str, float | None]:
        return dict(self.db.execute("SELECT id, value FROM scores WHERE scorer = ?", (scorer,)))

    def put(self, scorer: str, values: dict[str, float | None]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)",
                                [(i, scorer, v) for i, v in values.items()])

    def close(self) -> None:
        self.db.close()


def score_new(store: ScoreStore, scorer, items: list[Item]) -> dict:
    """Score the items `store` holds no score of for this scorer; returns how many were scored and cached, and how
    many got no score (no reference answer, an abstention, a non-finite value)."""
    replaced = store.use(scorer.name, scorer.identity)
    have = store.values(scorer.name)
    todo = [it for it in items if it.id not in have]
    for i in range(0, len(todo), CHUNK):
        chunk = todo[i : i + CHUNK]
        values = [v if v is not None and math.isfinite(v) else None for v in scorer.score(chunk)]
        store.put(scorer.name, {it.id: v for it, v in zip(chunk, values)})
    have = store.values(scorer.name)
    return {"scored": len(todo), "cached": len(items) - len(todo), "unscored": sum(have.get(it.id) is None
                                                                                for it in items),
            "identity_changed": replaced}


class RewardModelScorer:
    """The reward model's normalised score; the model is loaded when there is something to score (a second run with
    nothing new loads nothing)."""

    name = "reward"

    def __init__(self, path: str, trust_remote_code: bool = False, batch_size: int = 32):
        self.path, self.trust, self.batch_size, self.scorer = path, trust_remote_code, batch_size, None
        art = Path(path) if (Path(path) / MANIFEST).exists() else Path(path).parent
        self.identity = {"reward_model": str(Path(path).resolve()),
                         "manifest": manifest_hash(art) if (art / MANIFEST).exists() else None}

    def score(self, items: list[Item]) -> list[float]:
        if self.scorer is None:
            from reward.scoring import RewardScorer  # deferred: it imports torch and transformers

            # trust_remote_code is the user's flag, never the artifact's (as `rlhf reward score`)
            self.scorer = RewardScorer.from_artifact(self.path, batch_size=self.batch_size,
                                                     trust_remote_code=self.trust)
        return self.scorer.score([it.prompt for it in items], [it.response for it in items])[1]


class RuleScorer:
    name = "rule"

    def __init__(self, spec: str):
        self.fn, self.identity = load_callable(spec), {"rule": spec}

    def score(self, items: list[Item]) -> list[float]:
        return [float(self.fn(it.last_user, it.response)) for it in items]


class JudgeScorer:
    """A judge config's verdict on each answer against `references` ({prompt_key: reference answer}): the answer is
    response A, the reference response B, judged in both orders (position bias becomes ties)."""

    name = "judge"

    def __init__(self, config: str, references: dict[str, str], reference_of: str):
        self.judge, self.cfg, _ = build_judge(config)
        self.references = references
        refs = canonical(sorted(references.items()))
        self.identity = {"judge": self.judge.identity(), "reference": reference_of,
                         "references": hashlib.sha256(refs.encode()).hexdigest()[:16]}

    def score(self, items: list[Item]) -> list[float | None]:
        judged = [(i, it) for i, it in enumerate(items) if it.key in self.references]
        out: list[float | None] = [None] * len(items)
        pairs = [JudgeItem(it.prompt, it.response, self.references[it.key], id=it.id) for _, it in judged]
        pos = self.cfg.position
        for (i, _), r in zip(judged, judge_both_orders(self.judge, pairs, pos.policy, pos.disagreement, pos.tie_band)
                             if pairs else []):
            out[i] = VERDICT_SCORE.get(r.choice)
        return out


def traffic_items(rows: list[dict]) -> list[Item]:
    return [Item(r["id"], as_prompt(r["messages"]), r["response"]) for r in rows]


def baseline_items(prompts: list, responses: list[str]) -> list[Item]:
    """The baseline's answers as items, identified by their content (a changed baseline is scored anew)."""
    return [Item("baseline:" + hashlib.sha256(canonical([p, r]).encode()).hexdigest()[:24], p, r)
            for p, r in zip(prompts, responses)]
