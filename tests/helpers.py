"""Rules used by tests through `module:function` references."""


def nan_reward(prompt, response) -> float:
    return float("nan")
