"""PPO stage: our own PPO against a reward model or a rule (pipeline/rl/).

    rlhf run configs/tiny.yaml --stage ppo

Each step samples `rollout.prompts_per_step` training prompts, generates responses, scores
them, and runs `ppo.epochs` epochs of clipped updates over minibatches. Held-out prompts are
evaluated before and after training (`eval/reward_mean`, `eval/rule_reward_mean` with
`eval_rule`, `eval/kl`). Metrics per step: ppo/reward_mean, ppo/reward_std, ppo/kl, ppo/entropy,
ppo/clipfrac, ppo/approx_kl, ppo/value_loss, ppo/policy_loss, ppo/explained_variance,
ppo/response_length, ppo/eos_rate, ppo/ratio_mean, ppo/kl_coef; samples in samples.jsonl.

    RUN_DIR/ppo/
      manifest.json    # kind: policy; eval before/after; final PPO state (KL coefficient)
      model/           # safetensors + tokenizer (LoRA merged, or an adapter with lora.merge: false)
      value_head.safetensors | critic/
      metrics.jsonl, samples.jsonl
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from pydantic import Field, model_validator

from pipeline import checkpoint, distributed
from pipeline.blocks import CheckpointConfig, OnlineRLBlock, ScheduleConfig, Strict
from rlhf.errors import InvalidInput, UsageError
from feedback.judges.rule import load_callable
from pipeline.data import read_prompts, resolve_data_path, split_by_prompt
from pipeline.distributed import say
from pipeline.mfu import FlopCounter
from pipeline.models import count_parameters, hidden_size, load_causal_lm, load_tokenizer, resolve_precision
from pipeline.stages.common import (held_out_named, logits_fingerprint, memory_metrics, peak_memory, peft_config,
                                    prompts_within, save_model)
from pipeline.tracking import wandb_run
from reward.scoring import load_reward_model

if TYPE_CHECKING:  # annotations only: the registry imports every stage module to read configs, without torch
    from transformers import PreTrainedTokenizerBase

    from pipeline.artifacts import Artifact
    from pipeline.rl.losses import AdaptiveKLController, FixedKLController
    from pipeline.rl.models import PPOModels
    from pipeline.rl.rollout import RewardFunction
    from pipeline.strategy import Local


class RolloutConfig(Strict):
    prompts_per_step: int = Field(32, ge=1, description="prompts sampled per PPO step, over all processes (each "
                                  "takes its share)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (> 0); log-probs use logits / T. PPO "
                               "samples the full distribution at this temperature (no top-k or top-p: the importance "
                               "ratio needs each sampled token's probability under the policy)")
    max_new_tokens: int = Field(32, ge=1, description="longest response, in tokens")
    missing_eos_penalty: float | None = Field(None, ge=0, description="subtracted from the score without EOS")
    gather_zero3: bool = Field(True, description="ZeRO-3: gather the policy's shards on every process to sample "
                               "(fast); false samples on the shards, all processes stepping together (less memory); "
                               "needs DeepSpeed")

    @model_validator(mode="after")
    def _full_distribution(self):
        # PPO's importance ratio compares the probability of each sampled token under the sampler and under the
        # trained policy; truncated or greedy sampling has no such probability for the policy to match.
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 for PPO: 0 is greedy decoding, which has no sampling "
                             "probabilities for the importance ratio; use e.g. 1.0")
        return self


class KLConfig(Strict):
    coef: float = Field(0.05, ge=0, description="the KL coefficient: -coef x KL per token is added to the reward")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator (Schulman's k1, k2, k3)")
    adaptive: bool = Field(False, description="adapt coef towards `target` KL (Ziegler et al.'s controller)")
    target: float = Field(6.0, gt=0, description="with adaptive: the KL the controller aims for")
    horizon: int = Field(10000, ge=1, description="with adaptive: the controller's horizon, in responses")
    ceiling: float | None = Field(None, gt=0, description="stop (or warn) when the mean KL exceeds this")
    on_ceiling: Literal["stop", "warn"] = Field("stop", description="with ceiling: stop the stage, or warn and go on")

    @model_validator(mode="after")
    def _used(self):
        self.refuse_unused(("target", "horizon"), self.adaptive, "without adaptive: true")
        self.refuse_unused(("on_ceiling",), self.ceiling is not None, "without a ceiling")
        return self


class PPOHyperConfig(Strict):
    epochs: int = Field(4, ge=1, description="passes of updates over each step's rollout")
    minibatch_size: int = Field(16, ge=1, description="responses per optimizer step, over all processes")
    micro_batch_size: int = Field(16, ge=1, description="responses per forward on each process: gradient "
                                  "accumulation over minibatch_size / (processes x micro_batch_size)")
    forward_batch_size: int | None = Field(None, ge=1, description="the rollout's no-grad forwards (old and "
                                           "reference log-probs, values) in chunks of this many sequences; "
                                           "default: micro_batch_size")
    clip: float = Field(0.2, gt=0, description="policy ratio clipped to [1 - clip, 1 + clip]")
    dual_clip: float | None = Field(None, gt=1, description="for advantages A < 0 the loss is also capped at "
                                    "-dual_clip x A (Ye et al. 2020; null: off)")
    value_clip: float | None = Field(0.2, gt=0, description="values clipped to the old value +- this (null: "
                                     "unclipped)")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    entropy_coef: float = Field(0.0, ge=0, description="weight of the entropy bonus")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE")
    whiten_advantages: bool = Field(True, description="advantages normalised to mean 0, std 1 over the rollout")
    reward_clip: float | None = Field(10.0, gt=0, description="scores clipped to +- this before shaping (null: "
                                      "unclipped)")


class FrozenConfig(Strict):
    """Where the frozen models (reference, reward model) live under DeepSpeed ZeRO-3 (refused without DeepSpeed)."""

    zero3: bool = Field(True, description="under ZeRO-3, shard them too (inference-only ZeRO-3 engines); "
                        "false: a whole copy on every process")
    offload: bool = Field(False, description="keep their ZeRO-3 shards in CPU memory (needs ZeRO-3 and zero3: true)")


class PPOOptimConfig(ScheduleConfig):
    """PPO's optimiser: AdamW on every trained model, one schedule step per optimizer step (there are
    steps x ppo.epochs x (prompts_per_step / minibatch_size) of them). Epochs, batch sizes and logging live
    in `steps`, `rollout` and `ppo`."""

    lr: float = Field(1e-5, gt=0, description="peak learning rate (PPO's own default)")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "constant", description="learning-rate schedule, stepped once per optimizer step")


class PPOCheckpointConfig(CheckpointConfig):
    every: int = Field(0, ge=0, description="save every N PPO steps (each a rollout and its ppo.epochs of updates: "
                       "the `step` of metrics.jsonl and of `steps`); 0: no checkpoints")


class PPOStageConfig(OnlineRLBlock):
    stage: Literal["ppo"] = Field(description="the method: our PPO (pipeline/rl/)")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="share of prompts held out and evaluated before and "
                                 "after (0: none)")
    max_eval_prompts: int = Field(64, ge=1, description="evaluate at most the first N held-out prompts")
    steps: int = Field(20, ge=1, description="PPO steps: each samples rollout.prompts_per_step prompts and runs "
                       "ppo.epochs epochs of updates over them")
    checkpoint: PPOCheckpointConfig = Field(default_factory=PPOCheckpointConfig, description="periodic checkpoints, "
                                            "every N PPO steps")
    value_model: Literal["head", "critic"] = Field("head", description="head: a linear value head on the policy; "
                                                   "critic: a separate model initialised from the reward model")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="how responses are sampled each step")
    kl: KLConfig = Field(default_factory=KLConfig, description="the KL penalty to the reference, and its ceiling")
    ppo: PPOHyperConfig = Field(default_factory=PPOHyperConfig, description="the update: epochs, batches, clipping, "
                                "GAE")
    optim: PPOOptimConfig = Field(default_factory=PPOOptimConfig, description="AdamW and the schedule (no batch keys: "
                                  "see rollout and ppo)")
    frozen: FrozenConfig = Field(default_factory=FrozenConfig, description="where the reference and reward model live "
                                 "under DeepSpeed ZeRO-3")
    log_samples_every: int = Field(5, ge=1, description="write sample responses to samples.jsonl every N steps (and "
                                   "step 1)")

    @model_validator(mode="after")
    def _check(self):
        if self.value_model == "critic" and not self.reward.model:
            raise ValueError("value_model: 'critic' is initialised from the reward model; set reward.model")
        if self.ppo.minibatch_size > self.rollout.prompts_per_step:
            raise ValueError("ppo.minibatch_size: larger than rollout.prompts_per_step")
        if "dropout" in self.lora.model_fields_set and self.lora.dropout > 0:
            raise ValueError("lora.dropout has no effect in PPO: every dropout is off while PPO trains (before the "
                             "first update the importance ratio must be exactly 1); remove the key")
        self.refuse_unused(("eval_rule", "max_eval_prompts"), self.eval_fraction > 0,
                           "with eval_fraction: 0 (no prompts are held out to evaluate)")
        if self.deepspeed is None:  # both place models under ZeRO-3; one process holds everything whole
            unused = [f"frozen.{n}" for n in self.frozen.written("zero3", "offload")] + \
                [f"rollout.{n}" for n in self.rollout.written("gather_zero3")]
            if unused or "frozen" in self.written("frozen"):
                raise ValueError(f"{', '.join(unused) or 'frozen'} {'have' if len(unused) > 1 else 'has'} no effect "
                                 "without DeepSpeed: they place the models under ZeRO-3; set deepspeed (or rlhf run "
                                 "--deepspeed) or leave them out")
        return self

    def zero_batch(self, world: int):
        from pipeline.deepspeed import zero_batch  # deferred: it imports torch

        return zero_batch(self, world)

    def memory(self, procs: int, prompt_tokens: int) -> dict:
        # our own loop: micro-batches of ppo.micro_batch_size, this process's share of the prompts sampled at once, a
        # reference (full tuning) and a reward model, a critic of the policy's size with value_model: critic
        longest = min(prompt_tokens, self.max_prompt_tokens or prompt_tokens)
        return {"batch": self.ppo.micro_batch_size, "seq": longest + self.rollout.max_new_tokens,
                "generate": self.rollout.max_new_tokens, "gen_batch": max(1, self.rollout.prompts_per_step // procs),
                "frozen_models": int(self.tuning != "lora") + int(bool(self.reward.model)),
                "critic": self.value_model == "critic", "gather_for_generation": self.rollout.gather_zero3,
                "frozen_sharded": self.frozen.zero3, "own_loop": True, "fp32_without_deepspeed": True}

    def preflight(self, world: int, zero: dict | None = None) -> None:
        """On several processes (data parallel, or DeepSpeed) every process takes an equal share of each step's prompts
        and of each minibatch, in equal micro-batches (pipeline.strategy.local_sizes); frozen.offload keeps ZeRO-3
        shards, so it needs ZeRO-3 and frozen.zero3."""
        from pipeline.deepspeed import zero_stage  # deferred: it imports torch

        if self.frozen.offload and not (zero_stage(zero) == 3 and self.frozen.zero3):
            raise UsageError(f"stages.{self.name}.frozen.offload: needs a ZeRO-3 config (--deepspeed "
                             "configs/deepspeed/zero3.json) and frozen.zero3: true")
        if world > 1:
            from pipeline.strategy import local_sizes

            local_sizes(self, world)


Config = PPOStageConfig  # the registry's handle (pipeline/stages/__init__.py)


class _Hyper:
    """The knobs ppo_step reads, gathered from the stage config's blocks."""

    def __init__(self, cfg: PPOStageConfig):
        self.__dict__.update(cfg.ppo.model_dump())  # minibatch_size: the whole minibatch, over every process
        self.kl_estimator = cfg.kl.estimator
        self.forward_batch_size = cfg.ppo.forward_batch_size or cfg.ppo.micro_batch_size


