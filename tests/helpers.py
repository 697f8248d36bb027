"""Rules used by tests through `module:function` references."""


def nan_reward(prompt, response) -> float:
    return float("nan")


RULE_CALLS = {"n": 0}  # how many answers counted_rule scored (rlhf monitor runs in-process in the tests)


def counted_rule(prompt, response) -> float:
    """The synthetic task's rule, counting its calls: a test sees how many answers a monitor run scored."""
    from feedback.synthetic import rule_score

    RULE_CALLS["n"] += 1
    return rule_score(prompt, response)
