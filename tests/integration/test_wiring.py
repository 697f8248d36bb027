"""Every setting of every stage reaches what it is meant for: the TRL / transformers / peft config a trainer is built
with (and, for our PPO, the objects its loop runs with). Each stage is run through `rlhf run` up to the moment
training would start, with non-default values, and the trainer it built is read back. A table lists where each
field lands; every field of every stage config is either in it or listed, with its reason, as one that reaches no
such config (data paths, evaluation, saving), so a new setting cannot go unwired unnoticed."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel

from pipeline.config import load_pipeline
from pipeline.runner import run_pipeline
from pipeline.stages import REGISTRY
from tests.conftest import write_yaml


class Built(Exception):
    """Raised instead of training, carrying what the stage built (its trainer, or PPO's set-up)."""

    def __init__(self, value):
        super().__init__("built")
        self.value = value


def _build(tiny_run, tmp_path, monkeypatch, block: dict, at_fit=None):
    """Run one stage of a config over tiny_run's artifacts until training would start; return what it built (or
    what `at_fit(trainer)` reads at that moment: a stage may put things back once training stops)."""
    module = REGISTRY[block["stage"]]
    if block["stage"] == "ppo":
        def stop(cfg, ctx, s):
            raise Built(s)

        monkeypatch.setattr(module, "_loop", stop)
    else:
        def stop(trainer, ctx, cfg):
            raise Built(at_fit(trainer) if at_fit else trainer)

        from pipeline.stages import common

        # where the stage's fit is looked up: its own module, or common (DPO and KTO train through train_and_save)
        monkeypatch.setattr(module if hasattr(module, "fit") else common, "fit", stop)
    name = block["name"]
    path = write_yaml(tmp_path / f"{name}.yaml", {"run_dir": str(tiny_run), "seed": 0, "stages": [
        {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}},
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
        {"stage": "preferences", "name": "with_margins", "data": {"path": str(_pairs_with_margins(tmp_path))}},
        {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences"}, block]})
    if block.get("preferences") == "stage:with_margins":
        run_pipeline(load_pipeline(path), only=["with_margins"], echo=lambda *a, **k: None)
    with pytest.raises(Built) as built:
        run_pipeline(load_pipeline(path), only=[name], echo=lambda *a, **k: None)
    return built.value.value


def _pairs_with_margins(tmp_path):
    """The first 80 synthetic preference pairs, each with a margin (for reward's use_margin)."""
    import json

    from feedback import synthetic

    rows = [json.loads(line) for line in synthetic.path("preferences").read_text().splitlines()[:80]]
    out = tmp_path / "margins.jsonl"
    out.write_text("".join(json.dumps({**r, "margin": 1.0 + (i % 3)}) + "\n" for i, r in enumerate(rows)))
    return out


def _peft(trainer):
    return trainer.model.peft_config["default"]


def _lr_lambda(s):
    return s.strategy.schedulers["actor"].lr_lambdas[0]


# Where each field lands: {field: (value set, how to read it back from the trainer[, what that reads when it is not
# the value itself])}. The optimiser, schedule, batches, checkpoints and precision every TRL stage shares:
OPTIM = {
    "optim.lr": (1e-3, lambda t: t.args.learning_rate),
    "optim.weight_decay": (0.05, lambda t: t.args.weight_decay),
    "optim.warmup_ratio": (0.1, lambda t: t.args.warmup_steps),
    "optim.scheduler": ("cosine", lambda t: str(getattr(t.args.lr_scheduler_type, "value", t.args.lr_scheduler_type))),
    "optim.max_grad_norm": (0.5, lambda t: t.args.max_grad_norm),
    "optim.epochs": (3.0, lambda t: t.args.num_train_epochs),
    "optim.per_device_batch_size": (4, lambda t: (t.args.per_device_train_batch_size, t.args.per_device_eval_batch_size), (4, 4)),
    "optim.grad_accum": (2, lambda t: t.args.gradient_accumulation_steps),
    "optim.logging_steps": (3, lambda t: t.args.logging_steps),
    "optim.eval_steps": (5, lambda t: (str(getattr(t.args.eval_strategy, "value", t.args.eval_strategy)),
                                       t.args.eval_steps), ("steps", 5)),
    "optim.group_by_length": (True, lambda t: t.args.train_sampling_strategy, "group_by_length"),
    "checkpoint.every": (4, lambda t: (str(getattr(t.args.save_strategy, "value", t.args.save_strategy)),
                                       t.args.save_steps), ("steps", 4)),
    "checkpoint.keep": (3, lambda t: t.args.save_total_limit, 4),  # one spare: see common.training_args
    "precision": ("bf16", lambda t: (t.args.bf16, t.args.fp16), (True, False)),
    "gradient_checkpointing": (True, lambda t: t.args.activation_checkpointing),
}
LORA = {"tuning": ("lora", lambda t: type(_peft(t)).__name__, "LoraConfig"),
        "lora.r": (4, lambda t: _peft(t).r), "lora.alpha": (8, lambda t: _peft(t).lora_alpha),
        "lora.dropout": (0.1, lambda t: _peft(t).lora_dropout),
        "lora.target_modules": (["q_proj", "v_proj"], lambda t: sorted(_peft(t).target_modules))}
MAX_STEPS = {"optim.max_steps": (7, lambda t: t.args.max_steps)}

# What each stage adds, per variant: {stage: [(block overrides as dotted fields, {field: (value, read back)}, expect)]}
BASE = {"sft": {"model": "tiny", "data.train": "synthetic:sft"},
        "reward": {"model": "stage:sft", "preferences": "stage:preferences"},
        "dpo": {"policy": "stage:sft", "preferences": "stage:preferences"},
        "kto": {"policy": "stage:sft", "preferences": "stage:preferences"},
        "grpo": {"policy": "stage:sft", "prompts": "synthetic:prompts", "reward.rule": "feedback.synthetic:rule_score"},
        "rloo": {"policy": "stage:sft", "prompts": "synthetic:prompts", "reward.rule": "feedback.synthetic:rule_score"}}
ONLINE = {"num_generations": (2, lambda t: t.args.num_generations),
          "max_completion_length": (12, lambda t: t.args.max_completion_length),
          "temperature": (0.7, lambda t: t.args.temperature), "top_p": (0.9, lambda t: t.args.top_p),
          "beta": (0.1, lambda t: t.args.beta), "epsilon": (0.3, lambda t: t.args.epsilon),
          "epsilon_high": (0.28, lambda t: t.args.epsilon_high),
          "mask_truncated_completions": (True, lambda t: t.args.mask_truncated_completions)}
TRL_ONLY_GROUPS = {k: v for k, v in OPTIM.items() if k not in ("optim.eval_steps", "optim.group_by_length")}
VARIANTS = {
    "sft": [
        {**OPTIM, "max_length": (48, lambda t: t.args.max_length),
         "assistant_only_loss": (False, lambda t: t.args.assistant_only_loss)},
        {**LORA, **MAX_STEPS, "packing": (True, lambda t: t.args.packing)},
        {"tuning": ("freeze", lambda t: t.model.get_input_embeddings().weight.requires_grad, False),
         "freeze_layers": (1, lambda t: [all(not p.requires_grad for p in layer.parameters())
                                         for layer in t.model.model.layers][:2], [True, False])},
        {"tuning": ("prompt_tuning", lambda t: type(_peft(t)).__name__, "PromptTuningConfig"),
         "prompt_tuning.num_virtual_tokens": (4, lambda t: _peft(t).num_virtual_tokens),
         "prompt_tuning.init_text": ("Tell me", lambda t: _peft(t).prompt_tuning_init_text)},
    ],
    "reward": [
        {**OPTIM, "center_rewards_coefficient": (0.01, lambda t: t.args.center_rewards_coefficient),
         # our own encoding truncates (TRL's would drop long pairs silently): the rows TRL gets are that long at most
         "max_length": (24, lambda t: max(max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                                          for r in t.train_dataset) <= 24, True)},
        {**LORA, **MAX_STEPS, "use_margin": (True, lambda t: sorted(set(t.train_dataset["margin"])), [1.0, 2.0, 3.0]),
         "+block": {"preferences": "stage:with_margins"}},
    ],
    "dpo": [
        {**{k: v for k, v in OPTIM.items() if k != "optim.group_by_length"},
         "loss_type": ("robust", lambda t: list(t.args.loss_type), ["robust"]),
         "label_smoothing": (0.1, lambda t: t.args.label_smoothing), "beta": (0.2, lambda t: t.args.beta),
         "max_length": (48, lambda t: t.args.max_length)},
        {**LORA, **MAX_STEPS, "precompute_ref_log_probs": (True, lambda t: t.args.precompute_ref_log_probs)},
    ],
    "kto": [
        {**{k: v for k, v in OPTIM.items() if k != "optim.group_by_length"},
         "loss_type": ("apo_zero_unpaired", lambda t: t.args.loss_type), "beta": (0.2, lambda t: t.args.beta),
         "desirable_weight": (1.5, lambda t: t.args.desirable_weight),
         "undesirable_weight": (0.5, lambda t: t.args.undesirable_weight),
         "max_length": (48, lambda t: t.args.max_length)},
        # the weights left out balance the rows (a pairs artifact unpaired: as many desirable as undesirable)
        {**LORA, **MAX_STEPS, "precompute_ref_log_probs": (True, lambda t: t.args.precompute_ref_log_probs),
         "desirable_weight": (None, lambda t: (t.args.desirable_weight, t.args.undesirable_weight), (1.0, 1.0))},
    ],
    "grpo": [
        {**TRL_ONLY_GROUPS, **ONLINE, "loss_type": ("grpo", lambda t: t.args.loss_type),
         "scale_rewards": ("batch", lambda t: t.args.scale_rewards),
         "importance_sampling_level": ("sequence", lambda t: t.args.importance_sampling_level)},
        {**LORA, **MAX_STEPS},
    ],
    "rloo": [{**TRL_ONLY_GROUPS, **ONLINE}, {**LORA, **MAX_STEPS}],
}

# Fields that reach no TRL / transformers / peft config, and where they are used (and tested) instead.
NOT_TRAINER_CONFIG = {
    "stage": "picks the stage", "name": "the artifact's directory",
    "model": "the model loaded (test_stage_settings)", "policy": "the model loaded", "preferences": "the data read",
    "prompts": "the data read", "deepspeed": "the ZeRO config (tests/distributed, test_distributed)",
    "lora.merge": "how the adapter is saved (test_ppo_details: adapters merged)",
    "data.train": "SFT data read (test_sft)", "data.eval": "SFT data read", "data.eval_fraction": "SFT split",
    "data.format": "SFT rows read (test_sft_data)", "data.on_error": "SFT rows read", "data.max_rows": "SFT rows read",
    "data.split": "a dataset dict's split read (test_read_as_written)", "data.eval_split": "a dataset dict's split read",
    "prompts_split": "a dataset dict's split read (test_read_as_written)", "eval_prompts_split": "the split read",
    "eval_preferences": "the reward model's held-out pairs (test_rlaif)",
    "calibration_buckets": "the reward manifest's calibration table (test_reward)",
    "eval_initial": "the reward manifest's eval/accuracy_initial (test_reward; test_hh_recipe: the scorer skips it)",
    "eval_prompts": "prompts sampled before and after (test_stage_settings)", "eval_rule": "held-out rule reward",
    "eval_max_new_tokens": "held-out rule reward's samples", "eval_fraction": "held-out prompts",
    "reward.model": "reward functions (test_rlaif, test_policy)", "reward.rule": "reward functions",
    "reward.normalize": "reward functions (normalised scores)",
    "max_prompt_tokens": "prompts left out before sampling (test_policy: grpo/rloo, ppo skips prompts over it)",
}
# Settings a stage refuses (its validator says why): nothing to wire.
REFUSED = {"dpo": {"optim.group_by_length"}, "kto": {"optim.group_by_length"}, "grpo": {"optim.group_by_length", "optim.eval_steps"},
           "rloo": {"optim.group_by_length", "optim.eval_steps", "loss_type", "scale_rewards",
                    "importance_sampling_level"}}
PPO_NOT_SETUP = {
    "steps": "the loop's steps (test_policy)", "eval_rule": "held-out rule reward (test_policy)",
    "eval_fraction": "held-out prompts", "max_eval_prompts": "held-out prompts", "log_samples_every": "samples.jsonl",
    "rollout.max_new_tokens": "generate (test_ppo_details: rollout length and missing EOS penalty)",
    "rollout.missing_eos_penalty": "score_rollout (test_ppo_details: rollout length and missing EOS penalty)",
    "rollout.gather_zero3": "ZeRO-3 sampling (test_zero: critic-zero3-sharded)",
    "frozen.zero3": "ZeRO-3 placement (test_zero: critic-zero3-sharded)", "frozen.offload": "the same",
    "precision": "DeepSpeed only: one process trains in fp32 (docs/deepspeed.md, PPO under DeepSpeed)",
    "checkpoint.every": "the loop's checkpoints (test_resume: PPO keeps the newest)", "checkpoint.keep": "the same",
    "kl.ceiling": "stop at a KL ceiling (test_policy)",
    "kl.on_ceiling": "stop or warn at the ceiling", "lora.merge": "how the adapter is saved",
    "reward.model": "reward functions", "reward.rule": "reward functions", "reward.normalize": "reward functions",
    "stage": "picks the stage", "name": "the artifact's directory", "policy": "the model loaded",
    "prompts": "the data read", "prompts_split": "the split read (test_read_as_written)",
    "deepspeed": "the ZeRO config (tests/distributed)",
    "max_prompt_tokens": "prompts left out before sampling (test_policy: ppo skips prompts over it)",
}


def _fields(cls, prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _same(got, want) -> bool:
    if isinstance(want, float):
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9)
    return got == want


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "kto", "grpo", "rloo"])
def test_every_setting_reaches_the_trl_config(tiny_run, tmp_path, monkeypatch, stage):
    covered = set()
    for i, variant in enumerate(VARIANTS[stage]):
        variant = dict(variant)
        block = _nest({**BASE[stage], **{k: v[0] for k, v in variant.items() if k != "+block"},
                       **variant.pop("+block", {})})
        block.update(stage=stage, name=f"wired_{stage}_{i}")
        if "tuning" in variant and variant["tuning"][0] in ("lora", "prompt_tuning", "freeze"):
            block["precision"] = "fp32"
        trainer = _build(tiny_run, tmp_path, monkeypatch, block)
        for field, (value, read, *expected) in variant.items():
            got, want = read(trainer), (expected or [value])[0]
            assert _same(got, want), f"stages.{stage}.{field}: set to {value!r}, the trainer has {got!r}"
            covered.add(field)
    fields = set(_fields(REGISTRY[stage].Config))
    unlisted = fields - covered - set(NOT_TRAINER_CONFIG) - REFUSED.get(stage, set())
    assert not unlisted, f"{stage}: fields neither checked here nor listed as reaching no trainer config: {unlisted}"


PPO = {
    "optim.lr": (1e-4, lambda s, hp: s.strategy.schedulers["actor"].base_lrs[0]),
    "optim.weight_decay": (0.01, lambda s, hp: s.strategy.optimizers["actor"].param_groups[0]["weight_decay"]),
    "optim.scheduler": ("cosine", lambda s, hp: "cosine" if "cosine" in _lr_lambda(s).func.__name__ else "other"),
    "optim.warmup_ratio": (0.25, lambda s, hp: _lr_lambda(s).keywords["num_warmup_steps"]),
    "optim.max_grad_norm": (0.5, lambda s, hp: s.strategy.max_grad_norm),
    "rollout.prompts_per_step": (16, lambda s, hp: s.per_rank),
    "rollout.temperature": (0.7, lambda s, hp: s.models.temperature),
    "kl.coef": (0.1, lambda s, hp: s.kl_ctl.value), "kl.adaptive": (True, lambda s, hp: type(s.kl_ctl).__name__),
    "kl.target": (3.0, lambda s, hp: s.kl_ctl.target), "kl.horizon": (500, lambda s, hp: s.kl_ctl.horizon),
    "kl.estimator": ("k3", lambda s, hp: hp.kl_estimator),
    "value_model": ("critic", lambda s, hp: type(s.models.critic_module).__name__),
    "tuning": ("lora", lambda s, hp: type(s.models.policy.peft_config["default"]).__name__),
    "lora.r": (4, lambda s, hp: s.models.policy.peft_config["default"].r),
    "lora.alpha": (8, lambda s, hp: s.models.policy.peft_config["default"].lora_alpha),
    "lora.target_modules": (["q_proj", "v_proj"], lambda s, hp: sorted(s.models.policy.peft_config["default"].target_modules)),
    "gradient_checkpointing": (True, lambda s, hp: s.models.policy.get_base_model().is_gradient_checkpointing),
    **{f"ppo.{k}": (v, (lambda k: lambda s, hp: getattr(hp, k))(k)) for k, v in {
        "epochs": 2, "minibatch_size": 8, "micro_batch_size": 4, "forward_batch_size": 2, "clip": 0.3,
        "dual_clip": 3.0, "value_clip": 0.5, "vf_coef": 0.2, "entropy_coef": 0.01, "gamma": 0.99, "lam": 0.9,
        "whiten_advantages": False, "reward_clip": 5.0}.items()},
}
PPO_EXPECT = {"optim.warmup_ratio": 2, "kl.adaptive": "AdaptiveKLController", "value_model": "Critic",
              "tuning": "LoraConfig"}


def test_every_ppo_setting_reaches_its_loop(tiny_run, tmp_path, monkeypatch):
    """PPO is ours: its settings reach the optimizer and schedule (2 warm-up steps: 0.25 x 8 optimizer steps, for
    2 steps x 2 epochs x 2 minibatches of 8 of the 16 prompts), the KL controller, the models and the knobs
    ppo_step reads; the rest are read by the loop itself and tested there (PPO_NOT_SETUP)."""
    from pipeline.stages.ppo import _Hyper

    block = {"stage": "ppo", "name": "wired_ppo", "policy": "stage:sft", "prompts": "synthetic:prompts",
             "reward": {"model": "stage:reward"}, "steps": 2, **_nest({k: v[0] for k, v in PPO.items()})}
    s = _build(tiny_run, tmp_path, monkeypatch, block)
    cfg = load_pipeline(tmp_path / "wired_ppo.yaml").stage("wired_ppo")
    hp = _Hyper(cfg)
    for field, (value, read) in PPO.items():
        got, want = read(s, hp), PPO_EXPECT.get(field, value)
        assert _same(got, want), f"stages.ppo.{field}: set to {value!r}, PPO runs with {got!r}"
    unlisted = set(_fields(REGISTRY["ppo"].Config)) - set(PPO) - set(PPO_NOT_SETUP) - {"lora.dropout"}
    assert not unlisted, f"ppo: fields neither checked here nor listed as read by the loop: {unlisted}"


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_group_methods_sample_from_a_neutral_config_with_dropout_off(tiny_run, tmp_path, monkeypatch, stage):
    """A policy whose generation_config.json sets min_p, no_repeat_ngram_size, min_new_tokens and suppress_tokens
    (which transformers would fill into TRL's sampling, while TRL's log-probs apply the temperature only), and whose
    config.json has attention_dropout 0.1 (a rate TRL's disable_dropout does not reach): GRPO and RLOO train with a
    generation config holding only its eos, pad and bos tokens and with every dropout off, so the first step's KL
    to the reference is 0; the saved policy keeps its own generation config and dropout rate."""
    import json
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(tiny_run / "sft" / "model", policy)
    own = {"min_p": 0.5, "no_repeat_ngram_size": 3, "min_new_tokens": 4, "suppress_tokens": [5]}
    gen = json.loads((policy / "generation_config.json").read_text()) if (policy / "generation_config.json").exists() \
        else {}
    (policy / "generation_config.json").write_text(json.dumps({**gen, **own}))
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    block = {"stage": stage, "name": f"neutral_{stage}", "policy": str(policy), "prompts": "synthetic:prompts",
             "reward": {"rule": "feedback.synthetic:rule_score"}, "num_generations": 2, "max_completion_length": 8,
             "beta": 0.1, "precision": "fp32", "optim": {"max_steps": 1, "per_device_batch_size": 2, "logging_steps": 1}}
    import copy

    trainer, during, rates = _build(tiny_run, tmp_path, monkeypatch, block, at_fit=lambda t: (
        t, copy.deepcopy(t.model.generation_config),
        {layer.self_attn.attention_dropout for layer in t.model.model.layers} | {t.model.config.attention_dropout}))
    assert trainer.args.disable_dropout is True
    assert rates == {0.0}
    assert all(getattr(during, k) in (None, 0, []) for k in own), {k: getattr(during, k) for k in own}
    assert during.eos_token_id is not None and during.pad_token_id is not None
    monkeypatch.undo()
    path = tmp_path / f"neutral_{stage}.yaml"
    run_pipeline(load_pipeline(path), only=[f"neutral_{stage}"], echo=lambda *a, **k: None)
    saved = json.loads((tiny_run / f"neutral_{stage}" / "model" / "generation_config.json").read_text())
    assert {k: saved.get(k) for k in own} == own
    assert json.loads((tiny_run / f"neutral_{stage}" / "model" / "config.json").read_text())["attention_dropout"] == 0.1
    kl = [json.loads(line) for line in (tiny_run / f"neutral_{stage}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/kl"] for r in kl if "train/kl" in r][0] == pytest.approx(0.0, abs=1e-6)
