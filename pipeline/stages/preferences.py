"""Preferences stage: import a human preference file into a `preferences` artifact (pairs), or a file of unpaired
rows (prompt, completion, label: binary feedback, e.g. `rlhf feedback export --kind unpaired`) into an
`unpaired_preferences` artifact, which the kto stage trains on.

    rlhf run configs/tiny.yaml --stage preferences

Every row is validated (feedback/validate.py). `on_error: fail` stops before anything is
written, listing the first problems and the counts; `skip` keeps the valid rows and writes the
rejected ones with their reasons to `rejected.jsonl`. The pairs (or unpaired rows) are split into
train and eval by prompt (seeded), so that no prompt is in both.

    RUN_DIR/preferences/
      manifest.json        # kind: preferences; counts: rows read / accepted / rejected by reason
      preferences.jsonl    # train pairs, canonical schema
      eval.jsonl           # held-out pairs (prompts not in train)
      rejected.jsonl       # rows left out, with FILE:LINE and reason (when any)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from feedback.readers import ALIASES, FORMATS, RANKED_MODES
from feedback.schema import SOURCES, prompt_key, write_pairs
from feedback.validate import DUPLICATES, validate_file
from pipeline.blocks import StageBlock, Strict
from rlhf.errors import InvalidInput
from pipeline.artifacts import write_jsonl
from pipeline.data import held_out_keys, resolve_data_path
from pipeline.distributed import say


class PreferenceDataConfig(Strict):
    path: str = Field(description="JSONL/JSON/CSV/Parquet file, a local dataset directory, or synthetic:preferences")
    format: Literal[FORMATS] = Field(  # type: ignore[valid-type]  (the one list: feedback/readers.py)
        "auto", description="row format; auto detects it from the first row (docs/data-formats.md)")
    keys: dict[Literal[tuple(ALIASES)], str] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="the file's own names for prompt, chosen, rejected (unpaired rows: "
        "completion, label)")
    ranked: Literal[RANKED_MODES] = Field(  # type: ignore[valid-type]
        "all_pairs", description="how a ranked row becomes pairs: all_pairs (every pair) or best_vs_rest (the best "
        "against each of the others)")
    source: Literal[SOURCES] = Field(  # type: ignore[valid-type]
        "human", description="the source recorded on each pair")
    on_error: Literal["fail", "skip"] = Field("fail", description="fail: stop on any bad row; skip: leave bad rows "
                                              "out, listed with their reasons in rejected.jsonl")
    duplicates: Literal[DUPLICATES] = Field(  # type: ignore[valid-type]
        "fail", description="repeated pairs: fail (conflicts are rejected), first (keep the first), majority (keep "
        "the label most annotators gave)")
    split: str | None = Field(None, description="a dataset directory's split to read (default: all of them)")


class PreferencesStageConfig(StageBlock):
    stage: Literal["preferences"] = Field(description="the method: import a human preference file (pairs, or "
                                          "unpaired rows for the kto stage)")
    data: PreferenceDataConfig = Field(description="the file and how to read it")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of prompts held out")
    tokenizer: str | None = Field(None, description="model (or stage:NAME) whose tokenizer checks truncation")
    max_length: int | None = Field(None, ge=8, description="with tokenizer: flag pairs empty/identical once truncated")

    def inputs(self) -> dict[str, tuple[str, str]]:
        out = {"data": (self.data.path, "data")}
        if self.tokenizer:
            out["tokenizer"] = (self.tokenizer, "model")
        return out


Config = PreferencesStageConfig  # the registry's handle (pipeline/stages/__init__.py)


def fail_summary(report, limit: int = 10) -> str:
    problems = report.problems()
    shown = "\n".join(problems[:limit]) + (f"\n... and {len(problems) - limit} more" if len(problems) > limit else "")
    return f"{shown}\n{report.path}: {report.summary()} (set data.on_error: skip to keep the valid rows)"


def run(cfg: PreferencesStageConfig, ctx) -> dict:
    tokenizer = None
    if cfg.tokenizer:
        from pipeline.models import load_tokenizer

        path, info = ctx.model_path(cfg.tokenizer, role="tokenizer")
        tokenizer = load_tokenizer(path, info.get("trust_remote_code", False), info.get("revision"))
    d = cfg.data
    report = validate_file(resolve_data_path(d.path), d.format, d.keys or None, d.source, d.ranked,
                           tokenizer, cfg.max_length, split=d.split, duplicates=d.duplicates)
    for note in report.notes:  # how the file was read: dataset splits, ignored columns
        say(f"[{ctx.name}] {note}")
    if not report.ok and d.on_error == "fail":
        raise InvalidInput(fail_summary(report))
    what = "unpaired rows" if report.unpaired else "pairs"
    if not report.pairs:
        raise InvalidInput(f"{report.path}: no valid {what} ({report.summary()})")
    # the split by prompt, each pair written to its side as it is read again: no list of either side is built
    held = held_out_keys(report.pairs, cfg.eval_fraction, ctx.seed)
    side = lambda held_out: (p for p in report.pairs if (prompt_key(p.prompt) in held) == held_out)  # noqa: E731
    n_train = write_pairs(ctx.work_dir / "preferences.jsonl", side(False))
    n_eval = write_pairs(ctx.work_dir / "eval.jsonl", side(True))
    outputs = {"train": "preferences.jsonl", "eval": "eval.jsonl"}
    if not report.ok:  # rejected rows, and pairs rejected from otherwise valid rows (ranked, outvoted)
        write_jsonl(ctx.work_dir / "rejected.jsonl", report.rejected_rows())
        outputs["rejected"] = "rejected.jsonl"
    counts = {**report.counts(), "train": n_train, "eval": n_eval}
    if report.unpaired:
        counts["train_desirable"] = sum(p.label for p in side(False))
    else:
        counts["ties"] = sum(p.tie for p in report.pairs)
    summary = (f"{report.summary()} ({report.format}); {n_train} train / {n_eval} eval {what}"
               + (f" ({counts['desirable']} desirable, {counts['undesirable']} undesirable)" if report.unpaired else "")
               + (f"; rejected rows in {ctx.run_dir / ctx.name / 'rejected.jsonl'}" if not report.ok else ""))
    return {"kind": "unpaired_preferences" if report.unpaired else "preferences", "outputs": outputs, "counts": counts,
            "extra": {"format": report.format, "notes": report.notes, "agreement": report.agreement,
                      "split": {"by": "prompt", "seed": ctx.seed, "eval_fraction": cfg.eval_fraction}},
            "summary": summary}
