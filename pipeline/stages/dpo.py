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

from typing import Literal

from pydantic import Field, model_validator

from pipeline.blocks import OfflinePreferenceBlock, OptimConfig
from pipeline.stages.common import (RuleReward, chat_prompt_tokens, held_out_prompts, held_out_summary, load_policy,
                                    offline_trainer, pair_datasets, train_and_save, trainer_rows, training_args,
                                    trl_choices)
from feedback.schema import read_pairs
from pipeline.arrow import message_features, procs
from pipeline.data import neutralised
from pipeline.models import resolve_precision

def trl_loss_types() -> tuple[str, ...]:
    """The DPO losses the installed TRL implements, read from its DPOConfig's own documentation of `loss_type`
    (common.trl_choices), so that ours can never fall behind it."""
    from trl import DPOConfig

    return trl_choices(DPOConfig, "loss_type")


class DPOOptimConfig(OptimConfig):
    lr: float = Field(5e-7, gt=0, description="peak learning rate (DPO's own default)")


# Losses whose formula reads label_smoothing (TRL's dpo_trainer): elsewhere it would be ignored.
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


class DPOStageConfig(OfflinePreferenceBlock):
    stage: Literal["dpo"] = Field(description="the method: direct preference optimisation (TRL's DPOTrainer)")
    loss_type: str = Field("sigmoid", description="any of TRL's DPO losses (checked against TRL when the stage "
                           "starts): sigmoid, ipo, hinge, robust, ...")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped labels; only the robust, "
                                   "exo_pair, aot and aot_unpaired losses use it")
    max_length: int = Field(512, ge=8, description="prompt + response tokens per side; pairs whose prompt alone fills "
                            "it are skipped")
    optim: DPOOptimConfig = Field(default_factory=DPOOptimConfig, description="optimiser, schedule and batches (lr "
                                  "5e-7 by default)")

    @model_validator(mode="after")
    def _used(self):
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSSES:
            raise ValueError(f"label_smoothing has no effect with loss_type '{self.loss_type}'; TRL uses it only for "
                             f"{', '.join(SMOOTHED_LOSSES)}")
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (e.g. 1e-3)")
        return self

    def memory(self, procs: int, prompt_tokens: int) -> dict:
        return {**super().memory(procs, prompt_tokens), "pairs": 2}  # chosen and rejected forwarded together

    def trl_loss_types(self) -> tuple[str, ...]:
        return trl_loss_types()


Config = DPOStageConfig  # the registry's handle (pipeline/stages/__init__.py)


COLUMNS = ["prompt", "chosen", "rejected"]  # TRL's conversational preference row


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


def _rows(cfg: DPOStageConfig, ctx, prefs, tok) -> tuple:
    """The pairs DPO trains and evaluates on, as TRL rows in Arrow datasets (common.pair_datasets: what is not used
    is listed and counted): not ties (no preferred response), nor pairs whose prompt alone reaches max_length (TRL
    drops them: no response token would be left)."""
    def convert(p, split):
        if p.tie:
            return None, "tie: DPO needs a preferred response"
        row = neutralised(tok, to_dpo_row(p))  # special tokens in the pair's text stay text
        n = prompt_tokens(tok, row)
        if n >= cfg.max_length:
            return None, (f"prompt over max_length: the prompt alone is {n} tokens, max_length {cfg.max_length}, so no "
                          "response token would be trained on")
        return row, None

    rows, c = pair_datasets(ctx, cfg, {"train": prefs.output("train"), "eval": prefs.output("eval")}, convert,
                            {k: message_features() for k in COLUMNS})
    counts = {"train_pairs": c["kept"]["train"], "eval_pairs": c["kept"]["eval"], "skipped": c["skipped"],
              "ties_skipped": c["skipped_by_reason"].get("tie", 0)}
    return trainer_rows(rows["train"], COLUMNS), trainer_rows(rows["eval"], COLUMNS), counts


def run(cfg: DPOStageConfig, ctx) -> dict:
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(ctx.seed)
    prefs = ctx.artifact(cfg.preferences, "preferences", "preferences")
    precision = resolve_precision(cfg.precision)
    _, info, tok, model = load_policy(ctx, cfg.policy)
    train, evals, data_counts = _rows(cfg, ctx, prefs, tok)
    prompts, named = held_out_prompts(cfg, read_pairs(prefs.output("eval")))
    rule = RuleReward(cfg.eval_rule, prompts, cfg.eval_max_new_tokens, ctx.seed, named)
    metrics: dict = {}
    rule.before(model, tok, metrics)

    args = training_args(DPOConfig, cfg, ctx, precision, loss_type=[cfg.loss_type], beta=cfg.beta,
                         label_smoothing=cfg.label_smoothing, max_length=cfg.max_length,
                         precompute_ref_log_probs=cfg.precompute_ref_log_probs, dataset_num_proc=procs(len(train)),
                         trust_remote_code=info.get("trust_remote_code", False))
    trainer = offline_trainer(DPOTrainer, cfg, ctx, args, model, tok, train, evals, data_counts,
                              f"{len(train)} train / {len(evals)} eval pairs")
    out = train_and_save(trainer, ctx, cfg, tok, info, rule, metrics, has_eval=bool(evals), eval_keys=(
        "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"))
    m = out["metrics"]
    pairs = held_out_summary(trainer, m, bool(evals), ("rewards/accuracies", "rewards/margins"))
    summary = (f"{out['steps']} steps in {out['seconds']:.1f}s; {pairs}" + rule.summary(m)
               + f"; artifact: {ctx.run_dir / ctx.name / 'model'}")
    out["extra"]["model"].update(precision=precision, loss_type=cfg.loss_type, beta=cfg.beta)
    return {**{k: out[k] for k in ("kind", "outputs", "metrics", "extra")}, "counts": data_counts, "summary": summary}
