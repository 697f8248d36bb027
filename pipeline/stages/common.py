"""Helpers shared by the TRL-based stages: training arguments, LoRA config, saving a model."""

from __future__ import annotations

from pipeline.config import LoraConfig


def peft_config(lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig

    # A reward model's score head is new: train it fully beside the adapter.
    extra = {"modules_to_save": ["score"]} if task_type == "SEQ_CLS" else {}
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type=task_type, **extra)


def zero_config(cfg, ctx, precision: str) -> dict | None:
    """The stage's DeepSpeed config (`deepspeed:` key or `rlhf run --deepspeed`), filled from its optim block."""
    if not getattr(cfg, "deepspeed", None):
        return None
    from pipeline.distributed import load_zero_config

    return load_zero_config(cfg.deepspeed, cfg.optim, precision, f"stages.{ctx.name}")


def training_args(cls, cfg, ctx, precision: str, **extra):
    """TRL config shared by the TRL-based stages: explicit precision, seeds, our logging, no hub."""
    import torch

    from pipeline.tracking import report_to

    o = cfg.optim
    return cls(
        output_dir=str(ctx.work_dir / "checkpoints"),
        learning_rate=o.lr,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        lr_scheduler_type=o.scheduler,
        max_grad_norm=o.max_grad_norm,
        logging_steps=o.logging_steps,
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
        deepspeed=zero_config(cfg, ctx, precision),
        # TRL's configs default to gradient checkpointing on; ours is off unless the stage turns it on
        activation_checkpointing=cfg.gradient_checkpointing,
        **extra,
    )


def save_model(model, tokenizer, out_dir, merge: bool) -> bool:
    """Save a model as safetensors + tokenizer; a peft model is merged or saved as an adapter. Returns is_adapter."""
    import os
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge:
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return is_peft and not merge


def save_trained(trainer, tokenizer, out_dir, merge: bool) -> bool:
    """Save a trained HF/TRL model. Under DeepSpeed every rank takes part (ZeRO-3 weights are gathered) and
    rank 0 writes a plain safetensors model that loads without DeepSpeed. Returns True for an adapter."""
    if trainer.is_deepspeed_enabled:
        import os
        import shutil

        from pipeline.distributed import barrier, is_main

        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        trainer.save_model(str(tmp))  # collective under ZeRO-3; rank 0 writes
        is_peft = hasattr(trainer.model, "peft_config")
        if is_main():
            if is_peft and merge:
                from pipeline.models import load_causal_lm

                merged = load_causal_lm(str(tmp)).merge_and_unload()
                shutil.rmtree(tmp)
                merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out_dir)
        barrier()
        return is_peft and not merge
    return save_model(trainer.model, tokenizer, out_dir, merge)


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


def fit(trainer, ctx, cfg):
    """trainer.train() with our checkpoint marks, resuming from ctx.resume_from when set."""
    from pipeline import checkpoint

    stop = checkpoint.stop_after_step()
    trainer.add_callback(checkpoint.hf_callback(ctx.work_dir / "checkpoints", ctx.checkpoint_meta,
                                                cfg.checkpoint.keep, stop))
    result = trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    if stop is not None and trainer.state.global_step < trainer.state.max_steps:
        raise checkpoint.Stopped(f"[{ctx.name}] stopped after step {trainer.state.global_step} "
                                 "(RLHF_STOP_AFTER_STEP); continue with --resume")
    return result

