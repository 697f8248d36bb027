"""The steps every training stage shares, written once: load a policy with its model spec, a TRL config with
our precision / DeepSpeed / checkpoint / tracking settings, train with our checkpoint marks, check that what
was trained is finite, save a policy (merged or an adapter, gathered under ZeRO-3), and the checks the
manifest records.

    path, info, tok, model = load_policy(ctx, cfg.policy)        # trust_remote_code and revision every time
    args = training_args(DPOConfig, cfg, ctx, precision, beta=cfg.beta, ...)
    fit(trainer, ctx, cfg)
    check_finite(ctx, {"train/loss": loss, "eval/loss": ...})
    is_adapter = save_policy(trainer, model, tok, ctx.work_dir / "model", merge=cfg.lora.merge, revision=info["revision"])
"""

from __future__ import annotations

import math
import time

from pipeline.blocks import LoraConfig
from rlhf.errors import InvalidInput
from feedback.judges.rule import load_callable
from pipeline import checkpoint
from pipeline.artifacts import write_jsonl
from feedback.schema import prompt_key
from pipeline.data import read_prompts, resolve_data_path, rule_eval
from pipeline.distributed import any_rank, gather, say
from pipeline.mfu import FlopCounter
from pipeline.models import load_causal_lm, load_tokenizer, resolve_precision
from pipeline.tracking import report_to


def load_policy(ctx, ref: str, role: str = "policy", merged: bool = True, precision: str = "fp32"):
    """(path, model info for the manifest, tokenizer, causal LM) for a stage's `policy:`/`model:` value, loaded
    with its trust_remote_code and revision; an adapter artifact is merged into its base first (merged=True,
    see StageContext.model_path). Weights are fp32 unless asked: bf16/fp16 train as mixed precision."""
    path, info = ctx.model_path(ref, role=role, merged=merged)
    trust, revision = info.get("trust_remote_code", False), info.get("revision")
    return path, info, load_tokenizer(path, trust, revision), load_causal_lm(path, precision, trust, revision)


def peft_config(lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig

    # A reward model's score head is new: train it fully beside the adapter.
    extra = {"modules_to_save": ["score"]} if task_type == "SEQ_CLS" else {}
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type=task_type, **extra)


def training_args(cls, cfg, ctx, precision: str, **extra):
    """TRL config shared by the TRL-based stages: explicit precision, seeds, our logging, no hub."""
    import torch

    from pipeline.deepspeed import zero_config  # deferred: it imports torch

    o = cfg.optim
    return cls(
        output_dir=str(ctx.work_dir / "checkpoints"),
        learning_rate=o.lr,
        num_train_epochs=o.epochs if o.epochs is not None else 1.0,
        max_steps=o.max_steps,
        per_device_train_batch_size=o.per_device_batch_size,
        per_device_eval_batch_size=o.per_device_batch_size,
        gradient_accumulation_steps=o.grad_accum,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        lr_scheduler_type=o.scheduler,
        max_grad_norm=o.max_grad_norm,
        logging_steps=o.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and stops fit), not replaced by a mean
        eval_strategy="steps" if o.eval_steps else "no",
        eval_steps=o.eval_steps,
        # checkpoints: HF writes them, hf_callback marks them complete and rotates (one spare kept
        # so that a kill between HF's rotation and our mark never leaves no complete checkpoint)
        save_strategy="steps" if cfg.checkpoint.every else "no",
        save_steps=cfg.checkpoint.every or None,
        save_total_limit=cfg.checkpoint.keep + 1 if cfg.checkpoint.every else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=ctx.seed,
        data_seed=ctx.seed,
        report_to=report_to(ctx.pipeline.tracking),
        disable_tqdm=False,
        push_to_hub=False,
        deepspeed=zero_config(cfg, precision),
        # TRL's configs default to gradient checkpointing on; ours is off unless the stage turns it on
        activation_checkpointing=cfg.gradient_checkpointing,
        # a method may need its own order (KTO: sequential, its KL estimate pairs neighbours in a batch)
        train_sampling_strategy=extra.pop("train_sampling_strategy", "group_by_length" if o.group_by_length
                                          else "random"),
        length_column_name="length",  # the reward stage's rows carry one; SFT's are measured by their input_ids
        **extra,
    )