def _load_models(cfg: PPOStageConfig, ctx, precision: str, strategy, policy_path: str, reward_art, info: dict):
    """(PPOModels, RewardFunction, tokenizer, where each model lives); the strategy decides how they are held
    (under ZeRO-3 built sharded, the frozen ones as inference engines: pipeline/deepspeed.py)."""
    from pipeline.rl.models import PPOModels  # deferred: it imports torch
    from pipeline.rl.rollout import RewardFunction  # deferred: it imports torch

    trust, revision = info.get("trust_remote_code", False), info.get("revision")
    tok = load_tokenizer(policy_path, trust, revision)
    reward_path = str(reward_art.path) if reward_art else None
    rm_trust = bool(cfg.reward.model) and ctx.trusts_remote_code(cfg.reward.model)  # the user's config decides
    rm_dir = None
    if cfg.value_model == "critic":
        rm_dir = str(reward_art.output("model"))
        if load_tokenizer(rm_dir, rm_trust).get_vocab() != tok.get_vocab():
            raise InvalidInput("value_model: critic needs a reward model that shares the policy's tokenizer; "
                               "use value_model: head")
    lora = cfg.tuning == "lora"
    # the reference: the disabled adapter with LoRA; a copy of the policy when it is whole on this process;
    # loaded again when the policy is sharded (ZeRO-3)
    load_reference = strategy.shards_weights and not lora

    def frozen_models():
        reward_fn = RewardFunction(reward_path, cfg.reward.rule, cfg.reward.normalize, precision, rm_trust)
        return reward_fn, load_causal_lm(policy_path, precision, trust, revision) if load_reference else None

    if not strategy.shards_frozen:  # whole copies on every process, loaded before sharded loading starts
        reward_fn, reference = frozen_models()
    with strategy.loading():  # ZeRO-3: transformers builds these sharded
        policy = load_causal_lm(policy_path, precision, trust, revision)
        if lora:
            from peft import get_peft_model

            # dropout is off in every model while PPO trains (a set lora.dropout is refused): the adapter says so
            policy = get_peft_model(policy, peft_config(cfg.lora.model_copy(update={"dropout": 0.0})))
        critic = None
        if rm_dir:
            from reward.scoring import load_reward_model

            critic = load_reward_model(rm_dir, precision, rm_trust)
        if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and under ZeRO-3
            for m in (policy, critic):
                if m is not None:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if strategy.shards_frozen:
            reward_fn, reference = frozen_models()
    norm = (reward_art.manifest.get("normalization") or {}) if rm_dir and cfg.reward.normalize else {}
    models = PPOModels(policy, tok, cfg.value_model, critic, lora=lora, reference=reference,
                       temperature=cfg.rollout.temperature,
                       critic_scale=(norm.get("mean", 0.0), norm.get("std", 1.0)))
    frozen = ("ZeRO-3 shards" + (" in CPU memory" if cfg.frozen.offload else "") if strategy.shards_frozen
              else "a whole copy" + (" on every process" if distributed.world_size() > 1 else ""))
    placement = {
        "policy": strategy.describe(),
        "values": cfg.value_model + (" (its own engine)" if rm_dir and strategy.shards_weights else ""),
        "reference": "the policy with its adapter disabled" if lora else frozen,
        "reward_model": frozen if reward_path else "none (rule)"}
    return models, reward_fn, tok, placement


