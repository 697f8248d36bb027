"""A training run that diverges stops, whatever the stage: SFT, reward, DPO, GRPO and RLOO on TRL, at a learning
rate of 1e30 (the weights overflow after the first update), with no held-out data whose metrics could give it
away. The stage exits 1 saying it diverged and leaves no artifact. (Before: transformers logged each NaN loss as
the mean of the earlier ones, SFT and DPO checked only their eval metrics, and all of these saved NaN weights
and exited 0.)"""

import pytest

from tests.conftest import write_yaml
from pipeline.cli import main

DIVERGE = {"lr": 1.0e30, "max_steps": 8, "logging_steps": 1}
BLOCKS = {
    "sft": {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft", "eval_fraction": 0}, "max_length": 64,
            "optim": {"per_device_batch_size": 8, **DIVERGE}},
    "reward": {"stage": "reward", "model": "stage:sft", "preferences": "stage:all_pairs", "max_length": 64,
               "optim": {"per_device_batch_size": 8, **DIVERGE}},
    "dpo": {"stage": "dpo", "policy": "stage:sft", "preferences": "stage:all_pairs", "max_length": 64,
            "optim": {"per_device_batch_size": 8, **DIVERGE}},
    "grpo": {"stage": "grpo", "policy": "stage:sft", "prompts": "synthetic:prompts",
             "reward": {"rule": "feedback.synthetic:rule_score"}, "num_generations": 4, "max_completion_length": 8,
             "optim": {"per_device_batch_size": 4, **DIVERGE}},
}
BLOCKS["rloo"] = {**BLOCKS["grpo"], "stage": "rloo"}


@pytest.mark.parametrize("stage", sorted(BLOCKS))
def test_a_diverging_stage_stops_and_saves_nothing(tiny_run, tmp_path, capsys, stage):
    name = f"{stage}_diverged"
    block = {**BLOCKS[stage], "name": name, "precision": "fp32"}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tiny_run), "seed": 0, "stages": [
        {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}},
        {"stage": "preferences", "name": "all_pairs", "data": {"path": "synthetic:preferences"}, "eval_fraction": 0},
        block]})
    assert main(["run", str(cfg), "--stage", "all_pairs"]) == 0
    assert main(["run", str(cfg), "--stage", name]) == 1
    err = capsys.readouterr().err
    assert f"[{name}]" in err and "training diverged" in err, err[-2000:]
    assert not (tiny_run / name).exists()
