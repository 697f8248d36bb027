"""Every setting means what it says: each method keeps its own optimiser defaults whatever subset of the block
a user writes, gradient checkpointing is off unless asked for, settings that would do nothing are refused."""

from types import SimpleNamespace

import pytest

from pipeline.cli import main
from pipeline.blocks import TrackingConfig, validate
from pipeline.config import PipelineConfig
from tests.conftest import tiny_sft_block, write_yaml

PREFS = {"stage": "preferences", "data": {"path": "synthetic:preferences"}}
DPO = {"stage": "dpo", "policy": "tiny", "preferences": "stage:preferences"}
GRPO = {"stage": "grpo", "policy": "tiny", "prompts": "synthetic:prompts", "reward": {"rule": "feedback.synthetic:rule_score"}}
PPO = {"stage": "ppo", "policy": "tiny", "reward": {"rule": "feedback.synthetic:rule_score"}, "prompts": "synthetic:prompts"}
REWARD = {"stage": "reward", "model": "tiny", "preferences": "stage:preferences"}


def _stages(*blocks, overrides=()):
    from pipeline.config import apply_override

    data = {"run_dir": "runs/x", "stages": [dict(b) for b in blocks]}
    for o in overrides:
        apply_override(data, o)
    return validate(PipelineConfig, data, "x.yaml").stages


def test_a_partial_optim_block_keeps_the_methods_own_defaults(tmp_path, capsys):
    assert _stages(PREFS, {**DPO, "optim": {"batch_size": 4}})[1].optim.lr == 5e-7
    assert _stages(PREFS, DPO, overrides=["stages.dpo.optim.batch_size=4"])[1].optim.lr == 5e-7
    # the README's GRPO example
    grpo = _stages({**GRPO, "optim": {"batch_size": 16, "max_steps": 24, "logging_steps": 2}})[0]
    assert grpo.optim.lr == 1e-6 and grpo.optim.batch_size == 16
    assert _stages({**PPO, "optim": {"max_grad_norm": 0.5}})[0].optim.lr == 1e-5
    assert _stages({**GRPO, "stage": "rloo", "optim": {"batch_size": 8}})[0].optim.lr == 1e-6
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": "runs/x", "stages": [PREFS, {**DPO, "optim": {"batch_size": 4}}]})
    assert main(["run", str(cfg), "--check"]) == 0
    assert "stages.dpo.optim: lr 5e-07 (shared default 2e-05), batch_size 4 (shared default 8)" in capsys.readouterr().out


def _args(block, tmp_path):
    """The TRL config a stage would build (common.training_args), without training."""
    from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

    from pipeline.stages.common import training_args

    st = _stages(PREFS, block)[-1]
    ctx = SimpleNamespace(work_dir=tmp_path, seed=0, name=st.name, pipeline=SimpleNamespace(tracking=TrackingConfig()))
    cls = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}[st.stage]
    extra = {"num_generations": 4} if st.stage in ("grpo", "rloo") else {}
    return training_args(cls, st, ctx, "fp32", **extra)


@pytest.mark.parametrize("block", [tiny_sft_block(), REWARD, DPO, {**GRPO, "optim": {"batch_size": 4}},
                                   {**GRPO, "stage": "rloo", "optim": {"batch_size": 4}}],
                         ids=["sft", "reward", "dpo", "grpo", "rloo"])
def test_gradient_checkpointing_is_off_unless_the_stage_turns_it_on(block, tmp_path):
    args = _args(block, tmp_path)
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    args = _args({**block, "gradient_checkpointing": True}, tmp_path)
    assert args.activation_checkpointing is True


def test_warmup_ratio_is_passed_as_a_fraction_below_one(tmp_path):
    args = _args(tiny_sft_block(optim={"warmup_ratio": 0.25, "max_steps": 8}), tmp_path)
    assert args.get_warmup_steps(8) == 2  # a fraction of the steps, never "one step"


@pytest.mark.parametrize("blocks,message", [
    ([PREFS, {**DPO, "label_smoothing": 0.1}], "label_smoothing has no effect with loss_type 'sigmoid'"),
    ([PREFS, {**DPO, "loss_type": "exo_pair"}], "'exo_pair' needs label_smoothing > 0"),
    ([tiny_sft_block(optim={"warmup_ratio": 0.1, "scheduler": "constant"})], "'constant' has none"),
    ([tiny_sft_block(optim={"warmup_ratio": 1.0})], "stages[0].optim.warmup_ratio: input should be less than 1"),
    ([tiny_sft_block(data={"train": "synthetic:sft", "eval_fraction": 0}, optim={"eval_steps": 5})],
     "optim.eval_steps: there is no eval split"),
    ([{**GRPO, "optim": {"eval_steps": 5, "batch_size": 4}}], "optim.eval_steps: GRPO and RLOO have no eval split"),
    ([{**GRPO, "eval_fraction": 0.3}], "eval_fraction has no effect without eval_rule"),
], ids=["dpo-smoothing", "exo-pair", "constant-warmup", "warmup-1", "sft-eval-steps", "grpo-eval-steps",
        "grpo-fraction"])
def test_settings_that_would_do_nothing_are_refused(blocks, message, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": blocks})
    assert main(["run", str(cfg), "--check"]) == 2
    assert message in capsys.readouterr().err


def test_sft_max_rows_takes_the_first_training_rows_in_file_order():
    from pipeline.stages.sft import hold_out

    rows = list(range(100))
    train, evals = hold_out(rows, 0.1, seed=0)
    assert len(evals) == 10 and sorted(train + evals) == rows
    assert train == sorted(train) and evals == sorted(evals)  # file order on both sides
    assert train[:5] == [r for r in rows if r not in evals][:5]


def test_grpo_reads_its_old_reward_keys_for_one_release_with_a_warning():
    with pytest.warns(FutureWarning, match="reward_model, rule and normalize_reward are deprecated"):
        st = _stages(PREFS, {"stage": "grpo", "policy": "tiny", "prompts": "synthetic:prompts",
                             "reward_model": "stage:preferences", "rule": "feedback.synthetic:rule_score",
                             "normalize_reward": False})[1]
    assert (st.reward.model, st.reward.rule, st.reward.normalize) == ("stage:preferences",
                                                                      "feedback.synthetic:rule_score", False)
