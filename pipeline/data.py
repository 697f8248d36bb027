"""Data helpers the stages share: where a data reference points, prompt files, splits by prompt, and the
held-out rule evaluation. Stages import these; they never import each other.

    resolve_data_path("synthetic:prompts")     # the shipped file; anything else is a path
    read_prompts(path)                         # [prompt, ...] (strings or message lists), every row checked
    split_by_prompt(pairs, 0.1, seed)          # seeded train/eval split, every item of a prompt on one side
    rule_eval(model, tok, prompts, rule, ...)  # mean rule score of one sample per prompt
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from pipeline.errors import InvalidInput, UsageError


def resolve_data_path(ref: str) -> Path:
    """`synthetic:NAME` -> the shipped file; anything else is a path (a file or a local dataset directory)."""
    if ref.startswith("synthetic:"):
        from feedback import synthetic

        try:
            return synthetic.path(ref.split(":", 1)[1])
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
    p = Path(ref).expanduser()
    if not p.exists():
        raise UsageError(f"data file {ref} not found")
    return p


def read_prompts(path, limit: int | None = None) -> list:
    """The `prompt` of every row of a prompt file; any bad row stops with FILE:LINE: reason."""
    from feedback.files import iter_records
    from feedback.schema import check_text

    prompts, problems = [], []
    for rec in iter_records(path):
        row = rec.value
        err = rec.error or (None if isinstance(row, dict) and "prompt" in row
                            else f"expected an object with 'prompt'; found {type(row).__name__}"
                            + (f" keys {sorted(row)}" if isinstance(row, dict) else ""))
        err = err or check_text(row["prompt"], "prompt")
        if err:
            problems.append(f"{rec.where}: {err}")
        else:
            prompts.append(row["prompt"])
    if problems:
        raise InvalidInput("\n".join(problems[:10]) + f"\n{path}: {len(problems)} invalid prompt rows")
    if not prompts:
        raise InvalidInput(f"{path}: no prompts")
    return prompts[:limit] if limit else prompts


def split_by_prompt(items: list, eval_fraction: float, seed: int, prompt_of=lambda p: p.prompt) -> tuple[list, list]:
    """Seeded train/eval split over distinct prompts: every item of a prompt lands on the same side. Prompts are
    compared on `prompt_key` (Unicode NFC, whitespace collapsed), so near-identical copies cannot straddle the split.

    `items` are pairs (prompt_of reads .prompt) or, with prompt_of=lambda p: p, the prompts themselves."""
    from feedback.schema import prompt_key

    prompts = sorted({prompt_key(prompt_of(p)) for p in items})
    random.Random(seed).shuffle(prompts)
    n_eval = math.ceil(len(prompts) * eval_fraction) if eval_fraction > 0 and len(prompts) > 1 else 0
    held = set(prompts[:n_eval])
    train = [p for p in items if prompt_key(prompt_of(p)) not in held]
    return train, [p for p in items if prompt_key(prompt_of(p)) in held]


def rule_eval(model, tok, prompts: list, rule, max_new_tokens: int, seed: int) -> float:
    """The mean of `rule(prompt, response)` over one sample per prompt (temperature 1, seeded)."""
    from pipeline.generation import sample

    responses = sample(model, tok, prompts, n=1, temperature=1.0, max_new_tokens=max_new_tokens, batch_size=64,
                       seed=seed, desc="eval samples")
    return sum(float(rule(p, r[0])) for p, r in zip(prompts, responses)) / len(prompts)
