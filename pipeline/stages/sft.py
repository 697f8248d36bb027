"""SFT stage: supervised fine-tuning on chat or prompt/completion data with TRL's SFTTrainer.

    rlhf run configs/tiny.yaml --stage sft

Tuning modes: `full`; `lora` (peft; merged into the weights or kept as an adapter);
`freeze` (full fine-tuning with the embeddings and the lowest `freeze_layers` layers frozen).
By default the loss covers the assistant's tokens only (via the chat template's
`{% generation %}` markers). Writes a `policy` artifact: `model/` (safetensors + tokenizer).
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.blocks import OptimConfig, Strict, TrainingBlock
from pipeline.stages.common import (check_finite, fit, load_policy, logits_fingerprint, memory_metrics, peft_config,
                                    perf_metrics, save_policy, training_args, weights_dtype)
from rlhf.errors import InvalidInput
from pipeline import artifacts
from pipeline.arrow import plain_messages, procs, seeded_order
from pipeline.data import DEFAULT_SPLIT, check_examples, iter_examples, neutralised, resolve_data_path
from pipeline.distributed import say, world_size
from pipeline.models import count_parameters, resolve_precision
from pipeline.tracking import readable_progress, trainer_callback



class SFTDataConfig(Strict):
    train: str = Field(description="JSONL/JSON/CSV/Parquet file, a local dataset directory, or synthetic:sft")
    split: str | None = Field(None, description="train is a DatasetDict directory: the split to read (default: "
                              "train; refused without one when there is no train split)")
    eval: str | None = Field(None, description="held-out file; without it `eval_fraction` of train is held out")
    eval_split: str | None = Field(None, description="eval is a DatasetDict directory: the split to read (no "
                                   "default: a DatasetDict as data.eval needs it)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="without data.eval: share of the training rows held out "
                                 "(seeded)")
    format: Literal["auto", "messages", "prompt_completion"] = Field("auto", description="row format; auto: messages "
                                                                     "if the row has it, else prompt/completion")
    on_error: Literal["fail", "skip"] = Field("fail", description="fail: stop on any bad row; skip: leave bad rows "
                                              "out, listed with their reasons in rejected.jsonl")
    max_rows: int | None = Field(None, ge=1, description="use only the first N valid training rows")

    @model_validator(mode="after")
    def _used(self):
        self.refuse_unused(("eval_fraction",), self.eval is None, "with an eval file (data.eval)")
        self.refuse_unused(("eval_split",), self.eval is not None, "without an eval file (data.eval)")
        return self


class PromptTuningConfig(Strict):
    """peft's prompt tuning: `num_virtual_tokens` trained embeddings put before every input (the model is frozen)."""

    num_virtual_tokens: int = Field(8, ge=1, description="trained embeddings put before every input")
    init_text: str | None = Field(None, description="initialise the virtual tokens from this text's embeddings "
                                  "(default: random)")


class SFTStageConfig(TrainingBlock):
    stage: Literal["sft"] = Field(description="the method: supervised fine-tuning (TRL's SFTTrainer)")
    groups_by_length: ClassVar[bool] = True  # one length per row (blocks.TrainingBlock)
    model: str = Field(description="a key of `models`, stage:NAME, or a model reference")
    data: SFTDataConfig = Field(description="the demonstrations and how to read them")
    tuning: Literal["full", "lora", "freeze", "prompt_tuning"] = Field("full", description="full, lora, freeze (the "
                                                                       "lowest freeze_layers frozen) or prompt_tuning "
                                                                       "(the model frozen, virtual tokens trained)")
    prompt_tuning: PromptTuningConfig = Field(default_factory=PromptTuningConfig, description="peft's prompt tuning; "
                                              "only with tuning: prompt_tuning")
    freeze_layers: int = Field(0, ge=0, description="with tuning: freeze, the lowest N decoder layers (and embeddings)")
    assistant_only_loss: bool = Field(True, description="the loss covers the assistant's tokens only (through the "
                                      "chat template's generation markers)")
    packing: bool = Field(False, description="pack several examples into each max_length sequence")
    max_length: int = Field(512, ge=8, description="tokens per example (or per packed sequence)")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser, schedule and batches")

    @model_validator(mode="after")
    def _check(self):
        if self.tuning == "freeze" and self.freeze_layers == 0:
            raise ValueError("freeze_layers: tuning 'freeze' needs freeze_layers >= 1")
        self.refuse_unused(("freeze_layers",), self.tuning == "freeze", "without tuning: freeze")
        self.refuse_unused(("prompt_tuning",), self.tuning == "prompt_tuning", "without tuning: prompt_tuning")
        if self.packing and self.optim.group_by_length:
            raise ValueError("optim.group_by_length has no effect with packing: packed sequences are all max_length "
                             "tokens long")
        if self.optim.eval_steps is not None and self.data.eval is None and self.data.eval_fraction == 0:
            raise ValueError("optim.eval_steps: there is no eval split (no data.eval and data.eval_fraction: 0)")
        return self

    def inputs(self) -> dict[str, tuple[str, str]]:
        out = {"model": (self.model, "model"), "train_data": (self.data.train, "data")}
        if self.data.eval:
            out["eval_data"] = (self.data.eval, "data")
        return out


