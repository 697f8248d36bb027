"""DPO stage: direct preference optimisation with TRL's DPOTrainer on a preferences artifact (human or AI).

    rlhf run configs/tiny-dpo.yaml --stage dpo

`loss_type` is any of TRL's (sigmoid, ipo, hinge, robust, ...); with LoRA the reference is the
same weights with the adapter disabled (no second model). Ties are not trained on and are
counted. Held-out metrics `rewards/margins` and `rewards/accuracies` (and, with `eval_rule`,
the rule reward of samples on held-out prompts before and after).

    RUN_DIR/dpo/
      manifest.json    # kind: policy
      model/           # safetensors + tokenizer
"""

from __future__ import annotations

import copy
import time
from typing import Literal

from pydantic import Field, model_validator

from pipeline.blocks import OptimConfig, TrainingBlock
from rlhf.errors import InvalidInput, UsageError
from pipeline.stages.common import (RuleReward, chat_prompt_tokens, check_finite, final_model, fit, held_out_prompts,
                                    load_policy, logits_fingerprint, memory_metrics, pair_rows, peft_config,
                                    save_policy, training_args, trl_choices, weights_dtype)
from feedback.schema import read_pairs
from pipeline.data import neutralised
from pipeline.distributed import say
from pipeline.models import count_parameters, resolve_precision
from pipeline.tracking import readable_progress, trainer_callback

def trl_loss_types() -> tuple[str, ...]:
    """The DPO losses the installed TRL implements, read from its DPOConfig's own documentation of `loss_type`
    (common.trl_choices), so that ours can never fall behind it."""
    from trl import DPOConfig

    return trl_choices(DPOConfig, "loss_type")


class DPOOptimConfig(OptimConfig):
    lr: float = Field(5e-7, gt=0, description="peak learning rate (DPO's own default)")


# Losses whose formula reads label_smoothing (TRL's dpo_trainer): elsewhere it would be ignored.
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


class DPOStageConfig(TrainingBlock):
    stage: Literal["dpo"] = Field(description="the method: direct preference optimisation (TRL's DPOTrainer)")
    policy: str = Field(description="stage:NAME of a policy artifact, a key of `models`, or a model reference")
    preferences: str = Field(description="stage:NAME of a preferences artifact")
    loss_type: str = Field("sigmoid", description="any of TRL's DPO losses (checked against TRL when the stage "
                           "starts): sigmoid, ipo, hinge, robust, ...")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference (higher: stay closer)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped labels; only the robust, "
                                   "exo_pair, aot and aot_unpaired losses use it")
    precompute_ref_log_probs: bool = Field(False, description="compute the reference's log-probs once before training "
                                           "(no reference model kept during training)")
    max_length: int = Field(512, ge=8, description="prompt + response tokens per side; pairs whose prompt alone fills "
                            "it are skipped")
    optim: DPOOptimConfig = Field(default_factory=DPOOptimConfig, description="optimiser, schedule and batches (lr "
                                  "5e-7 by default)")
    eval_prompts: str | None = Field(None, description="with eval_rule: prompts sampled before and after")
    eval_prompts_split: str | None = Field(None, description="eval_prompts is a DatasetDict directory: the split "
                                           "to read (default: train)")
    eval_rule: str | None = Field(None, description="module:function(prompt, response) -> float reported on "
                                  "eval_prompts before and after training")
    eval_max_new_tokens: int = Field(32, ge=1, description="longest sampled response for eval_rule, in tokens")

    @model_validator(mode="after")
    def _used(self):
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSSES:
            raise ValueError(f"label_smoothing has no effect with loss_type '{self.loss_type}'; TRL uses it only for "
                             f"{', '.join(SMOOTHED_LOSSES)}")
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (e.g. 1e-3)")
        if bool(self.eval_rule) != bool(self.eval_prompts):
            raise ValueError("eval_rule and eval_prompts work together (the rule scores samples on those prompts): "
                             "set both or neither")
        self.refuse_unused(("eval_max_new_tokens",), bool(self.eval_rule), "without eval_rule")
        self.refuse_unused(("eval_prompts_split",), bool(self.eval_prompts), "without eval_prompts")
        return self

    def memory(self, procs: int, prompt_tokens: int) -> dict:
        # chosen and rejected forwarded together; a frozen copy of the policy as the reference, unless the reference is
        # the disabled adapter (LoRA) or its log-probs are computed once beforehand
        reference = int(self.tuning != "lora" and not self.precompute_ref_log_probs)
        return {**super().memory(procs, prompt_tokens), "pairs": 2, "frozen_models": reference}

    def preflight(self, world: int, zero: dict | None = None) -> None:
        if self.loss_type not in trl_loss_types():
            raise UsageError(f"stages.{self.name}.loss_type: {self.loss_type!r} is not a DPO loss of the installed "
                             f"TRL; expected one of {list(trl_loss_types())}")

    def inputs(self) -> dict[str, tuple[str, str]]:
        out = {"policy": (self.policy, "model"), "preferences": (self.preferences, "artifact")}
        if self.eval_prompts:
            out["eval_prompts"] = (self.eval_prompts, "data")
        return out


