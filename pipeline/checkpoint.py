"""Periodic checkpoints and resume.

Checkpoints live in the stage's partial directory while it trains:

    RUN_DIR/.<stage>.partial/checkpoints/
      checkpoint-4/         # complete: holds checkpoint.json (written last)
      checkpoint-6/         # no checkpoint.json: a run killed while writing it; ignored with a message

A checkpoint counts only once `checkpoint.json` is in it: our own checkpoints (PPO) are written
to a temporary directory, marked and renamed; the HF Trainer's (SFT, reward, DPO, GRPO, RLOO)
are marked by a callback after the trainer has finished writing them. Old checkpoints are
removed only after a newer one is complete. `checkpoint.json` records the stage's config hash
and resolved config, the step, and the number of processes, so that `--resume` can refuse a
changed config (saying what differs) or a different number of processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.distributed import barrier, is_main, world_size
from rlhf.errors import RLHFError, UsageError
from pipeline.artifacts import write_json

META = "checkpoint.json"
_NAME = re.compile(r"checkpoint-(\d+)\Z")


def scan(ckpt_dir: Path, echo=print) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; incomplete ones are reported and skipped."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if not m or not p.is_dir():
            continue
        if (p / META).exists():
            out.append((int(m.group(1)), p))
        else:
            echo(f"ignoring incomplete checkpoint {p} (no {META}: the run stopped while writing it)")
    return sorted(out)


def meta(step: int, config_hash: str, config: dict, extra: dict | None = None) -> dict:
    return {"step": step, "config_hash": config_hash, "config": config, "world_size": world_size(), **(extra or {})}


def mark_complete(path: Path, info: dict) -> None:
    write_json(path / META, info)


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (incomplete ones older than them too)."""
    complete = scan(ckpt_dir, echo=lambda *_: None)
    if len(complete) <= keep:
        return
    newest_kept = complete[-keep][0]
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and int(m.group(1)) < newest_kept:
            shutil.rmtree(p, ignore_errors=True)


def save_atomic(ckpt_dir: Path, step: int, info: dict, write, keep: int) -> Path:
    """write(tmp_dir) fills a temporary directory; it is marked complete and renamed to checkpoint-STEP.

    Under several processes every one calls this: each writes its share into the same directory
    (a shared file system across nodes), and rank 0 marks and renames it once all are done.
    """
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".tmp-checkpoint-{step}"
    if is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if is_main():
        mark_complete(tmp, info)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate(ckpt_dir, keep)
    barrier()
    return final


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def check_resumable(info: dict, config_hash: str, config: dict, stage: str, path: Path) -> None:
    if info.get("world_size", 1) != world_size():
        raise UsageError(f"--resume: {path} was written by {info.get('world_size')} processes, this run has "
                         f"{world_size()}; resume with the same number of processes")
    if info.get("config_hash") != config_hash:
        diffs = _diff(info.get("config", {}), config) or ["(the seed or an input changed)"]
        raise UsageError(f"--resume: stage {stage}'s config differs from its checkpoint ({path}):\n  "
                         + "\n  ".join(diffs[:10])
                         + "\nrestore the config, or run without --resume to start the stage over")


def latest(ckpt_dir: Path, stage: str, echo=print) -> Path:
    found = scan(ckpt_dir, echo)
    if not found:
        raise UsageError(f"--resume: stage {stage} has no complete checkpoint in {ckpt_dir}; "
                         "run without --resume to start it")
    return found[-1][1]


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def hf_callback(ckpt_dir: Path, info_fn, keep: int, stop_after: int | None = None):
    """Marks each HF Trainer checkpoint complete after the trainer has written it, then rotates.

    `stop_after` (tests, via RLHF_STOP_AFTER_STEP) stops training after that step's checkpoint,
    as if the process had been killed there.
    """
    from transformers import TrainerCallback

    class _Mark(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                path = ckpt_dir / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    mark_complete(path, info_fn(state.global_step))
                    rotate(ckpt_dir, keep)

        def on_step_end(self, args, state, control, **kwargs):
            if stop_after is not None and state.global_step >= stop_after:
                control.should_save = True
                control.should_training_stop = True

    return _Mark()


class Stopped(RLHFError):
    """Raised when RLHF_STOP_AFTER_STEP ends a stage early on purpose (a simulated kill); exit code 3."""

    exit_code = 3


def stop_after_step() -> int | None:
    v = os.environ.get("RLHF_STOP_AFTER_STEP")
    return int(v) if v else None
