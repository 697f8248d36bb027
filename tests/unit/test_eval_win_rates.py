"""Win rates by score and length-controlled win rates (pipeline/stages/evaluate.py), against values by hand."""

import math

import pytest

from pipeline.stages.evaluate import (EvaluateStageConfig, length_controlled, prompts_described, score_verdicts,
                                      win_rates)


def _sig(t):
    return 1 / (1 + math.exp(-t))


def test_length_controlled_win_rate_by_hand():
    # 4 pairs 10 tokens longer than the baseline: 3 wins (p 0.75); 4 pairs 10 tokens shorter: 2 wins (p 0.5).
    # Two groups, two parameters: the fit is exact, logit(0.75) = a + b d and logit(0.5) = a - b d, so
    # a = (ln 3 + 0) / 2 and the win rate at equal length is sigmoid(a) = 0.634, not the raw 5/8 = 0.625.
    # Var(a) = (1 / (4 * 0.75 * 0.25) + 1 / (4 * 0.5 * 0.5)) / 4 = (4/3 + 1) / 4.
    y = [1, 1, 1, 0, 1, 1, 0, 0]
    d = [10, 10, 10, 10, -10, -10, -10, -10]
    got = length_controlled(y, d)
    a, se = math.log(3) / 2, math.sqrt((4 / 3 + 1) / 4)
    assert got["win_rate_lc"] == pytest.approx(_sig(a), abs=1e-6)
    assert got["win_rate_lc_low"] == pytest.approx(_sig(a - 1.959964 * se), abs=1e-6)
    assert got["win_rate_lc_high"] == pytest.approx(_sig(a + 1.959964 * se), abs=1e-6)
    assert got["length_coef"] == pytest.approx(math.log(3) / 2 / 10, abs=1e-6)  # b d = ln 3 / 2 at d = 10


def test_length_controlled_without_length_differences_is_the_raw_rate():
    # every answer as long as the baseline's: the intercept is logit of the raw rate (ties count half)
    got = length_controlled([1, 1, 0.5, 0], [0, 0, 0, 0])
    assert got["win_rate_lc"] == pytest.approx(2.5 / 4, abs=1e-6)
    # one outcome only: no finite intercept; the raw rate and its Wilson interval
    got = length_controlled([1, 1, 1], [5, -3, 2])
    assert got["win_rate_lc"] == 1.0 and got["win_rate_lc_high"] == 1.0 and 0.4 < got["win_rate_lc_low"] < 0.45


def test_a_longer_policy_loses_its_length_advantage():
    # it wins every pair where it is longer and loses every pair where it is shorter, 3 of 4 times longer: raw 0.75;
    # at equal length the regression says 0.5 is within reach (the interval covers it)
    y = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0]
    d = [20, 15, 30, 10, 25, 12, 18, 22, -10, -15, -20, -12]
    w = win_rates(["win" if v else "loss" for v in y], [100 + x for x in d], [100] * len(d), "reward_")
    assert w["reward_win_rate"] == pytest.approx(7 / 12)
    assert w["reward_win_rate_lc"] < w["reward_win_rate"] and w["reward_win_rate_lc_low"] < 0.5
    assert "reward_pairs" not in w


def test_score_verdicts_and_scorer_names():
    assert score_verdicts([1.0, 0.2, 0.5], [0.5, 0.3, 0.5]) == ["win", "loss", "tie"]
    base = {"stage": "evaluate", "policies": {"sft": "stage:sft", "ppo": "stage:ppo"}, "prompts": "p.jsonl"}
    cfg = EvaluateStageConfig.model_validate({**base, "scorers": {"ind": "stage:scorer"}, "baseline": "sft"})
    assert cfg.inputs()["scorer:ind"] == ("stage:scorer", "artifact")
    with pytest.raises(ValueError, match="scorers: names"):
        EvaluateStageConfig.model_validate({**base, "scorers": {"reward": "stage:scorer"}})
    with pytest.raises(ValueError, match="baseline"):  # nothing judges: a baseline would go unused
        EvaluateStageConfig.model_validate({**base, "baseline": "sft"})


def test_the_prompts_line_says_how_many_of_how_many_and_does_not_call_held_out_prompts_not_held_out():
    # the HH recipe evaluates the first 48 of the 223 held-out prompts of hh:prompts-eval (eval_fraction 0: the file
    # is a held-out part already); its log said "48 prompts (every prompt of hh:prompts-eval: eval_fraction 0, none
    # held out)": neither every prompt, nor not held out
    base = {"stage": "evaluate", "policies": {"sft": "stage:sft", "ppo": "stage:ppo"}, "prompts": "hh:prompts-eval"}
    whole = EvaluateStageConfig.model_validate({**base, "eval_fraction": 0})
    assert prompts_described(whole, 48, 223) == ("prompts (prompts of hh:prompts-eval: eval_fraction 0, none split "
                                                 "off; the first 48 of 223)")
    assert prompts_described(whole, 5, 5) == ("prompts (every prompt of hh:prompts-eval: eval_fraction 0, none split "
                                              "off)")
    split = EvaluateStageConfig.model_validate({**base, "eval_fraction": 0.2})
    assert prompts_described(split, 8, 45) == ("held-out prompts (eval_fraction 0.2 of hh:prompts-eval; the first 8 "
                                               "of 45)")
    assert prompts_described(split, 8, 8) == "held-out prompts (eval_fraction 0.2 of hh:prompts-eval)"