Config = DPOStageConfig  # the registry's handle (pipeline/stages/__init__.py)


def to_dpo_row(p) -> dict:
    """Canonical pair -> TRL conversational preference row (explicit prompt)."""
    prompt = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else p.prompt

    def reply(x):
        return [{"role": "assistant", "content": x}] if isinstance(x, str) else x

    return {"prompt": prompt, "chosen": reply(p.chosen), "rejected": reply(p.rejected)}


def prompt_tokens(tok, row: dict) -> int:
    """How many tokens of a DPO row TRL counts as its prompt (its tokenisation: the prompt rendered with the
    generation prompt, cut where it stops being a prefix of prompt + chosen or prompt + rejected)."""
    return chat_prompt_tokens(tok, row["prompt"], [row["chosen"], row["rejected"]])


def _rows(cfg: DPOStageConfig, ctx, prefs, tok, train_pairs: list, eval_pairs: list) -> tuple[list, list, dict]:
    """The pairs DPO trains and evaluates on, as TRL rows (common.pair_rows: what is not used is listed and
    counted): not ties (no preferred response), nor pairs whose prompt alone reaches max_length (TRL drops them:
    no response token would be left)."""
    def convert(p, split):
        if p.tie:
            return None, "tie: DPO needs a preferred response"
        row = neutralised(tok, to_dpo_row(p))  # special tokens in the pair's text stay text
        n = prompt_tokens(tok, row)
        if n >= cfg.max_length:
            return None, (f"prompt over max_length: the prompt alone is {n} tokens, max_length {cfg.max_length}, so no "
                          "response token would be trained on")
        return row, None

    rows, _, c = pair_rows(ctx, cfg, {"train": (prefs.output("train"), train_pairs),
                                      "eval": (prefs.output("eval"), eval_pairs)}, convert)
    counts = {"train_pairs": c["kept"]["train"], "eval_pairs": c["kept"]["eval"], "skipped": c["skipped"],
              "ties_skipped": c["skipped_by_reason"].get("tie", 0)}
    return rows["train"], rows["eval"], counts