def pair_datasets(ctx, cfg, files: dict, convert, columns: dict, what: str = "pairs", unpaired: bool = False,
                  expand=None) -> tuple[dict, dict]:
    """The rows a pairwise trainer (reward model, DPO; KTO-style methods alike) takes, from the canonical JSONL files
    of a preferences artifact by split ({"train": file, "eval": file}), as memory-mapped Arrow datasets written
    under RUN_DIR/.cache/datasets (pipeline/arrow.py: tokenised once per input, in several processes for a large
    file). `convert(pair, split)` gives (row, None), or (None, reason) for a pair the method cannot learn from (a
    tie, a prompt that leaves no response token): those are listed in skipped.jsonl with their split and reason and
    counted, never dropped silently. `columns` ({name: datasets feature}) are the row's columns; `expand(item)` turns
    one canonical row into several (KTO: a pair into its two answers). No pair left to train on, or
    optim.eval_steps with no eval pair, is an error naming the file. Returns (datasets by split, holding `columns`
    and the meta columns of pipeline.arrow.META: select the trainer's columns; counts: read / kept by split,
    skipped, skipped by reason)."""
    from datasets import Features

    from pipeline import arrow

    cache = arrow.cache_dir(ctx.run_dir)
    features = Features({**columns, **arrow.meta_features()})
    rows: dict = {}
    read: dict[str, int] = {}
    skipped: list[dict] = []
    for split, path in files.items():
        lines = arrow.jsonl_lines(path, cache)
        mapped = arrow.map_rows(lines, _pair_batch, features, f"[{ctx.name}] {split} {what}",
                                {"split": split, "convert": convert, "columns": tuple(columns), "unpaired": unpaired,
                                 "expand": expand})
        read[split] = len(mapped)
        rows[split], left_out = arrow.settle(mapped, path, list(columns))
        skipped += [{"id": s["id"], "split": split, "reason": s["reason"]} for s in left_out]
    if skipped:
        write_jsonl(ctx.work_dir / "skipped.jsonl", skipped)
        reasons = sorted({s["reason"].split(":")[0] for s in skipped})
        say(f"[{ctx.name}] {len(skipped)} {what} not used ({'; '.join(reasons)}); reasons in skipped.jsonl")
    if not len(rows["train"]):
        raise InvalidInput(f"{files['train']}: no {what} to train on ({len(skipped)} skipped: see skipped.jsonl)")
    if getattr(cfg.optim, "eval_steps", None) is not None and not len(rows.get("eval") or ()):
        raise InvalidInput(f"optim.eval_steps: {files['eval']} holds no usable eval {what} to evaluate on")
    by_reason: dict[str, int] = {}
    for s_ in skipped:
        key = s_["reason"].split(":")[0]
        by_reason[key] = by_reason.get(key, 0) + 1
    counts = {"read": read, "kept": {k: len(v) for k, v in rows.items()}, "skipped": len(skipped),
              "skipped_by_reason": by_reason}
    return rows, counts


def _pair_batch(batch: dict, split: str, convert, columns: tuple, unpaired: bool, expand) -> dict:
    """A batch of canonical JSONL lines -> their training rows (pair_datasets' map function): each line parsed as
    read_pairs parses it, expanded, converted; the meta columns say what became of each row (pipeline.arrow)."""
    import json

    from feedback.schema import from_dict, unpaired_from_dict
    from pipeline.arrow import META, counted, plain_messages

    parse = unpaired_from_dict if unpaired else from_dict
    out: dict[str, list] = {k: [] for k in (*columns, *META)}
    for line, text in zip(batch["line"], batch["text"]):
        try:
            item, error = parse(json.loads(text))
        except json.JSONDecodeError as exc:
            item, error = None, f"invalid JSON: {exc.msg}"
        for it in ([None] if error else expand(item) if expand else [item]):
            (row, reason), neutralised = counted(convert, it, split) if it is not None else ((None, None), None)
            for c in columns:
                out[c].append(plain_messages(row[c]) if row is not None and c in row else None)
            out["line"].append(line)
            out["id"].append(getattr(it, "id", None))
            out["source"].append(getattr(it, "source", None))
            out["reason"].append(reason)
            out["error"].append(error)
            out["neutralised"].append(neutralised)
    return out


def trainer_rows(rows, columns: list[str]):
    """A pair_datasets dataset with only the columns a trainer reads (TRL keeps every column it is given)."""
    return rows.select_columns(columns) if rows is not None else None


