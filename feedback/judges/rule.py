"""Rule judge: a Python callable `module:function(prompt, response) -> float` scores each response.

For verifiable tasks, such as the shipped synthetic task (`feedback.synthetic:rule_score`).
A rule sees each response on its own, so it cannot be swayed by position or by text that
addresses the judge.
"""

from __future__ import annotations

import importlib

from feedback.judges import Judge, JudgeItem, Verdict
from feedback.schema import reply_text
from pipeline.errors import UsageError


def load_callable(spec: str):
    module, _, func = spec.partition(":")
    if not module or not func:
        raise UsageError(f"rule '{spec}': expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"rule '{spec}': cannot import: {exc}") from None
    if not callable(fn):
        raise UsageError(f"rule '{spec}' is not callable")
    return fn


class RuleJudge(Judge):
    name = "rule"

    def __init__(self, spec: str, tie_epsilon: float = 1e-9):
        self.spec, self.fn, self.eps = spec, load_callable(spec), tie_epsilon

    def identity(self) -> dict:
        return {"type": "rule", "rule": self.spec}

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        out = []
        for it in items:
            # a rule scores reply text (a conversational reply is a list of one assistant message)
            sa = float(self.fn(it.prompt, reply_text(it.response_a)))
            sb = float(self.fn(it.prompt, reply_text(it.response_b)))
            choice = "tie" if abs(sa - sb) <= self.eps else ("a" if sa > sb else "b")
            out.append(Verdict(choice, {"a": 1.0, "b": 0.0, "tie": 0.5}[choice], raw=f"{sa:.6g} vs {sb:.6g}",
                               reason=f"rule scores A={sa:.6g}, B={sb:.6g}"))
        return out
