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
    assert _stages(PREFS, {**DPO, "optim": {"per_device_batch_size": 4}})[1].optim.lr == 5e-7
    assert _stages(PREFS, DPO, overrides=["stages.dpo.optim.per_device_batch_size=4"])[1].optim.lr == 5e-7
    # the GRPO example of docs/grpo.md
    grpo = _stages({**GRPO, "optim": {"per_device_batch_size": 16, "max_steps": 24, "logging_steps": 2}})[0]
    assert grpo.optim.lr == 1e-6 and grpo.optim.per_device_batch_size == 16
    assert _stages({**PPO, "optim": {"max_grad_norm": 0.5}})[0].optim.lr == 1e-5
    assert _stages({**GRPO, "stage": "rloo", "optim": {"per_device_batch_size": 8}})[0].optim.lr == 1e-6
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": "runs/x", "stages": [PREFS, {**DPO, "optim": {"per_device_batch_size": 4}}]})
    assert main(["run", str(cfg), "--check"]) == 0
    assert "stages.dpo.optim: lr 5e-07 (shared default 2e-05), per_device_batch_size 4 (shared default 8)" in capsys.readouterr().out


def _args(block, tmp_path):
    """The TRL config a stage would build (common.training_args), without training."""
    from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

    from pipeline.stages.common import training_args

    st = _stages(PREFS, block)[-1]
    ctx = SimpleNamespace(work_dir=tmp_path, seed=0, name=st.name, pipeline=SimpleNamespace(tracking=TrackingConfig()))
    cls = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}[st.stage]
    extra = {"num_generations": 4} if st.stage in ("grpo", "rloo") else {}
    return training_args(cls, st, ctx, "fp32", **extra)


@pytest.mark.parametrize("block", [tiny_sft_block(), REWARD, DPO, {**GRPO, "optim": {"per_device_batch_size": 4}},
                                   {**GRPO, "stage": "rloo", "optim": {"per_device_batch_size": 4}}],
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
    ([tiny_sft_block(optim={"warmup_ratio": 1.0})], "stages.sft.optim.warmup_ratio: input should be less than 1"),
    ([tiny_sft_block(data={"train": "synthetic:sft", "eval_fraction": 0}, optim={"eval_steps": 5})],
     "optim.eval_steps: there is no eval split"),
    ([{**GRPO, "optim": {"eval_steps": 5, "per_device_batch_size": 4}}], "optim.eval_steps: GRPO and RLOO have no eval split"),
    # issue 20, item 6: settings that did nothing and passed --check
    ([tiny_sft_block(lora={"r": 16})], "lora has no effect with tuning: full (set tuning: lora)"),
    ([tiny_sft_block(tuning="prompt_tuning", lora={"r": 8})], "lora has no effect with tuning: prompt_tuning"),
    ([PREFS, {**DPO, "lora": {"merge": False}}], "lora has no effect with tuning: full"),
    ([tiny_sft_block(optim={"epochs": 1, "max_steps": 5})], "epochs has no effect with max_steps > 0"),
    ([{**PPO, "eval_fraction": 0, "eval_rule": "feedback.synthetic:rule_score"}],
     "eval_rule has no effect with eval_fraction: 0"),
    ([{**PPO, "eval_fraction": 0, "max_eval_prompts": 8}], "max_eval_prompts has no effect with eval_fraction: 0"),
    ([{**PPO, "frozen": {"offload": False}}], "frozen.offload has no effect without DeepSpeed"),
    ([{**PPO, "rollout": {"gather_zero3": True}}], "rollout.gather_zero3 has no effect without DeepSpeed"),
    ([{**PPO, "reward": {"rule": "feedback.synthetic:rule_score", "normalize": True}}],
     "normalize has no effect without a reward model"),
    ([tiny_sft_block(checkpoint={"keep": 3})], "keep has no effect without checkpoint.every"),
    ([tiny_sft_block(packing=True, optim={"group_by_length": True})],
     "optim.group_by_length has no effect with packing"),
    ([{"stage": "evaluate", "policies": {"a": "tiny", "b": "tiny"}, "prompts": "synthetic:prompts",
       "sampling": {"temperature": 0, "top_p": 0.9}}], "top_p has no effect at temperature 0"),
    ([{"stage": "ai_preferences", "policy": "tiny", "prompts": "synthetic:prompts", "judge": "configs/judges/rule.yaml",
       "candidates": {"k": 4, "temperature": 0}}], "candidates.temperature: 0 is greedy decoding"),
], ids=["dpo-smoothing", "exo-pair", "constant-warmup", "warmup-1", "sft-eval-steps", "grpo-eval-steps",
        "lora-keys", "lora-with-prompt-tuning", "lora-merge-full", "epochs-and-max-steps", "ppo-eval-rule",
        "ppo-max-eval-prompts", "ppo-frozen", "ppo-gather-zero3", "rule-normalize", "checkpoint-keep",
        "packing-group-by-length", "evaluate-greedy-top-p", "ai-candidates-greedy"])
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


