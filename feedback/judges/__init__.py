"""AI judges: given a prompt and two responses, say which is better.

A judge returns a `Verdict` per item: `a`, `b`, `tie` or `abstain`, with the probability that
A is better where the backend has one, its raw output and a reason. Judges are batched by
design (`judge(items)`), and every backend is wrapped by `judge_both_orders`, which asks each
question in both orders so that position bias turns into ties instead of labels.

Backends: `rule` (a Python callable), `local` (a causal LM's next-token probabilities for the
choice letters), `http` (an OpenAI-compatible chat-completions endpoint), `reward_model`.
An answer that cannot be read as a choice is `abstain`, never a winner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CHOICES = ("a", "b", "tie", "abstain")


@dataclass
class JudgeItem:
    prompt: Any  # str or messages
    response_a: Any
    response_b: Any
    id: str = ""


@dataclass
class Verdict:
    choice: str  # a | b | tie | abstain
    prob_a: float | None = None  # P(A is better), where the backend has one
    raw: str | None = None
    reason: str = ""
    attempts: int = 1
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens
    cached: bool = False
    read: str = ""  # how a model judge's verdict was read: logprobs (token probabilities) | text (parsed answer)

    def __post_init__(self):
        assert self.choice in CHOICES, self.choice

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        return cls(**{k: d[k] for k in ("choice", "prob_a", "raw", "reason", "attempts", "usage", "read")
                      if k in d})

    def swapped(self) -> "Verdict":
        """The verdict seen from the other order (A and B exchanged)."""
        flip = {"a": "b", "b": "a"}.get(self.choice, self.choice)
        return Verdict(flip, None if self.prob_a is None else 1 - self.prob_a, self.raw, self.reason,
                       self.attempts, self.usage, self.cached, self.read)


class Judge:
    """Base class: `identity` names everything that changes verdicts (never secrets); `judge` is batched."""

    name = "judge"

    def identity(self) -> dict:
        raise NotImplementedError

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}


@dataclass
class PairResult:
    item: JudgeItem
    choice: str  # final: a | b | tie | abstain
    prob_a: float | None
    forward: Verdict
    backward: Verdict  # already mapped back to the original order
    consistent: bool | None  # None when either order abstained

    @property
    def read(self) -> str:
        """How the label was read: `logprobs` or `text` when both orders were read alike, else `mixed`; "" for
        judges that read no model output (rule, reward model)."""
        kinds = {self.forward.read, self.backward.read}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def judge_record(self, judge: Judge, policy: str) -> dict:
        return {"name": judge.name, "identity": judge.identity(), "policy": policy, "choice": self.choice,
                "prob_a": self.prob_a, "consistent": self.consistent,
                **({"read": self.read} if self.read else {}),
                "orders": [{"order": "ab", **_brief(self.forward)}, {"order": "ba", **_brief(self.backward)}]}


def _brief(v: Verdict) -> dict:
    return {"choice": v.choice, "prob_a": v.prob_a, "raw": v.raw, "reason": v.reason, "attempts": v.attempts,
            **({"read": v.read} if v.read else {})}


def combine(forward: Verdict, backward: Verdict, policy: str = "agree_or_tie", disagreement: str = "tie",
            tie_band: float = 0.05) -> tuple[str, float | None, bool | None]:
    """Both orders -> (choice, prob_a, consistent). `backward` is already in the original order.

    agree_or_tie: the choice both orders agree on; a disagreement becomes `disagreement` (tie or abstain).
    average: P(A) averaged over both orders; within `tie_band` of 0.5 it is a tie.
    An abstention in either order makes the result abstain (an unreadable answer is never a vote).
    """
    if "abstain" in (forward.choice, backward.choice):
        return "abstain", None, None
    consistent = forward.choice == backward.choice
    probs = [v.prob_a for v in (forward, backward)]
    prob = sum(probs) / 2 if None not in probs else None
    if policy == "average" and prob is not None:
        if abs(prob - 0.5) <= tie_band:
            return "tie", prob, consistent
        return ("a" if prob > 0.5 else "b"), prob, consistent
    if consistent:
        return forward.choice, prob, True
    return disagreement, prob, False


def judge_both_orders(judge: Judge, items: list[JudgeItem], policy: str = "agree_or_tie",
                      disagreement: str = "tie", tie_band: float = 0.05) -> list[PairResult]:
    swapped = [JudgeItem(it.prompt, it.response_b, it.response_a, it.id) for it in items]
    verdicts = judge.judge(list(items) + swapped)
    n = len(items)
    out = []
    for i, it in enumerate(items):
        fwd, back = verdicts[i], verdicts[n + i].swapped()
        choice, prob, consistent = combine(fwd, back, policy, disagreement, tie_band)
        out.append(PairResult(it, choice, prob, fwd, back, consistent))
    return out


def position_consistency(results: list[PairResult]) -> float | None:
    decided = [r.consistent for r in results if r.consistent is not None]
    return sum(decided) / len(decided) if decided else None


def read_counts(results: list[PairResult]) -> dict[str, int]:
    """How many judged pairs had their verdicts read from token probabilities (`logprobs`), from parsed text
    (`text`), or one order each way (`mixed`); empty for judges that read no model output."""
    counts: dict[str, int] = {}
    for r in results:
        if r.read:
            counts[r.read] = counts.get(r.read, 0) + 1
    return counts
