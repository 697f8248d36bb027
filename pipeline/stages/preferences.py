"""Preferences stage: import a human preference file into a `preferences` artifact (pairs), or a file of unpaired
rows (prompt, completion, label: binary feedback, e.g. `rlhf feedback export --kind unpaired`) into an
`unpaired_preferences` artifact, which the kto stage trains on.

    rlhf run configs/tiny.yaml --stage preferences

Every row is validated (feedback/validate.py), streamed: the file is read in bounded memory (`scan_file`),
holding the distinct prompts' keys but never the pairs, so a file of millions of pairs imports like a small one.
`on_error: fail` stops before anything is written, listing the first problems and the counts; `skip` keeps the
valid rows and writes the rejected ones with their reasons to `rejected.jsonl`. The pairs (or unpaired rows) are
split into train and eval by prompt (seeded), so that no prompt is in both.

    RUN_DIR/preferences/
      manifest.json        # kind: preferences; counts: rows read / accepted / rejected by reason
      preferences.jsonl    # train pairs, canonical schema
      eval.jsonl           # held-out pairs (prompts not in train)
      rejected.jsonl       # rows left out, with FILE:LINE and reason (when any)
"""

from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import Field

from feedback.readers import ALIASES, FORMATS, RANKED_MODES
from feedback.schema import SOURCES, prompt_key
from feedback.validate import DUPLICATES, RunPart, rejected_records, row_problems, scan_file
from pipeline.blocks import StageBlock, Strict
from rlhf.errors import InvalidInput
from rlhf.io import json_line, open_atomic
from pipeline.data import held_out_of, resolve_data_path
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


def fail_summary(path: str, problems: list[str], n_problems: int, summary: str, limit: int = 10) -> str:
    shown = "\n".join(problems[:limit]) + (f"\n... and {n_problems - limit} more" if n_problems > limit else "")
    return f"{shown}\n{path}: {summary} (set data.on_error: skip to keep the valid rows)"


def run(cfg: PreferencesStageConfig, ctx) -> dict:
    """Two passes over a streamed scan (feedback/validate.py `scan_file`: memory that does not grow with the file):
    the first finds the problems and the distinct prompts, which decide the split; the second writes each pair to
    its side, and each rejected row, as it comes. Only the distinct prompts' keys are held, never the pairs."""
    tokenizer = None
    if cfg.tokenizer:
        from pipeline.models import load_tokenizer

        path, info = ctx.model_path(cfg.tokenizer, role="tokenizer")
        tokenizer = load_tokenizer(path, info.get("trust_remote_code", False), info.get("revision"))
    d = cfg.data
    with scan_file(resolve_data_path(d.path), d.format, d.keys or None, d.source, d.ranked, tokenizer,
                   cfg.max_length, split=d.split, duplicates=d.duplicates, workdir=str(ctx.work_dir)) as scan:
        problems, n_problems, prompts = [], 0, set()
        for part in scan.parts():
            if isinstance(part, RunPart):  # valid pairs of strings, read by pyarrow (feedback/fastpath.py)
                columns, keep = scan.columns_of(part)
                prompts.update(prompt_key(p) for p, k in zip(columns[0].to_pylist(), keep) if k)
                continue
            lines = row_problems(part)
            n_problems += len(lines)
            problems += lines[: 10 - len(problems)]
            prompts.update(prompt_key(p.prompt) for p in (part.pairs if part.error is None else ()))
        for note in scan.notes:  # how the file was read: dataset splits, ignored columns
            say(f"[{ctx.name}] {note}")
        if not scan.ok and d.on_error == "fail":
            raise InvalidInput(fail_summary(scan.path, problems, n_problems, scan.summary()))
        what = "unpaired rows" if scan.unpaired else "pairs"
        if not prompts:
            raise InvalidInput(f"{scan.path}: no valid {what} ({scan.summary()})")
        # the split by prompt (the same seeded choice over the distinct prompts as split_by_prompt)
        held = held_out_of(prompts, cfg.eval_fraction, ctx.seed)
        del prompts
        n, ties, desirable, n_rejected = {False: 0, True: 0}, 0, 0, 0
        with contextlib.ExitStack() as files:
            paths = {False: ctx.work_dir / "preferences.jsonl", True: ctx.work_dir / "eval.jsonl"}
            out = {side: files.enter_context(open_atomic(path)) for side, path in paths.items()}
            rejected = None
            for part in scan.parts():
                if isinstance(part, RunPart):  # their canonical lines, built whole, each to its prompt's side
                    count, text = scan.text_of(part)
                    columns, keep = scan.columns_of(part)
                    kept = (p for p, k in zip(columns[0].to_pylist(), keep) if k)
                    for line, p in zip(text.split("\n")[:count], kept, strict=True):  # JSON escapes newlines
                        side = prompt_key(p) in held
                        out[side].write(line + "\n")
                        n[side] += 1
                    continue
                for p in part.pairs if part.error is None else ():
                    side = prompt_key(p.prompt) in held
                    n[side] += 1
                    out[side].write(json_line(paths[side], n[side], p.to_dict()))
                    if scan.unpaired:
                        desirable += p.label and not side
                    else:
                        ties += p.tie
                for rec in rejected_records(part):
                    rejected = rejected or files.enter_context(open_atomic(ctx.work_dir / "rejected.jsonl"))
                    n_rejected += 1
                    rejected.write(json_line(ctx.work_dir / "rejected.jsonl", n_rejected, rec))
        outputs = {"train": "preferences.jsonl", "eval": "eval.jsonl"}
        if n_rejected:  # rejected rows, and pairs rejected from otherwise valid rows (ranked, outvoted)
            outputs["rejected"] = "rejected.jsonl"
        counts = {**scan.counts(), "train": n[False], "eval": n[True]}
        if scan.unpaired:
            counts["train_desirable"] = desirable
        else:
            counts["ties"] = ties
        summary = (f"{scan.summary()} ({scan.format}); {n[False]} train / {n[True]} eval {what}"
                   + (f" ({counts['desirable']} desirable, {counts['undesirable']} undesirable)"
                      if scan.unpaired else "")
                   + (f"; rejected rows in {ctx.run_dir / ctx.name / 'rejected.jsonl'}" if not scan.ok else ""))
        return {"kind": "unpaired_preferences" if scan.unpaired else "preferences", "outputs": outputs,
                "counts": counts, "extra": {"format": scan.format, "notes": scan.notes, "agreement": scan.agreement,
                                            "split": {"by": "prompt", "seed": ctx.seed,
                                                      "eval_fraction": cfg.eval_fraction}},
                "summary": summary}