def chat_prompt_tokens(tok, prompt: list, replies: list) -> int:
    """How many tokens of a conversational row TRL counts as its prompt (DPO, KTO: the prompt rendered with the
    generation prompt, cut where it stops being a prefix of the prompt followed by any of `replies`)."""
    def ids(msgs, **kw):
        return tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"]

    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    start = ids(prompt, add_generation_prompt=True)
    return min(common(start, ids(prompt + reply)) for reply in replies)


def held_out_prompts(cfg, eval_items) -> tuple[list, str]:
    """cfg.eval_prompts restricted to the prompts of the held-out preference rows (`eval_items`, read once: a
    read_pairs iterator will do; the first 64 when none of them are held out), and what they are, as the summary names them (DPO, KTO: the rule reward before and after)."""
    if not cfg.eval_prompts:
        return [], ""

    prompts = read_prompts(resolve_data_path(cfg.eval_prompts), split=cfg.eval_prompts_split,
                           split_key="eval_prompts_split")
    held = {prompt_key(p.prompt) for p in eval_items}
    kept = [p for p in prompts if prompt_key(p) in held]
    if kept:
        return kept, f"the {len(kept)} prompts of {cfg.eval_prompts} the preferences stage held out"
    return prompts[:64], f"the first {len(prompts[:64])} prompts of {cfg.eval_prompts} (none of them held out)"


def offline_trainer(trainer_cls, cfg, ctx, args, model, tok, train, evals, counts: dict, described: str):
    """A TRL trainer of a policy on recorded preferences (DPO, KTO) over `train` and `evals` rows (datasets holding
    only the columns TRL reads; `evals` may be empty). Full tuning: the
    reference is a frozen copy of the policy as loaded (TRL would reload it from the policy's path without its
    revision); LoRA: the disabled adapter; precomputed: no reference kept. Rows TRL filters beyond what the stage
    predicted are counted (counts.dropped_by_trl) and said; `described` (the rows, weights) opens the line that
    says what is trained."""
    import copy

    from pipeline.models import count_parameters
    from pipeline.tracking import readable_progress, trainer_callback

    reference = copy.deepcopy(model) if cfg.tuning == "full" and not cfg.precompute_ref_log_probs else None
    trainer = trainer_cls(model=model, ref_model=reference, args=args, train_dataset=train,
                          eval_dataset=evals if len(evals) else None, processing_class=tok,
                          peft_config=peft_config(cfg.lora) if cfg.tuning == "lora" else None,
                          callbacks=[trainer_callback(ctx.metrics)])
    readable_progress(trainer, ctx.name)
    dropped = len(train) - len(trainer.train_dataset)
    if dropped:  # TRL filtered rows our check did not foresee: say so rather than overstate what was trained
        counts["dropped_by_trl"] = dropped
        say(f"[{ctx.name}] warning: TRL dropped {dropped} more training rows than predicted")
    total, trainable = count_parameters(trainer.model)
    say(f"[{ctx.name}] {described}; {trainable:,} of {total:,} parameters trainable ({cfg.tuning}); reference: "
        f"{'disabled adapter' if cfg.tuning == 'lora' else 'frozen copy'}")
    return trainer


def train_and_save(trainer, ctx, cfg, tok, info: dict, rule, metrics: dict, eval_keys: tuple, has_eval: bool) -> dict:
    """Train (fit), read the held-out `eval_keys` from the trainer's evaluation, the rule reward after, check that
    everything is finite, and save the policy: the stage result's outputs, metrics and extra (model, check), and
    the steps and seconds trained, for the stage to complete with its counts and summary (DPO, KTO)."""
    from pipeline.models import count_parameters

    total, trainable = count_parameters(trainer.model)  # before a LoRA adapter is merged
    dtype = weights_dtype(trainer.model)
    t0 = time.time()
    metrics.update(perf_metrics(fit(trainer, ctx, cfg)))
    seconds = time.time() - t0
    if has_eval:
        ev = trainer.evaluate()
        metrics.update({k: ev[f"eval_{k}"] for k in eval_keys if f"eval_{k}" in ev})
        metrics["eval/loss"] = ev["eval_loss"]
    model_out = final_model(trainer, cfg.lora.merge)
    rule.after(ctx, trainer, model_out, tok, metrics)
    check_finite(ctx, metrics)
    ctx.metrics.log(metrics, step=trainer.state.global_step)
    fingerprint = logits_fingerprint(model_out, tok) if not hasattr(model_out, "peft_config") else None
    is_adapter = save_policy(trainer, model_out, tok, ctx.work_dir / "model", merge=cfg.lora.merge,
                             trust_remote_code=info.get("trust_remote_code", False), revision=info.get("revision"))
    steps = trainer.state.global_step
    outputs = {"model": "model", "metrics": "metrics.jsonl"}
    if (ctx.work_dir / "skipped.jsonl").exists():
        outputs["skipped"] = "skipped.jsonl"
    return {"kind": "policy", "outputs": outputs, "steps": steps, "seconds": seconds,
            "metrics": {**metrics, "train/steps": steps, "train/seconds": round(seconds, 2), **memory_metrics()},
            "extra": {"model": {**info, "tuning": cfg.tuning, "adapter": is_adapter, "parameters": total,
                                "trainable": trainable, "weights_dtype": dtype},
                      "check": {"logits_fingerprint": fingerprint}}}


