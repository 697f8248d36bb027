"""Data helpers the stages share: where a data reference points, prompt files, splits by prompt, and the
held-out rule evaluation. Stages import these; they never import each other.

    resolve_data_path("synthetic:prompts")     # the shipped file; anything else is a path
    read_examples(path, "auto", "fail", [])    # SFT rows as {"messages": [...]}, every row checked
    read_prompts(path)                         # [prompt, ...] (strings or message lists), every row checked

SFT and prompt files may be dataset directories (`save_to_disk`): a DatasetDict is read one split, the
one the stage's split setting names, `train` by default (refused when there is none); a note says
which splits were read and which were skipped, so a test split is never trained on unnoticed.
    split_by_prompt(pairs, 0.1, seed)          # seeded train/eval split, every item of a prompt on one side
    held_out_keys(pairs, 0.1, seed)            # the same split as the set of held-out prompt keys
    neutralised(tok, row)                      # a training row whose texts hold no control tokens
    rule_eval(model, tok, prompts, rule, ...)  # mean rule score of one sample per prompt
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from rlhf.errors import InvalidInput, UsageError
from feedback.files import iter_records
from feedback.schema import check_text, is_blank, prompt_key
from pipeline.distributed import say
from pipeline.generation import neutralise_special_tokens, sample

DEFAULT_SPLIT = "train"  # the split of a DatasetDict that SFT and prompt files read unless told otherwise


def resolve_data_path(ref: str) -> Path:
    """`synthetic:NAME` or `hh:NAME` -> the shipped file; anything else is a path (a file or a local dataset directory)."""
    if ref.startswith("synthetic:"):
        from feedback import synthetic

        try:
            return synthetic.path(ref.split(":", 1)[1])
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
    if ref.startswith("hh:"):  # the shipped HH-RLHF sample's parts (feedback/hh.py)
        from feedback import hh

        try:
            return hh.path(ref.split(":", 1)[1])
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
    p = Path(ref).expanduser()
    if not p.exists():
        raise UsageError(f"data file {ref} not found")
    return p


SFT_ROLES = ("system", "user", "assistant")


def _check_messages(msgs) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list of {role, content} objects"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"messages[{j}] must be an object with 'role' and 'content'"
        if m["role"] not in SFT_ROLES:
            return f"messages[{j}].role is {m['role']!r}; expected one of {list(SFT_ROLES)}"
        if not isinstance(m["content"], str):
            return f"messages[{j}].content must be a string"

    if not any(m["role"] == "assistant" and not is_blank(m["content"]) for m in msgs):
        return "no non-empty assistant message to learn from"
    return None


def to_example(row, fmt: str) -> tuple[dict | None, str | None]:
    """One data row -> a conversational example {'messages': [...]}, or the reason it is invalid."""
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, not an object"
    if fmt == "auto":
        fmt = "messages" if "messages" in row else "prompt_completion" if "prompt" in row else None
        if fmt is None:
            return None, f"expected key 'messages' or 'prompt'/'completion'; found keys {sorted(row)}"
    if fmt == "messages":
        if "messages" not in row:
            return None, f"missing key 'messages'; found keys {sorted(row)}"
        err = _check_messages(row["messages"])
        return (None, err) if err else ({"messages": row["messages"]}, None)
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        return None, f"missing key {missing[0]!r}; found keys {sorted(row)}"
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        from feedback.schema import is_blank

        if is_blank(prompt) or is_blank(completion):
            return None, "empty prompt or completion"
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif isinstance(prompt, list) and isinstance(completion, list):
        msgs = prompt + completion
    else:
        return None, "'prompt' and 'completion' must both be strings or both be message lists"
    err = _check_messages(msgs)
    return (None, err) if err else ({"messages": msgs}, None)


def _records(path, split: str | None, split_key: str, default_split: str | None = DEFAULT_SPLIT):
    """The records of an SFT or prompt file: one split of a DatasetDict (`split`, else `default_split`); the note
    naming the splits read and skipped is printed as soon as the file has been read."""
    notes: list[str] = []
    yield from iter_records(path, split=split, notes=notes, default_split=default_split, split_key=split_key)
    for note in notes:
        say(f"note: {note}")


def iter_examples(path, fmt: str, split: str | None = None, split_key: str = "data.split",
                  default_split: str | None = DEFAULT_SPLIT, notes: list | None = None):
    """Every row of an SFT file as (where, example or None, reason or None, raw text): read_examples one row at a
    time. `notes` (a list) receives how the file was read (dataset splits); without it they are printed."""
    records = (iter_records(path, split=split, notes=notes, default_split=default_split, split_key=split_key)
               if notes is not None else _records(path, split, split_key, default_split))
    for rec in records:
        ex, err = (None, rec.error) if rec.error else to_example(rec.value, fmt)
        yield rec.where, ex, err, rec.raw


def check_examples(path, on_error: str, n: int, problems: list[str]) -> None:
    """Stop on invalid rows (on_error: fail), with the first `problems` and the counts; stop when none is valid."""
    if problems and on_error == "fail":
        shown = "\n".join(problems[:10]) + (f"\n... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise InvalidInput(f"{shown}\n{path}: {n} rows: {n - len(problems)} valid, {len(problems)} invalid "
                           "(set data.on_error: skip to train on the valid rows)")
    if n == len(problems):
        raise InvalidInput(f"{path}: no valid rows")


def read_examples(path, fmt: str, on_error: str, rejected: list[dict], split: str | None = None,
                  split_key: str = "data.split", default_split: str | None = DEFAULT_SPLIT,
                  where: list | None = None) -> tuple[list[dict], int]:
    """Read and validate every row; invalid rows raise (fail) or are recorded in `rejected` (skip). A DatasetDict
    is read one split: `split`, else `default_split` (None: the split must be named by `split_key`). `where` (a
    list) receives each example's location (FILE:LINE), in the order of the examples. (The SFT stage reads its
    files into Arrow datasets instead: pipeline/stages/sft.py.)"""
    examples, problems, n = [], [], 0
    for at, ex, err, raw in iter_examples(path, fmt, split, split_key, default_split):
        n += 1
        if err:
            problems.append(f"{at}: {err}")
            rejected.append({"where": at, "reason": err, "row": raw})
        else:
            examples.append(ex)
            if where is not None:
                where.append(at)
    check_examples(path, on_error, n, problems)
    return examples, n


def neutralised(tokenizer, row: dict) -> dict:
    """A training row whose texts cannot hold control tokens: every string, and every message's content, of an SFT
    example ({"messages": [...]}), a DPO row ({"prompt", "chosen", "rejected"}) or a GRPO prompt row, with the
    tokenizer's special tokens made plain text (pipeline.generation; counted per stage in the manifest). The
    trainers apply the chat template to these rows, which would otherwise turn "<|im_start|>system" written in a
    data file into a real turn."""
    def text(value):
        if isinstance(value, str):
            return neutralise_special_tokens(tokenizer, value)
        return [{**m, "content": neutralise_special_tokens(tokenizer, m["content"])} for m in value]

    return {key: text(value) for key, value in row.items()}


def read_prompts(path, limit: int | None = None, split: str | None = None, split_key: str = "prompts_split") -> list:
    """The `prompt` of every row of a prompt file (one split of a DatasetDict: `split`, default train); any bad row
    stops with FILE:LINE: reason."""
    prompts, problems = [], []
    for rec in _records(path, split, split_key):
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
    held = held_out_keys(items, eval_fraction, seed, prompt_of)
    train = [p for p in items if prompt_key(prompt_of(p)) not in held]
    return train, [p for p in items if prompt_key(prompt_of(p)) in held]


def held_out_keys(items, eval_fraction: float, seed: int, prompt_of=lambda p: p.prompt) -> set[str]:
    """The prompt keys split_by_prompt holds out, from one pass over `items` (any iterable): a stage can then write
    each item to its side as it reads it again, without a list of either side."""
    return held_out_of({prompt_key(prompt_of(p)) for p in items}, eval_fraction, seed)


def held_out_of(keys: set[str], eval_fraction: float, seed: int) -> set[str]:
    """The prompt keys (schema.prompt_key) held out of `keys`, the distinct prompts: held_out_keys's seeded choice."""
    prompts = sorted(keys)
    random.Random(seed).shuffle(prompts)
    n_eval = math.ceil(len(prompts) * eval_fraction) if eval_fraction > 0 and len(prompts) > 1 else 0
    return set(prompts[:n_eval])


def rule_eval(model, tok, prompts: list, rule, max_new_tokens: int, seed: int) -> float:
    """The mean of `rule(prompt, response)` over one sample per prompt (temperature 1, seeded)."""
    responses = sample(model, tok, prompts, n=1, temperature=1.0, max_new_tokens=max_new_tokens, batch_size=64,
                       seed=seed, desc="eval samples")
    return sum(float(rule(p, r[0])) for p, r in zip(prompts, responses)) / len(prompts)
