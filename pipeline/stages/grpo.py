"""GRPO and RLOO stages on TRL's GRPOTrainer and RLOOTrainer, rewarded by a reward-model artifact,
a rule, or both (summed).

    rlhf run configs/tiny-grpo.yaml --stage grpo
    rlhf run configs/tiny-grpo.yaml --stage rloo

Both sample `num_generations` completions per prompt and use the group's rewards as the
baseline (GRPO: group-normalised advantages; RLOO: leave-one-out). The reward model may use
another tokenizer: completions are scored as text through reward.scoring.

    RUN_DIR/grpo/ (or rloo/)
      manifest.json    # kind: policy; train/reward, eval/rule_reward_mean before and after with eval_rule
      model/           # safetensors + tokenizer
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from pipeline.blocks import OnlineRLBlock, OptimConfig
from pipeline.stages.common import (RuleReward, check_finite, final_model, fit, load_policy, memory_metrics,
                                    peft_config, save_policy, training_args, weights_dtype)


class GroupRLOptimConfig(OptimConfig):
    lr: float = Field(1e-6, gt=0)


class GroupRLStageConfig(OnlineRLBlock):
    stage: Literal["grpo", "rloo"]
    num_generations: int = Field(4, ge=2)
    max_completion_length: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference (0: no reference model)")
    eval_fraction: float | None = Field(None, ge=0, lt=1, description="share of prompts held out (not trained on): "
                                        "default 0.2 with eval_rule, none without; a value written is always "
                                        "held out, so that a later evaluate stage scores unseen prompts")
    optim: GroupRLOptimConfig = Field(default_factory=GroupRLOptimConfig)

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
        if (self.optim.per_device_batch_size * self.optim.grad_accum) % self.num_generations:
            raise ValueError(f"optim.per_device_batch_size: per_device_batch_size x grad_accum must be a multiple of "
                             f"num_generations "
                             f"({self.num_generations})")
        return self


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


def reward_functions(cfg: GroupRLStageConfig, reward_path: str | None) -> list:
    """TRL reward callables: f(prompts, completions, **kw) -> list[float] (TRL sums them)."""
    funcs = []
    if reward_path:
        from reward.scoring import RewardScorer

        scorer = RewardScorer.from_artifact(reward_path)

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


def run(cfg: GroupRLStageConfig, ctx) -> dict:
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from pipeline.data import read_prompts, resolve_data_path, split_by_prompt
    from pipeline.distributed import say
    from pipeline.models import count_parameters, resolve_precision
    from pipeline.tracking import trainer_callback

    set_seed(ctx.seed)
    prompts = read_prompts(resolve_data_path(cfg.prompts), split=cfg.prompts_split)
    # prompts are held out when eval_fraction is written or eval_rule samples them; otherwise all are trained on
    train_prompts, eval_prompts = split_by_prompt(prompts, cfg.held_out, ctx.seed, prompt_of=lambda p: p)
    train = [{"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p} for p in train_prompts]
    precision = resolve_precision(cfg.precision)
    _, info, tok, model = load_policy(ctx, cfg.policy)
    reward_art = ctx.artifact(cfg.reward.model, "reward_model", "reward.model") if cfg.reward.model else None
    funcs = reward_functions(cfg, str(reward_art.path) if reward_art else None)
    rule = RuleReward(cfg.eval_rule, eval_prompts, cfg.max_completion_length, ctx.seed)
    metrics: dict = {}
    rule.before(model, tok, metrics)
    ConfigCls, TrainerCls = (GRPOConfig, GRPOTrainer) if cfg.stage == "grpo" else (RLOOConfig, RLOOTrainer)
    revision = info.get("revision")
    args = training_args(ConfigCls, cfg, ctx, precision, num_generations=cfg.num_generations,
                         max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                         top_p=cfg.top_p, beta=cfg.beta, use_vllm=False,
                         # TRL rebuilds the reference (beta > 0, full tuning) from the policy's path with these
                         trust_remote_code=info.get("trust_remote_code", False),
                         **({"model_init_kwargs": {"revision": revision}} if revision else {}))
    trainer = TrainerCls(model=model, reward_funcs=funcs if len(funcs) > 1 else funcs[0], args=args,
                         train_dataset=Dataset.from_list(train), processing_class=tok,
                         peft_config=peft_config(cfg.lora) if cfg.tuning == "lora" else None,
                         callbacks=[trainer_callback(ctx.metrics)])
    total, trainable = count_parameters(trainer.model)
    say(f"[{ctx.name}] {cfg.stage.upper()}: {len(train)} train / {len(eval_prompts)} held-out prompts, "
        f"{cfg.num_generations} generations each; {trainable:,} of {total:,} parameters trainable")
    t0 = time.time()
    result = fit(trainer, ctx, cfg)
    seconds = time.time() - t0
    check_finite(ctx, {"train/loss": result.training_loss})
    model_out = final_model(trainer, cfg.lora.merge)
    rule.after(ctx, trainer, model_out, tok, metrics)
    ctx.metrics.log(metrics, step=trainer.state.global_step)
    is_adapter = save_policy(trainer, model_out, tok, ctx.work_dir / "model", merge=cfg.lora.merge,
                             revision=info.get("revision"))
    steps = trainer.state.global_step
    summary = f"{steps} steps in {seconds:.1f}s{rule.summary(metrics)}; artifact: {ctx.run_dir / ctx.name / 'model'}"
    return {"kind": "policy", "outputs": {"model": "model", "metrics": "metrics.jsonl"},
            "metrics": {**metrics, "train/steps": steps, "train/seconds": round(seconds, 2), **memory_metrics()},
            "counts": {"train_prompts": len(train), "eval_prompts": len(eval_prompts)},
            "extra": {"model": {**info, "tuning": cfg.tuning, "adapter": is_adapter, "parameters": total,
                                "trainable": trainable, "precision": precision, "weights_dtype": weights_dtype(model),
                                "method": cfg.stage}},
            "summary": summary}