# --------------------------------------------------------------------------- data


Config = SFTStageConfig  # the registry's handle (pipeline/stages/__init__.py)


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` of the rows held out (at least one when fraction > 0); both
    keep the file's order, so that `data.max_rows` takes the first N training rows."""
    train, held = held_out_rows(len(rows), fraction, seed)
    return [rows[i] for i in train], [rows[i] for i in held]


def held_out_rows(n: int, fraction: float, seed: int):
    """hold_out on row numbers: (train rows, eval rows), each in file order, as arrays."""
    import numpy as np

    k = max(1, int(round(n * fraction))) if fraction > 0 else 0
    held = np.sort(seeded_order(n, seed)[:k])
    train = np.ones(n, dtype=bool)
    train[held] = False
    return np.flatnonzero(train), held


def trl_drops(tokenizer, example: dict, max_length: int, assistant_only_loss: bool, packing: bool) -> str | None:
    """Why TRL's SFTTrainer will not train on `example` ({"messages": [...]}), or None when it will. TRL tokenises
    the conversation with the chat template (with its assistant-token mask when assistant_only_loss), truncates it
    to max_length (not when packing: packing cuts sequences itself) and drops every example with no trained token
    left, without a word: a long prompt leaves no assistant token."""
    if packing:
        return None
    out = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only_loss)
    if not assistant_only_loss:
        return None if out["input_ids"][:max_length] else "no token to train on"
    mask = list(out["assistant_masks"])
    if 1 in mask[:max_length]:
        return None
    if 1 not in mask:
        return "no assistant token (the chat template marks none: is its {% generation %} block missing?)"
    return (f"no assistant token within max_length {max_length}: the conversation before the first assistant "
            f"reply is {mask.index(1)} tokens")


def _trainable(cfg: SFTStageConfig, ctx, tokenizer, train, evals, counts: dict) -> tuple:
    """The examples TRL will train and evaluate on, as datasets of {"messages"} rows with special tokens made text;
    the ones it would drop are listed with their reasons in skipped.jsonl and counted, never dropped unseen (as DPO
    does for its pairs). A batched map over the examples (in several processes for a large file), cached under
    RUN_DIR/.cache/datasets (pipeline/arrow.py)."""
    from datasets import Features, Value

    from pipeline import arrow

    features = Features({"messages": arrow.message_features(), "where": Value("string"), "reason": Value("string"),
                         "neutralised": Value("string")})
    kept: dict = {}
    skipped: list[dict] = []
    for split, rows in (("train", train), ("eval", evals)):
        mapped = arrow.map_rows(rows, _checked_batch, features, f"[{ctx.name}] {split} examples",
                                {"tokenizer": tokenizer, "max_length": cfg.max_length,
                                 "assistant_only_loss": cfg.assistant_only_loss, "packing": cfg.packing})
        table = mapped.data.table
        arrow.add_neutralised(table)
        skipped += [{**r, "split": split}
                    for r in arrow.where_set(table.select(["where", "reason"]), "reason").to_pylist()]
        kept[split] = arrow.without(mapped, "reason").select_columns(["messages"])
    if skipped:
        artifacts.write_jsonl(ctx.work_dir / "skipped.jsonl", [{k: r[k] for k in ("where", "split", "reason")}
                                                                for r in skipped])
        say(f"[{ctx.name}] {len(skipped)} examples not trained on (no assistant token left within max_length "
            f"{cfg.max_length}); reasons in skipped.jsonl")
    if not len(kept["train"]):
        raise InvalidInput(f"{cfg.data.train}: no example left to train on ({len(skipped)} skipped: see skipped.jsonl)")
    counts.update({"train": len(kept["train"]), "eval": len(kept["eval"]), **({"skipped": len(skipped)} if skipped
                                                                               else {})})
    return kept["train"], kept["eval"]


def _checked_batch(batch: dict, tokenizer, max_length: int, assistant_only_loss: bool, packing: bool) -> dict:
    """_trainable's map function: each example with its special tokens made text, and why TRL would drop it."""
    from pipeline.arrow import counted, plain_messages

    out: dict[str, list] = {"messages": [], "where": [], "reason": [], "neutralised": []}
    for where, messages in zip(batch["where"], batch["messages"]):
        ex, n = counted(neutralised, tokenizer, {"messages": messages})
        out["messages"].append(plain_messages(ex["messages"]))
        out["where"].append(where)
        out["reason"].append(trl_drops(tokenizer, ex, max_length, assistant_only_loss, packing))
        out["neutralised"].append(n)
    return out


# --------------------------------------------------------------------------- model set-up


def decoder_layers(model):
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise InvalidInput(f"tuning 'freeze': cannot find the decoder layers of {type(model).__name__}")


def freeze_lower(model, n: int) -> None:
    layers = decoder_layers(model)
    if n > len(layers):
        raise InvalidInput(f"freeze_layers is {n} but the model has only {len(layers)} layers")
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    for layer in list(layers)[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)


# --------------------------------------------------------------------------- run


def _example_rows(path: str, fmt: str, split: str | None, split_key: str, default_split: str | None, content: str):
    """An SFT file's rows for Dataset.from_generator (`content` only keys the cache: a changed file is read anew):
    each example or the reason it is invalid, and at the end how the file was read (rows holding only a note)."""
    notes: list[str] = []
    for where, ex, err, raw in iter_examples(path, fmt, split, split_key, default_split, notes=notes):
        yield {"where": where, "messages": plain_messages(ex["messages"]) if ex else None, "error": err, "raw": raw if err else None,
               "note": None}
    for note in notes:
        yield {"where": None, "messages": None, "error": None, "raw": None, "note": note}


def _read(ctx, path, fmt: str, on_error: str, rejected: list, split: str | None, split_key: str,
          default_split: str | None = DEFAULT_SPLIT):
    """(the valid examples as an Arrow dataset of {"where", "messages"}, rows read) of one SFT file, read once per
    file content into RUN_DIR/.cache/datasets; invalid rows raise (fail) or go to `rejected` (skip), as read_examples
    does."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Features, Value

    from pipeline import arrow

    features = Features({"where": Value("string"), "messages": arrow.message_features(), "error": Value("string"),
                         "raw": Value("string"), "note": Value("string")})
    rows = arrow.generate(_example_rows, features, arrow.cache_dir(ctx.run_dir),
                          {"path": str(path), "fmt": fmt, "split": split, "split_key": split_key,
                           "default_split": default_split, "content": arrow.content_key(path)})
    table = rows.data.table
    for note in arrow.where_set(table.select(["note"]), "note").column("note").to_pylist():
        say(f"note: {note}")
    bad = arrow.where_set(table.select(["where", "error", "raw"]), "error").to_pylist()
    rejected += [{"where": r["where"], "reason": r["error"], "row": r["raw"]} for r in bad]
    is_note = pc.is_valid(table.column("note")).to_numpy(zero_copy_only=False)
    n = len(rows) - int(is_note.sum())
    check_examples(path, on_error, n, [f"{r['where']}: {r['error']}" for r in bad])
    valid = np.flatnonzero(pc.is_null(table.column("error")).to_numpy(zero_copy_only=False) & ~is_note)
    return rows.select(valid).select_columns(["where", "messages"]), n


def _data(cfg: SFTStageConfig, ctx) -> tuple:
    """(train, eval, counts): datasets of {"where", "messages"} (where: the example's FILE:LINE); rejected rows written
    to rejected.jsonl with their reasons."""
    rejected: list[dict] = []
    d = cfg.data
    train, n_train = _read(ctx, resolve_data_path(d.train), d.format, d.on_error, rejected, d.split, "data.split")
    if d.eval:
        evals, n_eval = _read(ctx, resolve_data_path(d.eval), d.format, d.on_error, rejected, d.eval_split,
                              "data.eval_split", default_split=None)
    else:
        n_eval = 0
        kept, held = held_out_rows(len(train), cfg.data.eval_fraction, ctx.seed)
        train, evals = train.select(kept), train.select(held)
    unused = max(0, len(train) - cfg.data.max_rows) if cfg.data.max_rows else 0
    if unused:
        train = train.select(range(cfg.data.max_rows))  # the first N training rows, in file order
    if rejected:
        artifacts.write_jsonl(ctx.work_dir / "rejected.jsonl", rejected)
        say(f"[{ctx.name}] skipped {len(rejected)} invalid rows; reasons in rejected.jsonl")
    return train, evals, {"rows_read": n_train + n_eval, "accepted": n_train + n_eval - len(rejected),
                          "rejected": len(rejected), "train": len(train), "eval": len(evals),
                          **({"unused_beyond_max_rows": unused} if unused else {})}


def _peft(cfg: SFTStageConfig, path: str):
    """The peft config of a LoRA or prompt-tuning run (None for full and freeze)."""
    if cfg.tuning == "lora":
        return peft_config(cfg.lora)
    if cfg.tuning != "prompt_tuning":
        return None
    from peft import PromptTuningConfig as PeftPromptTuning

    pt = cfg.prompt_tuning
    init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": pt.init_text, "tokenizer_name_or_path": path} \
        if pt.init_text else {"prompt_tuning_init": "RANDOM"}
    return PeftPromptTuning(task_type="CAUSAL_LM", num_virtual_tokens=pt.num_virtual_tokens, **init)


def run(cfg: SFTStageConfig, ctx) -> dict:
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from pipeline.deepspeed import zero_stage  # deferred: it imports torch

    set_seed(ctx.seed)
    train, evals, counts = _data(cfg, ctx)
    precision = resolve_precision(cfg.precision)
    path, model_info, tokenizer, model = load_policy(ctx, cfg.model, role="model", merged=False)
    # special-token strings in the data become plain text first (what TRL tokenises), then what TRL would drop
    train, evals = _trainable(cfg, ctx, tokenizer, train, evals, counts)
    if cfg.tuning == "freeze":
        freeze_lower(model, cfg.freeze_layers)
    args = training_args(SFTConfig, cfg, ctx, precision, max_length=cfg.max_length, packing=cfg.packing,
                         assistant_only_loss=cfg.assistant_only_loss, dataset_num_proc=procs(len(train)))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train,
                         eval_dataset=evals if len(evals) else None, processing_class=tokenizer,
                         peft_config=_peft(cfg, path),
                         callbacks=[trainer_callback(ctx.metrics)])
    readable_progress(trainer, ctx.name)
    if not cfg.packing:  # packed, TRL's rows are sequences of max_length tokens, not examples
        for split, ours, theirs in (("train", train, trainer.train_dataset), ("eval", evals, trainer.eval_dataset)):
            dropped = len(ours) - (len(theirs) if theirs is not None else 0)
            if dropped:  # TRL filtered rows our check did not foresee: say so rather than overstate what was used
                counts[f"dropped_by_trl_{split}"] = dropped
                say(f"[{ctx.name}] warning: TRL dropped {dropped} more {split} examples than predicted")
    total, trainable = count_parameters(trainer.model)
    say(f"[{ctx.name}] {len(train)} train / {len(evals)} eval examples; "
        f"{trainable:,} of {total:,} parameters trainable ({cfg.tuning})")

    metrics: dict[str, float] = {}
    if len(evals) and not trainer.is_deepspeed_enabled:  # HF evaluates under DeepSpeed only once the engine exists
        metrics["eval/loss_initial"] = trainer.evaluate()["eval_loss"]
    t0 = time.time()
    result = fit(trainer, ctx, cfg)
    seconds = time.time() - t0
    if len(evals):
        metrics["eval/loss"] = trainer.evaluate()["eval_loss"]
    check_finite(ctx, metrics)
    if "train/loss" not in ctx.metrics.last:  # fewer steps than logging_steps: nothing per-step was logged
        metrics["train/loss"] = result.training_loss
    ctx.metrics.log(metrics, step=trainer.state.global_step)

    fingerprint = logits_fingerprint(trainer.model, tokenizer)
    is_adapter = save_policy(trainer, trainer.model, tokenizer, ctx.work_dir / "model", merge=cfg.lora.merge,
                             trust_remote_code=model_info.get("trust_remote_code", False),
                             revision=model_info.get("revision"))
    steps = trainer.state.global_step
    summary = (f"{steps} steps in {seconds:.1f}s; train/loss {ctx.metrics.last.get('train/loss', float('nan')):.4f}"
               + (f", eval/loss {metrics['eval/loss_initial']:.4f} -> {metrics['eval/loss']:.4f}"
                  if "eval/loss_initial" in metrics else f", eval/loss {metrics['eval/loss']:.4f}" if evals else "")
               + f"; artifact: {ctx.run_dir / ctx.name / 'model'}")
    outputs = {"model": "model", "metrics": "metrics.jsonl"}
    if (ctx.work_dir / "skipped.jsonl").exists():
        outputs["skipped"] = "skipped.jsonl"
    return {
        "kind": "policy",
        "outputs": outputs,
        "metrics": {**metrics, "train/steps": steps, "train/seconds": round(seconds, 2), **perf_metrics(result),
                    **memory_metrics()},
        "counts": counts,
        "extra": {"model": {**model_info, "adapter": is_adapter, "tuning": cfg.tuning,
                            "parameters": total, "trainable": trainable, "precision": precision,
                            "weights_dtype": weights_dtype(model)},
                  "check": {"logits_fingerprint": fingerprint},
                  "distributed": {"world_size": world_size(), "zero_stage": zero_stage(args.deepspeed)}},
        "summary": summary,
    }
