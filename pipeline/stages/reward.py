"""Reward stage: a Bradley-Terry reward model trained with TRL's RewardTrainer on a preferences artifact.

    rlhf run configs/tiny.yaml --stage reward

The model is `AutoModelForSequenceClassification` with one output, from the SFT policy or any
model reference. Pairs are encoded by `reward.pairs` (through `reward.text.encode`: the reward model's own
tokenizer and chat template, right-truncated to max_length), the same function the scoring API
uses. Pairs the trainer cannot learn from are counted and listed in `skipped.jsonl`, never
dropped silently: ties, and pairs that truncation makes empty or identical.

    RUN_DIR/reward/
      manifest.json   # kind: reward_model; metrics eval/accuracy (+ by source), eval/margin_mean;
                      # normalization {mean, std, n}; calibration [accuracy by |margin| bucket]
      model/          # safetensors + tokenizer (LoRA merged)
      metrics.jsonl
      skipped.jsonl   # pairs not trained on, with reasons (when any)
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.blocks import OptimConfig, TrainingBlock
from rlhf.errors import InvalidInput
from pipeline.stages.common import (check_finite, fit, logits_fingerprint, memory_metrics, pair_datasets,
                                    peft_config, perf_metrics, save_policy, trainer_rows, training_args, weights_dtype)
from pipeline.distributed import say
from pipeline.models import count_parameters, load_tokenizer, resolve_precision
from pipeline.tracking import readable_progress, trainer_callback
from reward.evaluation import evaluate, normalization
from reward.pairs import NoMargin, encode_pair
from reward.scoring import load_reward_model


class RewardStageConfig(TrainingBlock):
    stage: Literal["reward"] = Field(description="the method: a Bradley-Terry reward model (TRL's RewardTrainer)")
    groups_by_length: ClassVar[bool] = True  # one length per row (blocks.TrainingBlock)
    model: str = Field(description="stage:NAME (e.g. the SFT policy), a key of `models`, or a model reference")
    preferences: str = Field(description="stage:NAME of a preferences artifact")
    eval_preferences: str | None = Field(None, description="stage:NAME whose eval split is the held-out set "
                                         "(e.g. human pairs for a model trained on AI labels)")
    use_margin: bool = Field(False, description="subtract each pair's margin inside the loss (pairs need margins)")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="penalise (r_c + r_r)^2 to centre rewards")
    max_length: int = Field(512, ge=8, description="tokens per side (prompt + response), right-truncated")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser, schedule and batches")
    calibration_buckets: int = Field(4, ge=1, description="held-out accuracy is also reported per quantile bucket of "
                                     "|margin|, this many")
    eval_initial: bool = Field(True, description="also score the held-out pairs before training "
                               "(eval/accuracy_initial: the fresh score head's); false saves one pass over them")

    @model_validator(mode="after")
    def _used(self):
        if not self.lora.merge:
            raise ValueError("lora.merge: false has no effect here: a reward model is always saved merged (its "
                             "score head and the adapter in one model); leave lora.merge at true")
        return self

    def memory(self, procs: int, prompt_tokens: int) -> dict:
        # chosen and rejected forwarded together; a score head, no vocabulary logits
        return {**super().memory(procs, prompt_tokens), "pairs": 2, "lm_head": False}

    def inputs(self) -> dict[str, tuple[str, str]]:
        out = {"model": (self.model, "model"), "preferences": (self.preferences, "artifact")}
        if self.eval_preferences:
            out["eval_preferences"] = (self.eval_preferences, "artifact")
        return out


Config = RewardStageConfig  # the registry's handle (pipeline/stages/__init__.py)


def _pairs(cfg: RewardStageConfig, ctx, tokenizer):
    """(train rows, eval rows, counts) as Arrow datasets of encoded pairs, with their meta columns (the eval rows'
    `source` splits the accuracy); pairs not trained on (ties, truncated) listed in skipped.jsonl with their reasons
    (common.pair_datasets)."""
    from datasets import List, Value

    prefs = ctx.artifact(cfg.preferences, "preferences", "preferences")
    eval_art = ctx.artifact(cfg.eval_preferences, "preferences", "eval_preferences") if cfg.eval_preferences else prefs

    def convert(p, split):
        row, reason = encode_pair(p, tokenizer, cfg.max_length, cfg.use_margin and split == "train")
        if row is not None and cfg.optim.group_by_length:
            # what a batch is padded to: the longer side of each pair (transformers groups eval batches too)
            row["length"] = max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        return row, reason

    columns = {"chosen_ids": List(Value("int64")), "rejected_ids": List(Value("int64")),
               **({"margin": Value("float64")} if cfg.use_margin else {}),
               **({"length": Value("int64")} if cfg.optim.group_by_length else {})}
    try:
        rows, c = pair_datasets(ctx, cfg, {"train": prefs.output("train"), "eval": eval_art.output("eval")}, convert,
                                columns)
    except NoMargin as exc:
        raise InvalidInput(str(exc)) from None
    counts = {"train_pairs": c["read"]["train"], "eval_pairs": c["read"]["eval"], "trained_on": c["kept"]["train"],
              "evaluated_on": c["kept"]["eval"], "skipped": c["skipped"]}
    return rows["train"], rows["eval"], counts


def run(cfg: RewardStageConfig, ctx) -> dict:
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(ctx.seed)
    precision = resolve_precision(cfg.precision)
    path, info = ctx.model_path(cfg.model, merged=True)
    trust, revision = info.get("trust_remote_code", False), info.get("revision")
    tokenizer, model = load_tokenizer(path, trust, revision), load_reward_model(path, "fp32", trust, revision)
    model.config.pad_token_id = tokenizer.pad_token_id
    train_rows, eval_rows, counts = _pairs(cfg, ctx, tokenizer)
    # what TRL reads: the ids, the margin of training pairs (use_margin), the length (group_by_length)
    trained = [c for c in ("chosen_ids", "rejected_ids", "margin", "length") if c in train_rows.column_names]

    args = training_args(RewardConfig, cfg, ctx, precision, max_length=None,
                         center_rewards_coefficient=cfg.center_rewards_coefficient, dataset_num_proc=None,
                         # TRL keeps only chosen_ids/rejected_ids/margin unless told otherwise; the length column
                         # must reach the sampler (its collator ignores it)
                         remove_unused_columns=not cfg.optim.group_by_length)
    trainer = RewardTrainer(model=model, args=args, train_dataset=trainer_rows(train_rows, trained),
                            eval_dataset=trainer_rows(eval_rows, [c for c in trained if c != "margin"])
                            if len(eval_rows) else None,
                            processing_class=tokenizer, callbacks=[trainer_callback(ctx.metrics)],
                            peft_config=peft_config(cfg.lora, "SEQ_CLS") if cfg.tuning == "lora" else None)
    readable_progress(trainer, ctx.name)
    total, trainable = count_parameters(trainer.model)
    say(f"[{ctx.name}] {len(train_rows)} train / {len(eval_rows)} eval pairs; "
        f"{trainable:,} of {total:,} parameters trainable ({cfg.tuning}); the score head starts fresh")
    # Held-out metrics come from the same scoring code that users and PPO call.
    score_rows = eval_rows if len(eval_rows) else train_rows
    before = evaluate(trainer.model, score_rows, tokenizer.pad_token_id, cfg.calibration_buckets)[0] \
        if cfg.eval_initial else {}
    t0 = time.time()
    perf = perf_metrics(fit(trainer, ctx, cfg))
    seconds = time.time() - t0
    after, rewards = evaluate(trainer.model, score_rows, tokenizer.pad_token_id, cfg.calibration_buckets)
    check_finite(ctx, {"held-out rewards": rewards})
    calibration = after.pop("calibration")
    initial = {"eval/accuracy_initial": before["eval/accuracy"]} if before else {}
    metrics = {**after, **initial,
               "train/steps": trainer.state.global_step, "train/seconds": round(seconds, 2), **perf, **memory_metrics()}
    ctx.metrics.log(metrics, step=trainer.state.global_step)

    fingerprint = logits_fingerprint(trainer.model, tokenizer)
    save_policy(trainer, trainer.model, tokenizer, ctx.work_dir / "model", merge=True, trust_remote_code=trust)
    split = "eval" if len(eval_rows) else "train (no eval split)"
    start = f"{before['eval/accuracy']:.3f} -> " if before else ""
    summary = (f"{trainer.state.global_step} steps in {seconds:.1f}s; {split} accuracy "
               f"{start}{after['eval/accuracy']:.3f}, margin {after['eval/margin_mean']:.3f}; "
               f"artifact: {ctx.run_dir / ctx.name / 'model'}")
    return {
        "kind": "reward_model",
        "outputs": {"model": "model", "metrics": "metrics.jsonl",
                    **({"skipped": "skipped.jsonl"} if counts["skipped"] else {})},
        "metrics": metrics,
        "counts": counts,
        "extra": {"normalization": {**normalization(rewards), "split": split}, "calibration": calibration,
                  "max_length": cfg.max_length, "check": {"logits_fingerprint": fingerprint},
                  "model": {**info, "tuning": cfg.tuning, "parameters": total, "trainable": trainable,
                            "precision": precision, "weights_dtype": weights_dtype(model)}},
        "summary": summary,
    }
