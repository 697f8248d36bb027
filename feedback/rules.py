"""The registry of rule functions shipped with rlhf: `module:function` references a config may name without
trusting a module of its own.

    from feedback.rules import rule

    @rule
    def rule_score(prompt, response) -> float: ...

A rule is code that runs on your data, so being importable is not enough: `feedback` also holds functions that
write files (`feedback.schema:write_pairs`), which a config must not be able to call on a prompt. Only functions
marked `@rule` here, or functions of the modules the user trusts by name (`trusted_modules`,
`RLHF_TRUSTED_MODULES`; see feedback/judges/rule.py), are accepted.
"""

from __future__ import annotations

from typing import Callable

RULES: dict[str, Callable] = {}  # "module:function" -> the function


def rule(fn: Callable) -> Callable:
    """Register `fn` as a rule configs may name as `module:function`."""
    RULES[f"{fn.__module__}:{fn.__name__}"] = fn
    return fn
