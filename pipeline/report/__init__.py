"""The static HTML report of a run: one self-contained page per run directory.

    rlhf report runs/tiny              # writes runs/tiny/report.html
    rlhf report runs/tiny -o out.html

The page reads only what the run wrote (manifests, config.yaml, metrics.jsonl, samples and the rows
left out) and shows: the run (directory, dates, git sha, versions) and its stages in config order
with their status; per stage the training curves (PNG plots made with matplotlib, embedded as data
URIs), final metrics, time, peak memory, counts, the extra manifest blocks, the samples it logged and
the resolved config; the data (rows accepted and rejected by reason, skipped pairs, AI labels, judge
agreement); and for an `eval` stage the per-policy table, win rates with their 95% intervals and sample
answers side by side. It works on a partial run (stages not run yet, in progress or killed are marked)
and on DeepSpeed runs (memory per process). There is no JavaScript and no external URL; every piece of
text taken from the run is escaped: model outputs and data files are untrusted.

    run.py     reading the run directory: its stages, their state and files
    plots.py   the PNG charts of a stage (curves, win rates)
    page.py    the HTML page: render, write_report

With `tracking: {wandb: true}` the runner calls `log_to_wandb` after each stage: the same plots (and
the evaluate table) go to that stage's wandb run, through pipeline.tracking.log_report.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.report.page import eval_table, render, write_report
from pipeline.report.plots import stage_plots
from pipeline.report.run import read_stage, tracking_on
from pipeline.tracking import log_report

__all__ = ["log_to_wandb", "render", "write_report"]  # what `rlhf report` and the runner call


def log_to_wandb(run_dir: str | Path, name: str) -> bool:
    """Log a completed stage's plots and, for an eval stage, its per-policy table to the stage's wandb run, then
    finish that run (pipeline.tracking.log_report). Returns whether the stage's run was logged to: not when
    tracking is off in the stage's resolved config, nor for a stage that is not complete."""
    stage = read_stage(Path(run_dir), name)
    if not tracking_on(stage) or stage.status != "complete":
        return False
    tables = {"evaluate": eval_table(stage.manifest)} if stage.kind == "eval" and stage.manifest else {}
    log_report(stage.config.get("tracking") or {}, run_dir, name, stage_plots(stage), tables)
    return True