def last_logged(trainer, keys: tuple) -> dict:
    """The values of `keys` in the trainer's last training log that has them all ({} if none has): what a stage
    without held-out rows can report, labelled as training numbers."""
    for entry in reversed(trainer.state.log_history):
        if all(k in entry for k in keys):
            return {k: entry[k] for k in keys}
    return {}


def prompts_within(cfg, ctx, prompts: list, tok) -> tuple[list, int]:
    """The prompts of at most cfg.max_prompt_tokens chat-templated tokens, in file order, and how many were not: those
    are listed in skipped.jsonl (their place in the prompt file and their length), never dropped unseen. Sampling
    time and memory grow with the longest prompt of a batch (PPO, GRPO, RLOO)."""
    from rlhf.text import chat_ids_batch, uncounted

    limit = cfg.max_prompt_tokens
    if limit is None:
        return prompts, 0
    with uncounted():  # the samplers count what they neutralise when they use the prompt
        lengths = [len(ids) for ids in chat_ids_batch(tok, prompts)]  # as they render it
    skipped = [{"where": f"{cfg.prompts}: prompt {i + 1}", "reason": f"prompt over max_prompt_tokens: {n} tokens > "
                f"{limit}"} for i, n in enumerate(lengths) if n > limit]
    if skipped:
        write_jsonl(ctx.work_dir / "skipped.jsonl", skipped)
        say(f"[{ctx.name}] {len(skipped)} of {len(prompts)} prompts over max_prompt_tokens {limit} not used (the "
            f"longest has {max(lengths)} tokens); listed in skipped.jsonl")
    return [p for p, n in zip(prompts, lengths) if n <= limit], len(skipped)


def held_out_summary(trainer, metrics: dict, has_eval: bool, keys: tuple, rows: str = "pairs") -> str:
    """The held-out values of `keys` for a stage's summary line; without held-out rows (the preferences'
    eval_fraction 0) it says so and gives the last training log's values, labelled as such, rather than nothing."""
    values = lambda got: ", ".join(f"{k} {got.get(k, float('nan')):.3f}" for k in keys)  # noqa: E731
    if has_eval:
        return f"held-out {values(metrics)}"
    last = last_logged(trainer, keys)
    return f"no held-out {rows}" + (f"; the last logged training step's {values(last)}" if last else "")


def trl_choices(config_cls, field: str) -> tuple[str, ...]:
    """The values a TRL config documents for `field` ("Possible values are: `'sigmoid'`, ..." or "Supported values
    are 'grpo', ..., and 'vespo'."), so that a stage's setting is checked against the TRL that is installed. TRL
    keeps no list constant for them; a help text this cannot read is an error that says so, never an empty list."""
    import re

    help_text = config_cls.__dataclass_fields__[field].metadata.get("help", "")
    sentence = re.search(r"(?:Possible|Supported) values are:?(.*?)\.(?:\s|$)", help_text, re.S)
    values = tuple(re.findall(r"'(\w+)'", sentence.group(1))) if sentence else ()
    if not values:
        raise RuntimeError(f"cannot read the {field} values of the installed TRL's {config_cls.__name__}; please "
                           "report this with your TRL version")
    return values


