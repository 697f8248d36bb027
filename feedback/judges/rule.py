"""Rule judge: a Python callable `module:function(prompt, response) -> float` scores each response.

For verifiable tasks, such as the shipped synthetic task (`feedback.synthetic:rule_score`).
A rule sees each response on its own, so it cannot be swayed by position or by text that
addresses the judge.

A rule is code: `module:function` imports the module and calls the function on data rows. So a
config names only rules registered with `@rule` (feedback/rules.py: the project's own, such as
`feedback.synthetic:rule_score`) or functions of modules the user trusts explicitly, in the pipeline
config (`trusted_modules: [mypkg.rules]`) or the environment (`RLHF_TRUSTED_MODULES=mypkg.rules,other`);
anything else (`shutil:rmtree`, `os:system`, `feedback.schema:write_pairs`) is refused.
"""

from __future__ import annotations

import importlib
import os

from feedback.judges import Judge, JudgeItem, Verdict
from feedback.schema import reply_text
from rlhf.errors import UsageError
from feedback import synthetic
from feedback.rules import RULES


TRUSTED_ENV = "RLHF_TRUSTED_MODULES"
_trusted: tuple[str, ...] = ()  # from the pipeline config's trusted_modules (set by the runner)


def trust_modules(modules) -> None:
    """The pipeline config's `trusted_modules`: modules (and their submodules) whose functions rules may name."""
    global _trusted
    _trusted = tuple(modules or ())


def trusted_modules() -> tuple[str, ...]:
    """The user's own trusted modules: the pipeline config's, then the environment's."""
    env = tuple(m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip())
    return _trusted + env


def load_callable(spec: str):
    module, _, func = spec.partition(":")
    if not module or not func or not func.isidentifier() or func.startswith("_"):
        raise UsageError(f"rule '{spec}': expected 'module:function' naming a public function")
    trusted = trusted_modules()
    by_user = any(module == m or module.startswith(m + ".") for m in trusted)
    ours = module == "feedback" or module.startswith("feedback.")  # importing our own modules runs nothing else
    if not by_user and not ours:
        raise UsageError(f"rule '{spec}': module '{module}' is not trusted. A rule is code that runs on your data; "
                         f"rules may be {_allowed(trusted)}. Trust a module of yours with `trusted_modules: "
                         f"[{module}]` in the pipeline config or {TRUSTED_ENV}={module}")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"rule '{spec}': cannot import: {exc}") from None
    if not by_user and RULES.get(spec) is not fn:
        raise UsageError(f"rule '{spec}' is not a registered rule (feedback/rules.py): rules may be "
                         f"{_allowed(trusted)}")
    # defined in that module, not imported into it (feedback.x:rmtree after `from shutil import rmtree`)
    if not callable(fn) or getattr(fn, "__module__", None) != module:
        raise UsageError(f"rule '{spec}' is not a function defined in {module}")
    return fn


def _allowed(trusted: tuple[str, ...]) -> str:
    mine = f"; or functions of {', '.join(trusted)}" if trusted else ""
    return f"the registered rules ({', '.join(sorted(RULES))}){mine}"


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