def run(cfg: DPOStageConfig, ctx) -> dict:
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(ctx.seed)
    prefs = ctx.artifact(cfg.preferences, "preferences", "preferences")
    eval_pairs = list(read_pairs(prefs.output("eval")))
    precision = resolve_precision(cfg.precision)
    _, info, tok, model = load_policy(ctx, cfg.policy)
    train, evals, data_counts = _rows(cfg, ctx, prefs, tok, list(read_pairs(prefs.output("train"))), eval_pairs)
    prompts, named = held_out_prompts(cfg, eval_pairs)
    rule = RuleReward(cfg.eval_rule, prompts, cfg.eval_max_new_tokens, ctx.seed, named)
    metrics: dict = {}
    rule.before(model, tok, metrics)

    args = training_args(DPOConfig, cfg, ctx, precision, loss_type=[cfg.loss_type], beta=cfg.beta,
                         label_smoothing=cfg.label_smoothing, max_length=cfg.max_length,
                         precompute_ref_log_probs=cfg.precompute_ref_log_probs, dataset_num_proc=None,
                         trust_remote_code=info.get("trust_remote_code", False))
    # Full tuning: the reference is a frozen copy of the policy as loaded (TRL would reload it from the policy's
    # path without its revision); LoRA: the disabled adapter; precomputed: no reference kept.
    reference = copy.deepcopy(model) if cfg.tuning == "full" and not cfg.precompute_ref_log_probs else None
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(evals) if evals else None, processing_class=tok,
                         peft_config=peft_config(cfg.lora) if cfg.tuning == "lora" else None,
                         callbacks=[trainer_callback(ctx.metrics)])
    readable_progress(trainer, ctx.name)
    dropped = len(train) - len(trainer.train_dataset)
    if dropped:  # TRL filtered rows our check did not foresee: say so rather than overstate what was trained
        data_counts["dropped_by_trl"] = dropped
        say(f"[{ctx.name}] warning: TRL dropped {dropped} more training pairs than predicted")
    total, trainable = count_parameters(trainer.model)
    say(f"[{ctx.name}] {len(train)} train / {len(evals)} eval pairs; {trainable:,} of {total:,} parameters "
        f"trainable ({cfg.tuning}); reference: {'disabled adapter' if cfg.tuning == 'lora' else 'frozen copy'}")
    t0 = time.time()
    fit(trainer, ctx, cfg)
    seconds = time.time() - t0
    if evals:
        ev = trainer.evaluate()
        metrics.update({k: ev[f"eval_{k}"] for k in ("rewards/margins", "rewards/accuracies", "rewards/chosen",
                                                      "rewards/rejected") if f"eval_{k}" in ev})
        metrics["eval/loss"] = ev["eval_loss"]
    model_out = final_model(trainer, cfg.lora.merge)
    rule.after(ctx, trainer, model_out, tok, metrics)
    check_finite(ctx, metrics)
    ctx.metrics.log(metrics, step=trainer.state.global_step)
    fingerprint = logits_fingerprint(model_out, tok) if not hasattr(model_out, "peft_config") else None
    is_adapter = save_policy(trainer, model_out, tok, ctx.work_dir / "model", merge=cfg.lora.merge,
                             trust_remote_code=info.get("trust_remote_code", False), revision=info.get("revision"))
    steps = trainer.state.global_step
    summary = (f"{steps} steps in {seconds:.1f}s; rewards/accuracies {metrics.get('rewards/accuracies', float('nan')):.3f}, "
               f"rewards/margins {metrics.get('rewards/margins', float('nan')):.3f}" + rule.summary(metrics)
               + f"; artifact: {ctx.run_dir / ctx.name / 'model'}")
    outputs = {"model": "model", "metrics": "metrics.jsonl"}
    if (ctx.work_dir / "skipped.jsonl").exists():
        outputs["skipped"] = "skipped.jsonl"
    return {"kind": "policy", "outputs": outputs,
            "metrics": {**metrics, "train/steps": steps, "train/seconds": round(seconds, 2), **memory_metrics()},
            "counts": data_counts,
            "extra": {"model": {**info, "tuning": cfg.tuning, "adapter": is_adapter, "parameters": total,
                                "trainable": trainable, "precision": precision, "weights_dtype": weights_dtype(model),
                                "loss_type": cfg.loss_type, "beta": cfg.beta},
                      "check": {"logits_fingerprint": fingerprint}},
            "summary": summary}
