"""KTO stage: Kahneman-Tversky optimisation with TRL's KTOTrainer on binary feedback (an answer is desirable or
not: thumbs up/down, what real products collect), no pairs needed.

    rlhf run configs/tiny-kto.yaml --stage kto

`preferences` names an `unpaired_preferences` artifact (a preferences stage that read unpaired rows: prompt,
completion, label; e.g. `rlhf feedback export --kind unpaired`), or a `preferences` artifact of pairs, which is
unpaired as TRL unpairs it (chosen desirable, rejected undesirable; ties skipped). `desirable_weight` and
`undesirable_weight` default to balancing the training rows' ratio (desirable_weight x n_desirable =
undesirable_weight x n_undesirable, the minority weighted up, the other 1: the lower end of the range the KTO
paper and TRL recommend, [1, 4/3]); one given, the other is solved from it. Rows whose prompt alone fills
max_length (TRL drops them) are counted and listed in skipped.jsonl. TRL's KTO loss estimates its KL term from
the other answers of a batch, so it needs batches of at least 2 in a fixed order: the rows are shuffled once with
the run's seed and read sequentially. Held-out metrics: `rewards/chosen`, `rewards/rejected`, `rewards/margins`
(desirable minus undesirable implied reward), `kl`; with `eval_rule`, the rule reward of samples on held-out
prompts before and after.

    RUN_DIR/kto/
      manifest.json    # kind: policy; the weights used and the desirable/undesirable counts
      model/           # safetensors + tokenizer
      skipped.jsonl    # rows not trained on, with reasons (when any)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from feedback.schema import UnpairedRow, read_pairs
from pipeline.blocks import OfflinePreferenceBlock, OptimConfig
from pipeline.arrow import message_features, procs, seeded_order
from pipeline.data import neutralised
from pipeline.distributed import say
from pipeline.models import resolve_precision
from pipeline.stages.common import (RuleReward, chat_prompt_tokens, held_out_prompts, held_out_summary, load_policy,
                                    offline_trainer, pair_datasets, train_and_save, trainer_rows, training_args)

COLUMNS = ["prompt", "completion", "label"]  # TRL's conversational unpaired row
WEIGHT_RANGE = (1.0, 4 / 3)  # desirable_weight * n_desirable / (undesirable_weight * n_undesirable), KTO paper eq. 8


def trl_loss_types() -> tuple[str, ...]:
    """The KTO losses the installed TRL implements (its KTOConfig's declared choices)."""
    from trl import KTOConfig

    return tuple(KTOConfig.__dataclass_fields__["loss_type"].metadata.get("choices") or ("kto",))


class KTOOptimConfig(OptimConfig):
    lr: float = Field(1e-6, gt=0, description="peak learning rate (TRL's KTO default)")


class KTOStageConfig(OfflinePreferenceBlock):
    stage: Literal["kto"] = Field(description="the method: Kahneman-Tversky optimisation on binary feedback (TRL's "
                                  "KTOTrainer)")
    preferences: str = Field(description="stage:NAME of an unpaired_preferences artifact (a preferences stage that "
                             "read prompt/completion/label rows), or of a preferences artifact of pairs (chosen "
                             "desirable, rejected undesirable)")
    loss_type: str = Field("kto", description="kto (the KTO paper's loss, with its KL estimate) or apo_zero_unpaired "
                           "(checked against TRL when the stage starts)")
    desirable_weight: float | None = Field(None, gt=0, description="weight of the desirable rows' losses; default: "
                                           "balances the training rows' ratio with undesirable_weight")
    undesirable_weight: float | None = Field(None, gt=0, description="weight of the undesirable rows' losses; "
                                             "default: balances the training rows' ratio with desirable_weight")
    max_length: int = Field(512, ge=8, description="prompt + completion tokens, right-truncated; rows whose prompt "
                            "alone fills it are skipped")
    optim: KTOOptimConfig = Field(default_factory=KTOOptimConfig, description="optimiser, schedule and batches (lr "
                                  "1e-6 by default; per_device_batch_size at least 2 for the kto loss)")

    @model_validator(mode="after")
    def _used(self):
        if self.loss_type == "kto" and self.optim.per_device_batch_size < 2:
            raise ValueError("optim.per_device_batch_size: the kto loss estimates its KL term from the other answers "
                             "of a batch, so a batch needs at least 2 rows")
        return self

    def memory(self, procs: int, prompt_tokens: int) -> dict:
        # each row forwarded with its mismatched KL completion (the kto loss)
        return {**super().memory(procs, prompt_tokens), "pairs": 2 if self.loss_type == "kto" else 1}

    def trl_loss_types(self) -> tuple[str, ...]:
        return trl_loss_types()


Config = KTOStageConfig  # the registry's handle (pipeline/stages/__init__.py)


def balanced_weights(desirable: float | None, undesirable: float | None, n_desirable: int,
                     n_undesirable: int) -> tuple[float, float]:
    """The weights used: those given, the others solved from desirable x n_desirable = undesirable x n_undesirable
    (both unset: the minority side weighted up, the majority at 1). With no row on one side there is no ratio to
    balance: unset weights are 1."""
    if desirable is not None and undesirable is not None:
        return desirable, undesirable
    if not n_desirable or not n_undesirable:
        return desirable or 1.0, undesirable or 1.0
    if desirable is not None:
        return desirable, desirable * n_desirable / n_undesirable
    if undesirable is not None:
        return undesirable * n_undesirable / n_desirable, undesirable
    if n_desirable < n_undesirable:
        return n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / n_undesirable


def _unpaired(items: list) -> list[UnpairedRow]:
    """Unpaired rows as they are; pairs unpaired as TRL does (chosen desirable, rejected undesirable); a tie has no
    desirable answer and stays a pair, for _rows to skip with its reason."""
    out = []
    for p in items:
        if isinstance(p, UnpairedRow) or p.tie:
            out.append(p)
            continue
        out += [UnpairedRow(p.prompt, p.chosen, True, id=f"{p.id}:chosen", source=p.source, annotator=p.annotator),
                UnpairedRow(p.prompt, p.rejected, False, id=f"{p.id}:rejected", source=p.source,
                            annotator=p.annotator)]
    return out


def to_kto_row(r: UnpairedRow) -> dict:
    """Canonical unpaired row -> TRL conversational unpaired row."""
    prompt = [{"role": "user", "content": r.prompt}] if isinstance(r.prompt, str) else r.prompt
    completion = [{"role": "assistant", "content": r.completion}] if isinstance(r.completion, str) else r.completion
    return {"prompt": prompt, "completion": completion, "label": r.label}


def _rows(cfg: KTOStageConfig, ctx, prefs, tok) -> tuple:
    """The rows KTO trains and evaluates on, as TRL rows in Arrow datasets (common.pair_datasets: what is not used is
    listed and counted): not ties (from a pairs artifact), nor rows whose prompt alone reaches max_length (TRL drops
    them: no completion token would be left)."""
    from datasets import Value

    def convert(r, split):
        if not isinstance(r, UnpairedRow):
            return None, "tie: no desirable answer in the pair"
        row = neutralised(tok, {k: v for k, v in to_kto_row(r).items() if k != "label"})
        n = chat_prompt_tokens(tok, row["prompt"], [row["completion"]])
        if n >= cfg.max_length:
            return None, (f"prompt over max_length: the prompt alone is {n} tokens, max_length {cfg.max_length}, so no "
                          "completion token would be trained on")
        return {**row, "label": r.label}, None

    rows, c = pair_datasets(ctx, cfg, {"train": prefs.output("train"), "eval": prefs.output("eval")}, convert,
                            {"prompt": message_features(), "completion": message_features(), "label": Value("bool")},
                            what="rows", unpaired=prefs.kind == "unpaired_preferences", expand=_unpaired_one)
    desirable = count_true(rows["train"], "label")
    counts = {"train_rows": c["kept"]["train"], "eval_rows": c["kept"]["eval"], "skipped": c["skipped"],
              "ties_skipped": c["skipped_by_reason"].get("tie", 0),
              "train_desirable": desirable, "train_undesirable": len(rows["train"]) - desirable}
    return trainer_rows(rows["train"], COLUMNS), trainer_rows(rows["eval"], COLUMNS), counts


def _unpaired_one(item) -> list:
    return _unpaired([item])


def count_true(rows, column: str) -> int:
    """How many rows of a dataset hold true in a boolean column (read as Arrow, not as Python rows)."""
    import pyarrow.compute as pc

    return sum(int(pc.sum(batch.column(column)).as_py() or 0) for batch in rows.with_format("arrow").iter(10_000))


def run(cfg: KTOStageConfig, ctx) -> dict:
    from transformers import set_seed
    from trl import KTOConfig, KTOTrainer

    set_seed(ctx.seed)
    prefs = ctx.artifact(cfg.preferences, ("unpaired_preferences", "preferences"), "preferences")
    unpaired = prefs.kind == "unpaired_preferences"
    precision = resolve_precision(cfg.precision)
    _, info, tok, model = load_policy(ctx, cfg.policy)
    train, evals, data_counts = _rows(cfg, ctx, prefs, tok)
    # TRL reads the rows in order (its KL estimate pairs neighbours): shuffle once, seeded, so that a file sorted by
    # time or by label does not give batches of one kind
    train = train.select(seeded_order(len(train), ctx.seed))
    n_d, n_u = data_counts["train_desirable"], data_counts["train_undesirable"]
    desirable_weight, undesirable_weight = balanced_weights(cfg.desirable_weight, cfg.undesirable_weight, n_d, n_u)
    ratio = desirable_weight * n_d / (undesirable_weight * n_u) if n_d and n_u else None
    if ratio is not None and not WEIGHT_RANGE[0] - 1e-9 <= ratio <= WEIGHT_RANGE[1] + 1e-9:
        say(f"[{ctx.name}] note: desirable_weight x {n_d} desirable / (undesirable_weight x {n_u} undesirable) is "
            f"{ratio:.2f}, outside the [1, 4/3] the KTO paper recommends")
    prompts, named = held_out_prompts(cfg, read_pairs(prefs.output("eval"), unpaired=unpaired))
    rule = RuleReward(cfg.eval_rule, prompts, cfg.eval_max_new_tokens, ctx.seed, named)
    metrics: dict = {}
    rule.before(model, tok, metrics)

    args = training_args(KTOConfig, cfg, ctx, precision, loss_type=cfg.loss_type, beta=cfg.beta,
                         desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                         max_length=cfg.max_length, precompute_ref_log_probs=cfg.precompute_ref_log_probs,
                         dataset_num_proc=procs(len(train)), trust_remote_code=info.get("trust_remote_code", False),
                         train_sampling_strategy="sequential")
    trainer = offline_trainer(KTOTrainer, cfg, ctx, args, model, tok, train, evals, data_counts,
                              f"{len(train)} train ({n_d} desirable, {n_u} undesirable) / {len(evals)} eval rows; "
                              f"weights desirable {desirable_weight:.3g}, undesirable {undesirable_weight:.3g}")
    out = train_and_save(trainer, ctx, cfg, tok, info, rule, metrics, has_eval=bool(evals), eval_keys=(
        "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen", "logps/rejected"))
    m = out["metrics"]
    margins = held_out_summary(trainer, m, bool(evals), ("rewards/margins",), rows="rows")
    summary = (f"{out['steps']} steps in {out['seconds']:.1f}s; {margins}" + rule.summary(m)
               + f"; artifact: {ctx.run_dir / ctx.name / 'model'}")
    out["extra"]["model"].update(precision=precision, loss_type=cfg.loss_type, beta=cfg.beta)
    out["extra"]["weights"] = {"desirable": desirable_weight, "undesirable": undesirable_weight,
                               "given": {"desirable": cfg.desirable_weight, "undesirable": cfg.undesirable_weight},
                               "ratio": ratio, "preferences": "unpaired" if unpaired else "pairs (unpaired)"}
    return {**{k: out[k] for k in ("kind", "outputs", "metrics", "extra")}, "counts": data_counts, "summary": summary}
