"""Metrics: one `metrics.jsonl` per stage with the DESIGN.md names, and wandb (offline unless told).

TRL and the HF Trainer log `loss`, `eval_loss`, `eval_rewards/margins`, ...; `metric_name`
maps them to our names (`train/loss`, `eval/loss`, `eval/rewards/margins`) so that
metrics.jsonl, wandb and the manifest use one vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

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
        from pipeline.distributed import is_main

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


def report_to(tracking) -> list[str]:
    """The HF `report_to` list for a TrackingConfig; sets WANDB_MODE so offline needs no account."""
    if not tracking.wandb:
        return []
    os.environ.setdefault("WANDB_MODE", tracking.wandb_mode)
    os.environ.setdefault("WANDB_PROJECT", tracking.wandb_project)
    return ["wandb"]


def wandb_run(tracking, name: str, config: dict, work_dir: str | Path):
    """A wandb run for a stage that runs its own training loop (PPO; the TRL-based stages report through
    `report_to`), with the stage's resolved config (secrets redacted); its files go under the stage's
    directory. None when tracking is off or on processes other than rank 0. The caller finishes it."""
    from pipeline.distributed import is_main

    if not tracking.wandb or not is_main():
        return None
    report_to(tracking)
    import wandb

    return wandb.init(project=tracking.wandb_project, name=name, config=redact(config), dir=str(work_dir),
                      mode=tracking.wandb_mode)