def fit(trainer, ctx, cfg):
    """trainer.train() with our checkpoint marks, resuming from ctx.resume_from when set, stopped at the first
    non-finite training loss or gradient norm it logs (training_args turns off transformers' filter that would
    log a NaN loss as the mean of the earlier ones), and refused when the trained weights are not all finite. The
    forwards of the trained model, its reference and reward models are counted for the stage's MFU
    (perf_metrics(result))."""
    stop = checkpoint.stop_after_step()
    trainer.add_callback(checkpoint.hf_callback(ctx.work_dir / "checkpoints", ctx.checkpoint_meta,
                                                cfg.checkpoint.keep, stop))
    trainer.add_callback(_stop_when_diverged(ctx.name))
    t0 = time.time()
    with FlopCounter(policy=trainer.model, reference=getattr(trainer, "ref_model", None),
                     **{f"reward_{i}": f for i, f in enumerate(getattr(trainer, "reward_funcs", None) or [])
                        if hasattr(f, "parameters")}) as flops:
        result = trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    # the model FLOPs utilisation of the training (pipeline/mfu.py), in the stage's metrics: perf_metrics(result)
    result.metrics.update(flops.metrics(time.time() - t0, resolve_precision(cfg.precision)))
    if stop is not None and trainer.state.global_step < trainer.state.max_steps:
        raise checkpoint.Stopped(f"[{ctx.name}] stopped after step {trainer.state.global_step} "
                                 "(RLHF_STOP_AFTER_STEP); continue with --resume")
    check_finite(ctx, {"train/loss": result.training_loss})
    _check_weights_finite(ctx.name, trainer.model)
    return result


def perf_metrics(result) -> dict:
    """The perf/* metrics fit() measured (model FLOPs, FLOP/s, the matmul peak, MFU: pipeline/mfu.py)."""
    return {k: v for k, v in result.metrics.items() if k.startswith("perf/")}


def _diverged(name: str, what: str, value, step: int) -> InvalidInput:
    return InvalidInput(f"[{name}] {what} is {value} at step {step}: training diverged; stopped, no artifact written. "
                        "Lower optim.lr, or clip harder with a smaller optim.max_grad_norm")


def _stop_when_diverged(name: str):
    """A callback that raises at the first logged training loss or gradient norm that is NaN or infinite (every
    process logs the same reduced values, so all of them stop together)."""
    from transformers import TrainerCallback

    class _Stop(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise _diverged(name, f"train/{key}", value, state.global_step)

    return _Stop()


def _check_weights_finite(name: str, model) -> None:
    """Every trained weight finite on every process (under ZeRO-3 each checks its own shards), before anything is
    saved: a NaN that never showed in a logged loss still never reaches an artifact."""
    import torch

    bad = next((n for n, p in model.named_parameters()  # ZeRO-3: the shard this process holds (ds_tensor)
                if p.requires_grad and not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())), None)
    if any_rank(bad is not None):
        raise InvalidInput(f"[{name}] the trained weights are not finite ({bad or 'on another process'}): training "
                           "diverged; no artifact written. Lower optim.lr")


def check_finite(ctx, values: dict) -> None:
    """Stop before anything is saved when a loss, metric or reward is NaN or infinite (numbers or lists)."""
    for name, value in values.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(not math.isfinite(float(v)) for v in numbers):
            shown = value if not isinstance(value, (list, tuple)) else "not finite"
            raise InvalidInput(f"[{ctx.name}] {name} is {shown}: training diverged; no artifact written")


def pin_adapter_base(model, revision: str | None) -> None:
    """Record the base model's revision in a peft model's adapter config (adapter_config.json), so that whatever
    loads the adapter later loads its base at that revision, not at the hub's main."""
    for config in (getattr(model, "peft_config", None) or {}).values():
        if revision is not None:
            config.revision = revision


def save_model(model, tokenizer, out_dir, merge: bool, revision: str | None = None) -> bool:
    """Save a model as safetensors + tokenizer; a peft model is merged or saved as an adapter, which records its base's
    `revision` (a hub id's). Returns is_adapter."""
    import os
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge and mergeable(model):
        model = model.merge_and_unload()
    merge = merge and (not is_peft or mergeable(model))  # prompt tuning stays an adapter: it has no weights to merge
    pin_adapter_base(model, revision)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return is_peft and not merge


def mergeable(model) -> bool:
    """A peft model whose adapter can be folded into the base weights (LoRA); prompt tuning cannot."""
    configs = getattr(model, "peft_config", {}) or {}
    return all(str(getattr(c, "peft_type", "")).split(".")[-1] == "LORA" for c in configs.values())