def test_ppo_deepspeed_settings_are_accepted_with_deepspeed_from_the_config_or_the_command_line(tmp_path, capsys):
    """frozen.* and rollout.gather_zero3 place models under ZeRO-3: refused alone, accepted once the stage has a
    DeepSpeed config, written in it or given with rlhf run --deepspeed (applied before the checks)."""
    block = {**PPO, "frozen": {"zero3": True, "offload": True}, "rollout": {"gather_zero3": False}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": [block]})
    assert main(["run", str(cfg), "--check"]) == 2
    assert "frozen.zero3, frozen.offload, rollout.gather_zero3 have no effect without DeepSpeed" in capsys.readouterr().err
    assert main(["run", str(cfg), "--check", "--deepspeed", "configs/deepspeed/zero3.json"]) == 0
    cfg = write_yaml(tmp_path / "q.yaml", {"run_dir": str(tmp_path / "run"), "stages": [
        {**block, "deepspeed": "configs/deepspeed/zero3.json"}]})
    assert main(["run", str(cfg), "--check"]) == 0


def test_grpo_holds_out_prompts_whenever_eval_fraction_is_written():
    """An explicit eval_fraction (even the default's 0.2) holds prompts out without eval_rule too, so that a later
    evaluate stage scores prompts GRPO never trained on; unwritten, nothing is held out unless eval_rule samples."""
    from pipeline.blocks import config_hash

    written = _stages({**GRPO, "eval_fraction": 0.2, "optim": {"per_device_batch_size": 4}})[0]
    unwritten = _stages({**GRPO, "optim": {"per_device_batch_size": 4}})[0]
    with_rule = _stages({**GRPO, "eval_rule": "feedback.synthetic:rule_score", "optim": {"per_device_batch_size": 4}})[0]
    assert (written.held_out, unwritten.held_out, with_rule.held_out) == (0.2, 0.0, 0.2)
    assert _stages({**GRPO, "stage": "rloo", "eval_fraction": 0.3})[0].held_out == 0.3
    assert config_hash(written) != config_hash(unwritten)  # writing it reruns the stage


def test_optim_batch_size_is_per_device_batch_size_with_the_old_name_read_for_one_release(tmp_path):
    """TRL stages' batch is per device (PPO's prompts_per_step and minibatch_size are totals over all processes): the
    key says so. The old name is still read, with a deprecation warning; giving both is an error."""
    args = _args(tiny_sft_block(optim={"per_device_batch_size": 4}), tmp_path)
    assert args.per_device_train_batch_size == 4
    with pytest.warns(FutureWarning, match="optim.batch_size is deprecated"):
        st = _stages(PREFS, {**DPO, "optim": {"batch_size": 4}})[1]
    assert st.optim.per_device_batch_size == 4
    with pytest.raises(Exception, match="batch_size is the old name of per_device_batch_size"):
        _stages(PREFS, {**DPO, "optim": {"batch_size": 4, "per_device_batch_size": 4}})


def test_checkpoint_every_is_documented_in_the_unit_each_stage_counts():
    """PPO's checkpoint.every counts PPO steps (each a rollout and its updates), the TRL stages' optimizer steps: each
    stage's own config says which, so the config reference and --help cannot claim optimizer steps for PPO."""
    from pipeline.stages.ppo import PPOStageConfig
    from pipeline.stages.sft import SFTStageConfig

    ppo = PPOStageConfig.model_fields["checkpoint"].annotation.model_fields["every"].description
    sft = SFTStageConfig.model_fields["checkpoint"].annotation.model_fields["every"].description
    assert "PPO steps" in ppo and "optimizer" not in ppo
    assert "optimizer steps in the TRL-based stages" in sft


def test_epochs_null_unsets_it_so_that_a_config_with_epochs_can_be_capped_by_max_steps():
    st = _stages(tiny_sft_block(), overrides=["stages.sft.optim.max_steps=5", "stages.sft.optim.epochs=null"])[0]
    assert (st.optim.max_steps, st.optim.epochs) == (5, None)
    with pytest.raises(Exception, match="epochs has no effect with max_steps > 0"):
        _stages(tiny_sft_block(), overrides=["stages.sft.optim.max_steps=5"])