@dataclass
class _Setup:
    """What the PPO loop works with, built by _setup."""

    models: PPOModels
    strategy: Local  # one process, data parallel or DeepSpeed (pipeline/strategy.py, pipeline/deepspeed.py)
    reward_fn: RewardFunction
    kl_ctl: FixedKLController | AdaptiveKLController
    tok: PreTrainedTokenizerBase
    eval_rule: Callable | None
    train_prompts: list
    eval_prompts: list
    info: dict
    policy_path: str
    reward_art: Artifact | None
    per_rank: int
    minibatch: int
    skipped: int  # prompts over max_prompt_tokens, listed in skipped.jsonl


def run(cfg: PPOStageConfig, ctx) -> dict:
    from transformers import set_seed

    set_seed(ctx.seed)
    s = _setup(cfg, ctx)
    ctx.metrics.wandb = wandb_run(ctx.pipeline.tracking, ctx.name, ctx.stage_config, ctx.work_dir)
    try:
        before, after, last, seconds = _loop(cfg, ctx, s)
    finally:
        if ctx.metrics.wandb is not None:
            ctx.metrics.wandb.finish()
    return _finish(cfg, ctx, s, before, after, last, seconds)


def _setup(cfg: PPOStageConfig, ctx) -> _Setup:
    """Prompts split by prompt, the strategy and the four models placed by it, optimizers and schedule."""
    from pipeline import deepspeed as zero  # deferred: it imports torch
    from pipeline.rl import losses  # deferred: it imports torch
    from pipeline.strategy import Optim, local_sizes  # deferred: it imports torch

    world, say = distributed.world_size(), distributed.say
    precision = resolve_precision(cfg.precision)
    policy_path, info = ctx.model_path(cfg.policy, role="policy", merged=True)
    reward_art = ctx.artifact(cfg.reward.model, "reward_model", "reward.model") if cfg.reward.model else None
    ds = zero.ds_config(cfg, precision, hidden_size(policy_path)) if cfg.deepspeed else None
    if ds is None:
        if precision != "fp32":
            say(f"[{ctx.name}] note: PPO runs in fp32 without DeepSpeed; precision {precision} applies under DeepSpeed")
        precision = "fp32"
    strategy = zero.select(ds, cfg.frozen.zero3, cfg.frozen.offload, cfg.rollout.gather_zero3)
    per_rank, minibatch = local_sizes(cfg, world)
    prompts = read_prompts(resolve_data_path(cfg.prompts), split=cfg.prompts_split)
    tok = load_tokenizer(policy_path, info.get("trust_remote_code", False), info.get("revision"))
    prompts, skipped = prompts_within(cfg, ctx, prompts, tok)
    train_prompts, eval_prompts = split_by_prompt(prompts, cfg.eval_fraction, ctx.seed, prompt_of=lambda p: p)
    eval_prompts = eval_prompts[: cfg.max_eval_prompts]
    if len(train_prompts) < cfg.rollout.prompts_per_step:
        raise InvalidInput(f"{cfg.prompts}: {len(train_prompts)} training prompts, fewer than "
                           f"rollout.prompts_per_step {cfg.rollout.prompts_per_step}"
                           + (f" (after skipping {skipped} over max_prompt_tokens: see skipped.jsonl)"
                              if skipped else ""))

    models, reward_fn, tok, placement = _load_models(cfg, ctx, precision, strategy, policy_path, reward_art, info)
    models.prepare(strategy, Optim(cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm,
                                   _scheduler_factory(cfg, minibatch, per_rank)))
    models.check_deterministic()  # every process: under ZeRO-3 the forwards are collective
    models.reference = strategy.place_frozen(models.reference)  # on the device, or ZeRO-3 shards
    if reward_fn.scorer is not None:
        reward_fn.scorer.model = strategy.place_frozen(reward_fn.scorer.model)
    kl_ctl = (losses.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else losses.FixedKLController(cfg.kl.coef))
    total, trainable = count_parameters(models.policy)
    info = {**info, "placement": placement, "tuning": cfg.tuning, "parameters": total, "trainable": trainable,
            "adapter": cfg.tuning == "lora" and not cfg.lora.merge}
    say(f"[{ctx.name}] {len(train_prompts)} train / {len(eval_prompts)} held-out prompts; {trainable:,} of "
        f"{total:,} policy parameters trainable ({cfg.tuning}); values: {cfg.value_model}"
        + (f"; {world} processes, {per_rank} prompts each per step" if world > 1 else ""))
    say(f"[{ctx.name}] models: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in placement.items()))
    return _Setup(models, strategy, reward_fn, kl_ctl, tok, load_callable(cfg.eval_rule) if cfg.eval_rule else None,
                  train_prompts, eval_prompts, info, policy_path, reward_art, per_rank, minibatch, skipped)


def _loop(cfg: PPOStageConfig, ctx, s: _Setup) -> tuple[dict, dict, dict, float]:
    """Held-out evaluation, `steps` PPO steps (rollout, scoring, update) with checkpoints, evaluation again.
    Returns (eval before, eval after, the last step's metrics, training seconds)."""
    from pipeline.rl.ppo import cycle_batches, evaluate, load_state  # deferred: it imports torch

    main = distributed.is_main()
    ro_cfg, models = cfg.rollout, s.models
    hp = _Hyper(cfg)
    batches = cycle_batches(s.train_prompts, ro_cfg.prompts_per_step, ctx.seed)
    samples_path = ctx.work_dir / "samples.jsonl"
    ckpt_dir, stop = ctx.work_dir / "checkpoints", checkpoint.stop_after_step()
    held_out = lambda: (evaluate(models, s.eval_prompts, s.reward_fn, s.eval_rule,  # noqa: E731
                                 max_new_tokens=ro_cfg.max_new_tokens, seed=ctx.seed) if s.eval_prompts else {})
    first = 1
    if ctx.resume_from is not None:
        state = load_state(ctx.resume_from, s.strategy, s.kl_ctl)
        before, first = state["before"], state["step"] + 1
        for _ in range(state["step"]):  # the data position: the same prompts in the same order
            next(batches)
    else:
        # every process evaluates every held-out prompt (same seed, same samples): the numbers do
        # not depend on the number of processes
        before = held_out()
        before.pop("_samples", None)
    t0 = time.time()
    last: dict = {}
    with FlopCounter(policy=models.policy, critic=getattr(models.critic_module, "model", None),
                     reference=models.reference, reward=getattr(s.reward_fn.scorer, "model", None)) as flops:
        _steps(cfg, ctx, s, first, batches, hp, samples_path, ckpt_dir, stop, before, last)
    seconds = time.time() - t0
    # the model FLOPs utilisation of the steps (pipeline/mfu.py): sampling, scoring, the no-grad and training forwards
    last.update(flops.metrics(seconds, resolve_precision(cfg.precision)))
    after = held_out()
    if main:
        _write_samples(samples_path, [{"step": "final-eval", "prompt": p, "response": r}
                                      for p, r in after.get("_samples", [])])
    after.pop("_samples", None)
    return before, after, last, seconds


def _steps(cfg: PPOStageConfig, ctx, s: _Setup, first: int, batches, hp, samples_path, ckpt_dir, stop, before: dict,
           last: dict) -> None:
    """PPO steps `first`..cfg.steps (rollout, scoring, update) with checkpoints; `last` gets the last step's metrics."""
    from tqdm.auto import tqdm

    from pipeline.rl.ppo import ppo_step, save_state  # deferred: it imports torch
    from pipeline.rl.rollout import gather_rollout, generate, row_seeds, score_rollout  # deferred: it imports torch

    main, rank, world = distributed.is_main(), distributed.rank(), distributed.world_size()
    ro_cfg, models = cfg.rollout, s.models
    for step in tqdm(range(first, cfg.steps + 1), desc="PPO", unit="step", initial=first - 1, total=cfg.steps,
                     disable=not main):
        epoch, batch = next(batches)
        t_step = time.perf_counter()
        # this process samples every world-th prompt of the step, each from its own seed (the same responses as on
        # one process), and scores them; then every process holds the whole scored rollout for the update
        mine = range(rank, len(batch), world)
        ro = generate(models, [batch[i] for i in mine], ro_cfg.max_new_tokens, keep_scores=True,
                      seeds=row_seeds(ctx.seed, step, mine))
        t_gen = time.perf_counter()
        phases = score_rollout(models, ro, s.reward_fn, ro_cfg.missing_eos_penalty, step, hp.forward_batch_size)
        t_score = time.perf_counter()
        ro = gather_rollout(ro, s.tok.pad_token_id)
        last.clear()
        last.update(ppo_step(models, s.strategy, ro, hp, s.kl_ctl, step))
        # where a step's time goes (seconds, this process): sampling, the reward, the no-grad forwards for old
        # log-probs and values and for the reference, the PPO epochs of updates
        last.update({"ppo/time/generate": t_gen - t_step, **phases, "ppo/time/update": time.perf_counter() - t_score,
                     "ppo/time/step": time.perf_counter() - t_step})
        last["ppo/epoch"] = epoch
        ctx.metrics.log(last, step=step)
        if main and (step % cfg.log_samples_every == 0 or step == 1):
            _write_samples(samples_path, [{"step": step, "prompt": p, "response": r, "score": sc} for p, r, sc in
                                          list(zip(ro.prompts, ro.responses, ro.scores.tolist()))[:2]])
        _check_kl_ceiling(cfg, ctx, step, last["ppo/kl"])
        every = cfg.checkpoint.every
        if (every and step % every == 0) or step == stop:
            checkpoint.save_atomic(ckpt_dir, step, ctx.checkpoint_meta(step), lambda d: save_state(
                d, s.strategy, s.kl_ctl, step, {"before": before}), cfg.checkpoint.keep)
        if step == stop and step < cfg.steps:
            raise checkpoint.Stopped(f"[{ctx.name}] stopped after step {step} (RLHF_STOP_AFTER_STEP); "
                                     "continue with --resume")


def _write_samples(path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _check_kl_ceiling(cfg: PPOStageConfig, ctx, step: int, kl: float) -> None:
    from pipeline.rl.ppo import kl_ceiling_message  # deferred: it imports torch

    if cfg.kl.ceiling is not None and kl > cfg.kl.ceiling:
        msg = kl_ceiling_message(step, kl, cfg.kl.ceiling)
        if cfg.kl.on_ceiling == "stop":
            raise InvalidInput(msg + " Stopped; no artifact written.")
        say(f"[{ctx.name}] warning: {msg}")


def _finish(cfg: PPOStageConfig, ctx, s: _Setup, before: dict, after: dict, last: dict, seconds: float) -> dict:
    """Save the policy (and value head or critic), and the stage's result for the manifest."""
    fingerprint = logits_fingerprint(s.models.policy, s.tok)  # every process takes part under ZeRO-3
    s.models.restore_configs()  # the saved policy keeps the dropout rates its config had
    memory = peak_memory()
    outputs = {"model": "model", "metrics": "metrics.jsonl", "samples": "samples.jsonl"}
    outputs.update(_save(cfg, ctx, s))
    if s.skipped:
        outputs["skipped"] = "skipped.jsonl"
    metrics = {**last, **{f"{k}_initial": v for k, v in before.items()}, **after, "train/steps": cfg.steps,
               "train/seconds": round(seconds, 2), **memory_metrics()}
    key = "eval/rule_reward_mean" if s.eval_rule else "eval/reward_mean"
    if s.eval_prompts:
        measured = (f"{key.split('/')[1]} {before.get(key, float('nan')):.3f} -> {after.get(key, float('nan')):.3f}, "
                    f"KL {after.get('eval/kl', float('nan')):.3f} (its own samples of "
                    f"{held_out_named(len(s.eval_prompts), cfg.eval_fraction, cfg.prompts)})")
    else:  # nothing held out to measure before and after (it read "nan -> nan"): the last step's own rollouts
        measured = (f"no held-out prompts (eval_fraction: 0); last step's rollouts: reward_mean "
                    f"{last.get('ppo/reward_mean', float('nan')):.3f}, KL {last.get('ppo/kl', float('nan')):.3f}")
    summary = f"{cfg.steps} steps in {seconds:.1f}s; {measured}; artifact: {ctx.run_dir / ctx.name / 'model'}"
    zero = getattr(s.strategy, "stage", 0)
    return {"kind": "policy", "outputs": outputs, "metrics": metrics,
            "counts": {"train_prompts": len(s.train_prompts), "eval_prompts": len(s.eval_prompts),
                       "skipped_prompts": s.skipped, "rollouts": cfg.steps * cfg.rollout.prompts_per_step},
            "extra": {"ppo_state": {"kl_coef": s.kl_ctl.value, "kl": s.kl_ctl.state_dict()},
                      "model": s.info,
                      "check": {"logits_fingerprint": fingerprint},
                      "distributed": {"world_size": distributed.world_size(), "zero_stage": zero,
                                      "memory_per_process": memory}},
            "summary": summary}


def _scheduler_factory(cfg: PPOStageConfig, minibatch: int, per_rank: int):
    """optimizer -> the learning-rate schedule of `optim`, over every optimizer step of the stage (each process
    runs per_rank / minibatch updates per epoch of each step)."""
    import math

    from transformers import get_scheduler

    total = cfg.steps * cfg.ppo.epochs * math.ceil(per_rank / minibatch)
    warmup = math.ceil(cfg.optim.warmup_ratio * total)
    return lambda optimizer: get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=warmup,
                                           num_training_steps=total)


def _save(cfg: PPOStageConfig, ctx, s: _Setup) -> dict:
    """The policy (safetensors + tokenizer; LoRA merged unless lora.merge is false), and the value head or the critic,
    as plain models that load without DeepSpeed: the strategy hands rank 0 each trained module as a plain model
    (under ZeRO its gathered weights in a model rebuilt from the policy's or reward model's path), one path for
    every strategy. Every process calls it; rank 0 writes."""
    from safetensors.torch import save_file

    from pipeline.rl.models import ValueHead  # deferred: it imports torch

    models, out_dir, info = s.models, ctx.work_dir, s.info

    def policy_skeleton():
        policy = load_causal_lm(s.policy_path, "fp32", info.get("trust_remote_code", False), info.get("revision"))
        if cfg.tuning == "lora":
            from peft import get_peft_model

            policy = get_peft_model(policy, peft_config(cfg.lora.model_copy(update={"dropout": 0.0})))
        return policy

    def critic_skeleton():
        trust = bool(cfg.reward.model) and ctx.trusts_remote_code(cfg.reward.model)
        return load_reward_model(str(s.reward_art.output("model")), "fp32", trust)

    policy = s.strategy.plain(models.policy, policy_skeleton)
    head = s.strategy.plain(models.value_head, lambda: ValueHead(models.head_width))
    critic = s.strategy.plain(models.critic_module.model if models.critic_module else None, critic_skeleton)
    if distributed.is_main():
        save_model(policy, s.tok, out_dir / "model", merge=cfg.lora.merge, revision=info.get("revision"))
        if head is not None:
            save_file(head.state_dict(), str(out_dir / "value_head.safetensors"))
        if critic is not None:
            critic.save_pretrained(out_dir / "critic", safe_serialization=True)
    return {"value_head": "value_head.safetensors"} if models.value_head is not None else {"critic": "critic"}