def save_policy(trainer, model, tokenizer, out_dir, merge: bool, trust_remote_code: bool = False,
                revision: str | None = None) -> bool:
    """The trained policy (or reward model) as safetensors + tokenizer in `out_dir`: under DeepSpeed gathered
    from the trainer's engine (pipeline/deepspeed.py), otherwise `model` (the trainer's, or a merged copy).
    An adapter is merged into its base unless `merge` is false (under DeepSpeed the base is loaded again, with
    `trust_remote_code` as the stage loaded it); kept, it records the base's `revision`. Returns True when an
    adapter was saved."""
    if trainer is not None and trainer.is_deepspeed_enabled:
        from pipeline.deepspeed import save_trainer_model

        return save_trainer_model(trainer, tokenizer, out_dir, merge, trust_remote_code, revision)
    return save_model(model, tokenizer, out_dir, merge, revision)


def weights_dtype(model) -> str:
    """The dtype the weights are held in ("float32" under mixed precision: bf16/fp16 is the compute dtype)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def logits_fingerprint(model, tokenizer, n: int = 8) -> list[float]:
    """Logits of a fixed input (all ranks take part under ZeRO-3): a check that the saved model is the trained one."""
    import torch

    ids = torch.tensor([tokenizer("Tell me about the river.")["input_ids"]])
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=ids.to(device))
    return [round(float(x), 5) for x in out.logits[0].reshape(-1)[-n:].float().cpu()]


class RuleReward:
    """The held-out rule reward of one sample per prompt, before training (eval/rule_reward_mean_initial) and
    after it (eval/rule_reward_mean); DPO, GRPO and RLOO report it with `eval_rule`."""

    def __init__(self, spec: str | None, prompts: list, max_new_tokens: int, seed: int, named: str):
        self.rule = load_callable(spec) if spec and prompts else None
        self.prompts, self.max_new_tokens, self.seed = prompts, max_new_tokens, seed
        self.named = named  # which prompts, as the summary says them

    def _measure(self, model, tok) -> float:
        return rule_eval(model, tok, self.prompts, self.rule, self.max_new_tokens, self.seed)

    def before(self, model, tok, metrics: dict) -> None:
        if self.rule:
            metrics["eval/rule_reward_mean_initial"] = self._measure(model, tok)

    def after(self, ctx, trainer, model, tok, metrics: dict) -> None:
        if self.rule and trainer.is_deepspeed_enabled:
            say(f"[{ctx.name}] note: the held-out rule reward after training is not sampled under DeepSpeed")
            self.rule = None
        if self.rule:
            metrics["eval/rule_reward_mean"] = self._measure(model, tok)

    def summary(self, metrics: dict) -> str:
        if not self.rule:
            return ""
        return (f"; rule reward {metrics['eval/rule_reward_mean_initial']:.3f} -> "
                f"{metrics['eval/rule_reward_mean']:.3f} (its own samples of {self.named})")


def held_out_named(n: int, fraction: float, source: str) -> str:
    """Which prompts a stage's own before/after numbers are on, said where they are printed (the evaluate stage's
    table names its own set: the two are one set when their fraction, file and count agree; the samples differ)."""
    return f"{n} held-out prompts (eval_fraction {fraction} of {source})"


def final_model(trainer, merge: bool):
    """The trained model as it is evaluated and saved on one process: a LoRA adapter merged into its base when it
    is to be saved merged. (Under DeepSpeed, save_policy gathers the trainer's own model.)"""
    model = trainer.model
    if hasattr(model, "peft_config") and merge and mergeable(model) and not trainer.is_deepspeed_enabled:
        return model.merge_and_unload()
    return model


def reset_peak_memory() -> None:
    """Start a stage's peak-memory count afresh (Linux: writing 5 to clear_refs resets VmHWM), so that each stage
    of a run reports its own peak rather than the largest of every stage before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's since it started
    import sys

    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def _peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: VmHWM since the last reset, else ru_maxrss (since start)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def peak_memory() -> dict[str, list[float]]:
    """Peak resident memory (and GPU memory) of each process during this stage, in MiB, in rank order."""
    import torch

    out = {"peak_rss_mib": gather(torch.tensor([_peak_rss_mib()]))}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = gather(torch.tensor([torch.cuda.max_memory_allocated() / 2**20]))
    return {k: [round(x, 1) for x in v.tolist()] for k, v in out.items()}


def memory_metrics() -> dict[str, float]:
    """memory/peak_rss_mib (and memory/peak_gpu_mib): the largest peak over the processes, for the manifest."""
    return {f"memory/{k}": max(v) for k, v in peak_memory().items()}
