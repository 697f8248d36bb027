"""`rlhf plan` plans what will run (issue 20, item 8): the parameters freeze and prompt tuning really train (counted
on the built model), and PPO without DeepSpeed in fp32, the precision it runs in, not the bf16 of `precision: auto`
(which under-estimated it, so that --plan-check could approve a stage that then ran out of memory). The estimate's
parts by hand and its measured accuracy are in tests/integration/test_plan.py."""

import pytest

from pipeline.blocks import validate
from pipeline.config import PipelineConfig
from tests.conftest import tiny_sft_block

GIB = 1024**3


def _cfg(*stages):
    return validate(PipelineConfig, {"run_dir": "runs/x", "stages": list(stages)}, "x.yaml")


def test_freeze_and_prompt_tuning_are_planned_with_the_parameters_they_train(tiny_path):
    import torch
    from peft import PromptTuningConfig, get_peft_model

    from pipeline.models import count_parameters, load_causal_lm
    from pipeline.plan import plan
    from pipeline.stages.sft import freeze_lower

    cfg = _cfg(tiny_sft_block(name="full"), tiny_sft_block(name="freeze", tuning="freeze", freeze_layers=2),
               tiny_sft_block(name="prompt", tuning="prompt_tuning", prompt_tuning={"num_virtual_tokens": 8}))
    rows = {r["stage"]: r for r in plan(cfg, 1, 1, 80 * GIB, on_cpu=True)}
    model = load_causal_lm(tiny_path)
    assert rows["full"]["trainable"] == count_parameters(model)[1]
    freeze_lower(model, 2)
    assert rows["freeze"]["trainable"] == count_parameters(model)[1]
    torch.manual_seed(0)
    tuned = get_peft_model(load_causal_lm(tiny_path), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    assert rows["prompt"]["trainable"] == count_parameters(tuned)[1] == 8 * 64
    peak = {name: rows[name]["options"][0]["bytes"] for name in rows}
    assert peak["full"] > peak["freeze"] and peak["full"] > peak["prompt"]


def test_ppo_without_deepspeed_is_planned_in_fp32_as_it_runs():
    from pipeline.plan import estimate, plan, work_of

    ppo = {"stage": "ppo", "policy": "tiny", "prompts": "synthetic:prompts",
           "reward": {"rule": "feedback.synthetic:rule_score"}}  # precision: auto, bf16 on a GPU
    cfg = _cfg(ppo)
    row = plan(cfg, 1, 1, 80 * GIB, on_cpu=False)[0]
    zero0 = row["options"][0]
    assert row["precision"] == "fp32"
    assert zero0["precision"] == "fp32"
    assert zero0["bytes"] == pytest.approx(sum(estimate(work_of(cfg.stages[0], cfg), 0, False, 1, "fp32",
                                                        on_cpu=False).values()))
    # under DeepSpeed `precision` applies: bf16 for every ZeRO stage
    with_ds = plan(_cfg({**ppo, "deepspeed": "configs/deepspeed/zero2.json"}), 1, 1, 80 * GIB, on_cpu=False)[0]
    assert with_ds["precision"] == with_ds["options"][0]["precision"] == "bf16"
    assert with_ds["options"][0]["bytes"] < zero0["bytes"]
