"""Metrics: one `metrics.jsonl` per stage with the DESIGN.md names, and wandb (offline unless told).

TRL and the HF Trainer log `loss`, `eval_loss`, `eval_rewards/margins`, ...; `metric_name`
maps them to our names (`train/loss`, `eval/loss`, `eval/rewards/margins`) so that
metrics.jsonl, wandb and the manifest use one vocabulary.

With `tracking: {wandb: true}` each stage gets one wandb run (stage_wandb, called by the runner), named after
the stage, grouped by the run directory, its files under RUN_DIR/wandb; once the stage completes, the report's
plots and tables go to it (log_report, given them by pipeline.report.log_to_wandb) and the run is finished.

wandb, transformers and PIL are imported inside the functions that use them, for their import cost (transformers
takes seconds, wandb a few tenths): this module is imported by every stage and by `rlhf` itself, tracking on or off.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

from pipeline.distributed import is_main

# Whole key names that hold secrets: api_key, openai_api_key, token, hf_token, access_token, secret,
# client_secret, password, authorization, bearer. Not settings that merely contain such a word
# (max_new_tokens, max_tokens, tokenizer, api_key_env: the *name* of a variable, not its value).
_SECRET_KEYS = re.compile(r"^(?:(?:\w+_)?(?:api[_-]?key|token|secret|password|passwd|credentials?)|authorization|"
                          r"bearer|private[_-]?key)$", re.I)


def metric_name(key: str) -> str:
    if key == "loss":
        return "train/loss"
    if key.startswith("eval_"):
        return "eval/" + key[5:]
    if "/" in key and key.split("/", 1)[0] in ("train", "eval", "ppo", "rewards"):
        return key
    return "train/" + key


def redact(obj: Any) -> Any:
    """Drop values under keys that look like secrets (for configs and metrics sent anywhere)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEYS.match(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class MetricsLog:
    """Appends one JSON object per call to metrics.jsonl and keeps the last value of each metric; with a
    wandb run attached (stages that run their own loop, see wandb_run) logs the same rows there."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last: dict[str, float] = {}
        self.wandb = None

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        row: dict[str, Any] = {} if step is None else {"step": step}
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                name = metric_name(k)
                row[name] = v
                if math.isfinite(float(v)):
                    self.last[name] = v
        if is_main():  # every rank keeps `last`; only rank 0 writes
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)


def trainer_callback(metrics: MetricsLog):
    """A transformers TrainerCallback that mirrors the trainer's logs into `metrics`."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                metrics.log(logs, step=state.global_step)

    return _Callback()


_SHORT = {"learning_rate": "lr", "mean_token_accuracy": "token_acc"}


def log_line(name: str, logs: dict, step: int, max_steps: int) -> str:
    """One trainer log as a line: `[sft] step 20/340 epoch 0.29: loss 3.67 · grad_norm 1.69 · lr 4.97e-03`.
    (The HF progress bar writes a dict of quoted numbers.)"""
    parts = []
    for k, v in logs.items():
        if k in ("epoch", "total_flos", "step"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            parts.append(f"{k} {v}")
        elif k == "num_tokens" or (isinstance(v, int)):
            parts.append(f"{_SHORT.get(k, k)} {int(v):,}")
        elif k.endswith("runtime"):
            parts.append(f"{k} {v:.1f} s")
        else:
            parts.append(f"{_SHORT.get(k, k)} {v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{_SHORT.get(k, k)} {v:.2e}")
    epoch = f" epoch {logs['epoch']:.2f}" if isinstance(logs.get("epoch"), (int, float)) else ""
    return f"[{name}] step {step}/{max_steps}{epoch}: " + " · ".join(parts)


def readable_progress(trainer, name: str) -> None:
    """Swap the trainer's progress bar for one that writes each log as `log_line` (same bar, same cadence)."""
    from transformers.trainer_callback import ProgressCallback

    class _Progress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(log_line(name, logs, state.global_step, state.max_steps))

    handler = trainer.callback_handler
    theirs = [cb for cb in handler.callbacks if type(cb) is ProgressCallback]
    for cb in theirs:
        handler.remove_callback(cb)  # an instance: removes exactly that one
        handler.add_callback(_Progress())


def report_to(tracking) -> list[str]:
    """The HF `report_to` list for a TrackingConfig; sets WANDB_MODE so offline needs no account."""
    if not tracking.wandb:
        return []
    os.environ.setdefault("WANDB_MODE", tracking.wandb_mode)
    os.environ.setdefault("WANDB_PROJECT", tracking.wandb_project)
    return ["wandb"]


def wandb_group(run_dir: str | Path) -> str:
    """The wandb group of a run's stages: the run directory as given (wandb allows 128 characters)."""
    return str(run_dir)[-128:]


_STAGE_RUN_IDS: dict[tuple[str, str], str] = {}  # (run dir, stage) -> the id of the stage's wandb run


def wandb_init_args(tracking: dict, run_dir: str | Path, name: str) -> dict:
    """wandb.init arguments for stage `name` of the run in `run_dir`: its project and mode (an environment
    WANDB_MODE wins, as in report_to), files under RUN_DIR/wandb rather than the current directory, the run
    directory as the group, the stage's name, and the id stage_wandb chose (reopened if that run was finished),
    or a new run when there is none."""
    run_id = _STAGE_RUN_IDS.get((str(Path(run_dir).resolve()), name))
    return {"project": os.environ.get("WANDB_PROJECT", tracking.get("wandb_project", "rlhf")),
            "mode": os.environ.get("WANDB_MODE", tracking.get("wandb_mode", "offline")),
            "dir": str(Path(run_dir).resolve()), "group": wandb_group(run_dir), "name": name,
            **({"id": run_id, "resume": "allow"} if run_id else {})}


def stage_wandb(tracking, run_dir: str | Path, name: str, config: dict | None = None):
    """Before a stage runs (the runner calls it): open the stage's own wandb run, one per stage. The HF callback
    of the TRL stages logs into the run that is open, PPO's `wandb_run` hands it out, and `log_report` adds the
    report's plots and finishes it once the stage is complete. The run is opened here, with explicit
    arguments, because wandb reads WANDB_* variables once per process and `wandb.init` returns the run already
    open: left to the HF callback, every stage after the first would log into the first stage's run. A run left
    open (a stage that failed) is finished first. WANDB_DIR, WANDB_RUN_GROUP and WANDB_NAME are set as well, for
    any process the stage starts. Returns the run; None when tracking is off or on ranks other than 0."""
    if not tracking.wandb or not is_main():
        return None
    report_to(tracking)
    import wandb

    if wandb.run is not None:
        wandb.run.finish()
    _STAGE_RUN_IDS[(str(Path(run_dir).resolve()), name)] = f"{name[:40]}-{uuid.uuid4().hex[:8]}"
    os.environ.update(WANDB_DIR=str(Path(run_dir).resolve()), WANDB_RUN_GROUP=wandb_group(run_dir), WANDB_NAME=name)
    return wandb.init(config=redact(config or {}), **wandb_init_args(tracking.model_dump(mode="json"), run_dir, name))


class _StageRun:
    """The stage's wandb run as the stage sees it: everything goes through but finish(), which log_report does
    after adding the report's plots (the runner calls pipeline.report.log_to_wandb)."""

    def __init__(self, run):
        self._run = run

    def __getattr__(self, name: str):
        return getattr(self._run, name)

    def finish(self, *args, **kwargs) -> None:
        pass


def wandb_run(tracking, name: str, config: dict, work_dir: str | Path):
    """A wandb run for a stage that runs its own training loop (PPO; the TRL-based stages report through
    `report_to`), with the stage's resolved config (secrets redacted). `work_dir` is the stage's work directory
    RUN_DIR/.NAME.partial. Under the runner this is the stage's run that stage_wandb opened; otherwise a new one
    with the same settings (files under RUN_DIR/wandb, the run directory's group). None when tracking is off or
    on processes other than rank 0. The caller finishes it."""
    if not tracking.wandb or not is_main():
        return None
    report_to(tracking)
    import wandb

    args = wandb_init_args(tracking.model_dump(mode="json"), Path(work_dir).parent, name)
    if wandb.run is not None and "id" in args and wandb.run.id == args["id"]:
        wandb.run.config.update(redact(config), allow_val_change=True)
        return _StageRun(wandb.run)
    return wandb.init(config=redact(config), **args)


def log_report(tracking: dict, run_dir: str | Path, name: str, plots: dict[str, bytes],
               tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
    """Log a completed stage's report to the stage's wandb run, then finish that run: one wandb run per stage.
    `tracking` is the stage's resolved `tracking` block, `plots` {title: PNG} (logged as wandb.Image under
    report/<title>), `tables` {key: (header, rows)} (wandb.Table under report/<key>). The run is the one
    stage_wandb opened for the stage (reopened if the stage finished it), or, outside the runner, a new run named
    after the stage in the run directory's group."""
    import wandb
    from PIL import Image

    args = wandb_init_args(tracking, run_dir, name)
    run = wandb.run if wandb.run is not None and wandb.run.id == args.get("id") else None
    if run is None:
        if wandb.run is not None:
            wandb.run.finish()  # another stage's run, left open: never log into it
        run = wandb.init(**args)
    try:
        values: dict[str, Any] = {"report/" + re.sub(r"\W+", "_", title.lower()): wandb.Image(
            Image.open(io.BytesIO(png)), caption=f"{name}: {title}") for title, png in plots.items()}
        for key, (header, rows) in tables.items():
            values[f"report/{key}"] = wandb.Table(columns=header, data=[[_wandb_cell(v) for v in r] for r in rows])
        if values:
            run.log(values)
    finally:
        run.finish()


def _wandb_cell(v: Any) -> Any:
    return v if v is None or isinstance(v, (int, float, str)) else str(v)


def quiet_libraries() -> None:
    """Keep a run's output to what a user acts on: transformers' and datasets' info chatter, per-dataset progress
    bars and load reports (e.g. the freshly initialised score head of a reward model, which the reward stage
    states in one line itself) and library deprecation notices are silenced; training progress bars and our own
    messages stay. RLHF_VERBOSE=1 keeps everything. Called first by `rlhf` (pipeline.cli.main)."""
    if os.environ.get("RLHF_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' per-load bars (loading, writing)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for module in ("transformers", "trl", "peft", "accelerate", "deepspeed", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # accelerate imports DeepSpeed whenever it is installed, and DeepSpeed then warns that it "set the accelerator
    # to CPU". Outside a distributed launch (where the user chose DeepSpeed) that concerns no one: drop it there.
    if os.environ.get("WORLD_SIZE", "1") == "1":
        logging.getLogger("DeepSpeed").addFilter(_not_cpu_accelerator_notice)


def _not_cpu_accelerator_notice(record) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()
