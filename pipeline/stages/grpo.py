"""GRPO and RLOO stages on TRL's GRPOTrainer and RLOOTrainer, rewarded by a reward-model artifact,
a rule, or both (summed).

    rlhf run configs/tiny-grpo.yaml --stage grpo
    rlhf run configs/tiny-grpo.yaml --stage rloo

Both sample `num_generations` completions per prompt and use the group's rewards as the
baseline (GRPO: group-normalised advantages; RLOO: leave-one-out). The reward model may use
another tokenizer: completions are scored as text through reward.scoring.

The choices TRL's GRPO loss offers are typed settings here, checked against the installed TRL
before the first stage starts: `loss_type` (how token losses are averaged: grpo, dr_grpo, dapo,
bnpo, cispo, sapo, ... whatever the installed TRL implements), `scale_rewards`, `epsilon` and
`epsilon_high` (clip-higher), `importance_sampling_level` (token, or sequence: GSPO) and
`mask_truncated_completions`; docs/grpo.md ("The loss choices") says what each is for.
As in our PPO, every stochastic layer (dropout rates, layerdrop) is off in the policy, checked by
two training-mode forwards at start-up, and sampling reads nothing from the model's
generation_config.json but its eos, pad and bos tokens; the saved policy keeps its own config.

    RUN_DIR/grpo/ (or rloo/)
      manifest.json    # kind: policy; train/reward, eval/rule_reward_mean before and after with eval_rule
      model/           # safetensors + tokenizer
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from pipeline.blocks import OnlineRLBlock, OptimConfig
from rlhf.errors import UsageError
from pipeline.stages.common import (RuleReward, final_model, fit, held_out_named, load_policy, memory_metrics,
                                    peft_config, perf_metrics, prompts_within, save_policy, training_args,
                                    weights_dtype)
from pipeline.data import neutralised, read_prompts, resolve_data_path, split_by_prompt
from pipeline.distributed import say
from pipeline.models import count_parameters, resolve_precision
from pipeline.tracking import readable_progress, trainer_callback


class GroupRLOptimConfig(OptimConfig):
    lr: float = Field(1e-6, gt=0, description="peak learning rate (GRPO's and RLOO's own default)")


# settings only TRL's GRPO loss has (RLOOTrainer has no such choice)
GRPO_ONLY = ("loss_type", "scale_rewards", "importance_sampling_level")


class GroupRLStageConfig(OnlineRLBlock):
    stage: Literal["grpo", "rloo"] = Field(description="the method: GRPO or RLOO (TRL's GRPOTrainer, RLOOTrainer)")
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt (the group the baseline is "
                                 "taken over)")
    max_completion_length: int = Field(32, ge=1, description="longest completion, in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the completions (1: off)")
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference (0: no reference model)")
    eval_fraction: float | None = Field(None, ge=0, lt=1, description="share of prompts held out (not trained on): "
                                        "default 0.2 with eval_rule, none without; a value written is always "
                                        "held out, so that a later evaluate stage scores unseen prompts")
    loss_type: str = Field("dapo", description="GRPO: how token losses are averaged (checked against the installed "
                           "TRL): grpo (per sequence, DeepSeekMath), dr_grpo (a constant, Dr. GRPO), dapo (tokens of "
                           "the whole accumulated batch, DAPO), bnpo (tokens of the local batch), cispo, sapo, ...")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="GRPO: divide advantages by the "
                                                              "reward std of each group, of the batch, or not at all "
                                                              "(Dr. GRPO)")
    epsilon: float = Field(0.2, gt=0, description="clip range of the importance ratio (lower bound 1 - epsilon)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip bound 1 + epsilon_high (DAPO's "
                                       "clip-higher, e.g. 0.28); default: epsilon")
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description="GRPO: one importance "
                                                                    "ratio per token, or per sequence (GSPO)")
    mask_truncated_completions: bool = Field(False, description="leave completions cut at max_completion_length "
                                             "out of the loss (DAPO's overlong filtering)")
    optim: GroupRLOptimConfig = Field(default_factory=GroupRLOptimConfig, description="optimiser, schedule and "
                                      "batches (lr 1e-6 by default); per_device_batch_size x grad_accum x processes a "
                                      "multiple of num_generations")

    @model_validator(mode="before")
    @classmethod
    def _old_reward_keys(cls, data):
        """The keys GRPO/RLOO used before `reward:` (PPO's name for the same block): still read, for one release."""
        old = {"reward_model": "model", "rule": "rule", "normalize_reward": "normalize"}
        if isinstance(data, dict) and set(old) & set(data):
            import warnings

            data = dict(data)
            block = dict(data.get("reward") or {})
            for key, new in old.items():
                if key in data:
                    block[new] = data.pop(key)
            data["reward"] = block
            warnings.warn("grpo/rloo: reward_model, rule and normalize_reward are deprecated and will be removed in "
                          "the next release; write `reward: {model: ..., rule: ..., normalize: ...}` as PPO does",
                          FutureWarning, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.eval_rule and self.eval_fraction == 0:
            raise ValueError("eval_rule has no effect with eval_fraction: 0 (no held-out prompts to sample)")
        if self.optim.eval_steps is not None:
            raise ValueError("optim.eval_steps: GRPO and RLOO have no eval split to evaluate on (held-out prompts "
                             "are sampled before and after training with eval_rule)")
        self.refuse_unused(GRPO_ONLY, self.stage == "grpo", "in RLOO (TRL's RLOO loss has no such choice)")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("loss_type 'luspo' is a sequence-level loss: set importance_sampling_level: sequence")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type 'vespo' weighs whole sequences itself: leave importance_sampling_level at token")
        return self

    def memory(self, procs: int, prompt_tokens: int) -> dict:
        # sampling completions of max_completion_length after the prompt; a reference with beta > 0 (full tuning) and
        # a reward model, whole
        frozen = int(self.beta > 0 and self.tuning != "lora") + int(bool(self.reward.model))
        longest = min(prompt_tokens, self.max_prompt_tokens or prompt_tokens)
        return {"batch": self.optim.per_device_batch_size, "seq": longest + self.max_completion_length,
                "generate": self.max_completion_length, "gen_batch": self.optim.per_device_batch_size,
                "frozen_models": frozen}

    def preflight(self, world: int, zero: dict | None = None) -> None:
        """TRL samples num_generations completions of each prompt within one generation batch, which is
        batch_size x grad_accum completions on each of the processes: their total must hold whole groups. And the
        loss type must be one the installed TRL implements."""
        total = self.optim.per_device_batch_size * self.optim.grad_accum * world
        if total % self.num_generations:
            raise UsageError(f"stages.{self.name}.optim.per_device_batch_size: per_device_batch_size x grad_accum x "
                             f"processes ({self.optim.per_device_batch_size} x {self.optim.grad_accum} x {world} = "
                             f"{total}) must be a "
                             f"multiple of num_generations ({self.num_generations}): TRL samples whole groups")
        if self.stage == "grpo":
            from trl import GRPOConfig

            from pipeline.stages.common import trl_choices

            offered = trl_choices(GRPOConfig, "loss_type")
            if self.loss_type not in offered:
                raise UsageError(f"stages.{self.name}.loss_type: {self.loss_type!r} is not a GRPO loss of the installed "
                                 f"TRL; expected one of {list(offered)}")


    @property
    def held_out(self) -> float:
        """The share of prompts held out: as written, else 0.2 for eval_rule to sample, else none."""
        return self.eval_fraction if self.eval_fraction is not None else 0.2 if self.eval_rule else 0.0


Config = GroupRLStageConfig  # the registry's handle (pipeline/stages/__init__.py)


def _text(completion) -> str:
    # conversational completions arrive as [{"role": "assistant", "content": ...}]
    return completion if isinstance(completion, str) else "".join(m.get("content", "") for m in completion)


def _prompt(prompt):
    # drop the chat roles TRL adds back: our scorers take a user string or a message list
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return prompt


def reward_functions(cfg: GroupRLStageConfig, reward_path: str | None, trust_remote_code: bool = False) -> list:
    """TRL reward callables: f(prompts, completions, **kw) -> list[float] (TRL sums them)."""
    funcs = []
    if reward_path:
        from reward.scoring import RewardScorer

        scorer = RewardScorer.from_artifact(reward_path, trust_remote_code=trust_remote_code)

        def reward_model(prompts, completions, **kw):
            raw, norm = scorer.score([_prompt(p) for p in prompts], [_text(c) for c in completions])
            return norm if cfg.reward.normalize else raw

        funcs.append(reward_model)
    if cfg.reward.rule:
        from feedback.judges.rule import load_callable

        rule = load_callable(cfg.reward.rule)

        def rule_reward(prompts, completions, **kw):
            return [float(rule(_prompt(p), _text(c))) for p, c in zip(prompts, completions)]

        funcs.append(rule_reward)
    return funcs


def trl_config(config_cls, cfg: GroupRLStageConfig, ctx, precision: str, info: dict):
    """The TRL GRPOConfig / RLOOConfig of a stage: the shared training arguments, sampling, the loss choices, dropout
    off (as in our PPO: the KL to the reference and the importance ratio carry no dropout noise)."""
    revision = info.get("revision")
    loss = {k: getattr(cfg, k) for k in ("epsilon", "epsilon_high", "mask_truncated_completions")}
    if cfg.stage == "grpo":
        loss.update({k: getattr(cfg, k) for k in GRPO_ONLY})
    return training_args(config_cls, cfg, ctx, precision, num_generations=cfg.num_generations,
                         max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                         top_p=cfg.top_p, beta=cfg.beta, use_vllm=False, disable_dropout=True, **loss,
                         # TRL rebuilds the reference (beta > 0, full tuning) from the policy's path with these
                         trust_remote_code=info.get("trust_remote_code", False),
                         **({"model_init_kwargs": {"revision": revision}} if revision else {}))


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def neutral_generation_config(model):
    """Give `model` a generation config holding only its eos, pad and bos tokens; returns the one it had."""
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig(**{k: getattr(own, k) for k in ("eos_token_id", "pad_token_id",
                                                                               "bos_token_id")})
    return own


def run(cfg: GroupRLStageConfig, ctx) -> dict:
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from pipeline.rl.models import disable_dropout, refuse_random_forwards  # deferred: it imports torch

    set_seed(ctx.seed)
    precision = resolve_precision(cfg.precision)
    _, info, tok, model = load_policy(ctx, cfg.policy)
    prompts, skipped = prompts_within(cfg, ctx, read_prompts(resolve_data_path(cfg.prompts), split=cfg.prompts_split),
                                      tok)
    # prompts are held out when eval_fraction is written or eval_rule samples them; otherwise all are trained on
    train_prompts, eval_prompts = split_by_prompt(prompts, cfg.held_out, ctx.seed, prompt_of=lambda p: p)
    # TRL applies the chat template to these: special tokens in a prompt file stay text
    train = [neutralised(tok, {"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p})
             for p in train_prompts]
    reward_art = ctx.artifact(cfg.reward.model, "reward_model", "reward.model") if cfg.reward.model else None
    funcs = reward_functions(cfg, str(reward_art.path) if reward_art else None,
                             bool(cfg.reward.model) and ctx.trusts_remote_code(cfg.reward.model))
    rule = RuleReward(cfg.eval_rule, eval_prompts, cfg.max_completion_length, ctx.seed,
                      held_out_named(len(eval_prompts), cfg.held_out, cfg.prompts))
    metrics: dict = {}
    rule.before(model, tok, metrics)
    ConfigCls, TrainerCls = (GRPOConfig, GRPOTrainer) if cfg.stage == "grpo" else (RLOOConfig, RLOOTrainer)
    args = trl_config(ConfigCls, cfg, ctx, precision, info)
    # As in our PPO, nothing random in the policy's forwards: TRL's disable_dropout zeroes dropout modules only, not
    # the rates attention layers read (Llama's attention_dropout) or layerdrop, which would put noise into the
    # importance ratio and the KL. And sampling reads nothing from the model's generation_config.json but its
    # special tokens: transformers fills every setting TRL leaves unset (min_p, no_repeat_ngram_size,
    # suppress_tokens, ...) from it, while TRL's log-probs apply the temperature only. Both are the model's own
    # again before it is saved, whatever happens in between.
    restore_rates = disable_dropout(model)
    own_generation_config = neutral_generation_config(model)
    try:
        trainer = TrainerCls(model=model, reward_funcs=funcs if len(funcs) > 1 else funcs[0], args=args,
                             train_dataset=Dataset.from_list(train), processing_class=tok,
                             peft_config=peft_config(cfg.lora) if cfg.tuning == "lora" else None,
                             callbacks=[trainer_callback(ctx.metrics)])
        readable_progress(trainer, ctx.name)
        ids = torch.tensor([tok("Tell me about the river and the old stone bridge.")["input_ids"][:16]])
        ids = ids.to(next(trainer.model.parameters()).device)
        refuse_random_forwards(lambda: [trainer.model(input_ids=ids).logits], [trainer.model], "the policy")
        total, trainable = count_parameters(trainer.model)
        say(f"[{ctx.name}] {cfg.stage.upper()}: {len(train)} train / {len(eval_prompts)} held-out prompts, "
            f"{cfg.num_generations} generations each; {trainable:,} of {total:,} parameters trainable")
        t0 = time.time()
        metrics.update(perf_metrics(fit(trainer, ctx, cfg)))
        seconds = time.time() - t0
    finally:
        restore_rates()
        _base_model(model).generation_config = own_generation_config
    model_out = final_model(trainer, cfg.lora.merge)
    rule.after(ctx, trainer, model_out, tok, metrics)
    ctx.metrics.log(metrics, step=trainer.state.global_step)
    is_adapter = save_policy(trainer, model_out, tok, ctx.work_dir / "model", merge=cfg.lora.merge,
                             trust_remote_code=info.get("trust_remote_code", False), revision=info.get("revision"))
    steps = trainer.state.global_step
    summary = f"{steps} steps in {seconds:.1f}s{rule.summary(metrics)}; artifact: {ctx.run_dir / ctx.name / 'model'}"
    outputs = {"model": "model", "metrics": "metrics.jsonl", **({"skipped": "skipped.jsonl"} if skipped else {})}
    return {"kind": "policy", "outputs": outputs,
            "metrics": {**metrics, "train/steps": steps, "train/seconds": round(seconds, 2), **memory_metrics()},
            "counts": {"train_prompts": len(train), "eval_prompts": len(eval_prompts), "skipped_prompts": skipped},
            "extra": {"model": {**info, "tuning": cfg.tuning, "adapter": is_adapter, "parameters": total,
                                "trainable": trainable, "precision": precision, "weights_dtype": weights_dtype(model),
                                "method": cfg.stage}},
            "summary": summary}
