"""The shipped Anthropic HH-RLHF sample (feedback/data/hh/) and how it was split: one deterministic rule, re-runnable.

    python -m feedback.hh SOURCE.jsonl        # writes feedback/data/hh/*.jsonl from the 1,200-pair sample

Every row of SOURCE (HH format: {"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}) goes, whole and unchanged, to one
of three parts, by a hash of its conversation's opening: the first human turn, case-folded, its words only (no
punctuation or spacing). HH dialogues continue one another (a longer transcript repeats a shorter one's turns word
for word), so splitting by the whole prompt put 9 of the evaluation prompts in a conversation a training prompt had
begun; by the opening, every pair of a conversation lands in one part, and the split does not depend on the order
or number of rows:

    train.jsonl    SHA-256 bucket < 0.6   pairs the reward model, DPO and SFT train on (PPO's prompts)
    eval.jsonl     0.6 <= bucket < 0.8    held-out pairs: their prompts are the evaluate stage's, and the reward
                                          model's held-out accuracy is measured on them
    scorer.jsonl   0.8 <= bucket          held-out pairs the independent scorer (a second reward model) trains on

A row that cannot be read as an HH pair goes by a hash of its raw line (the preferences stage rejects it, with
its reason, under on_error: skip). Derived from the valid pairs, for the stages that read prompts or SFT rows:

    sft.jsonl            {"messages": prompt + chosen reply}, one per training pair
    prompts-train.jsonl  {"prompt": [messages]}, each training prompt once
    prompts-eval.jsonl   {"prompt": [messages]}, each held-out evaluation prompt once

Pipeline configs name these files `hh:NAME` (e.g. `hh:train`, `hh:prompts-eval`; pipeline.data.resolve_data_path).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from pathlib import Path

from feedback.readers import Bad, read_hh_row
from feedback.schema import prompt_key

DATA_DIR = Path(__file__).parent / "data" / "hh"
PARTS = (("train", 0.6), ("eval", 0.8), ("scorer", 1.0))  # part, upper bound of its hash bucket
DERIVED = ("sft", "prompts-train", "prompts-eval")


def path(name: str) -> Path:
    """`hh:train` -> feedback/data/hh/train.jsonl (a KeyError naming the files there for any other name)."""
    name = name[:-6] if name.endswith(".jsonl") else name
    if name not in [p for p, _ in PARTS] + list(DERIVED):
        raise KeyError(f"no shipped HH file '{name}' (have: {', '.join([p for p, _ in PARTS] + list(DERIVED))})")
    return DATA_DIR / f"{name}.jsonl"


def bucket(text: str) -> float:
    """A number in [0, 1) from the SHA-256 of the text: the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def pair_of(line: str):
    """The PreferencePair of one HH line, or None when it is not a valid pair."""
    try:
        return read_hh_row(json.loads(line))[0]
    except (Bad, ValueError, KeyError, TypeError, AttributeError):
        return None


def opening(prompt) -> str:
    """A conversation's opening as the split compares it: the first human turn, NFKC, case-folded, its words (\\w+)
    joined by one space; so that a copy differing in case or punctuation is the same conversation."""
    first = prompt if isinstance(prompt, str) else next(
        (m["content"] for m in prompt if m.get("role") == "user"), "")
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", first).casefold()))


def part_of(line: str) -> str:
    """The part (train, eval or scorer) a source line belongs to."""
    pair = pair_of(line)
    b = bucket(opening(pair.prompt) if pair is not None else line)
    return next(name for name, top in PARTS if b < top)


def split(lines: list[str]) -> dict[str, list[str]]:
    """{part: its lines, in source order}: every non-blank line in exactly one part."""
    out: dict[str, list[str]] = {name: [] for name, _ in PARTS}
    for line in lines:
        if line.strip():
            out[part_of(line)].append(line)
    return out


def derived(parts: dict[str, list[str]]) -> dict[str, list[dict]]:
    """The SFT rows and prompt files made from the valid pairs of the parts."""
    def pairs(name):
        return [p for p in map(pair_of, parts[name]) if p is not None]

    def as_messages(x):
        return x if isinstance(x, list) else [{"role": "assistant", "content": x}]

    def prompts(name):
        seen, out = set(), []
        for p in pairs(name):
            if prompt_key(p.prompt) not in seen:
                seen.add(prompt_key(p.prompt))
                out.append({"prompt": p.prompt})
        return out

    return {"sft": [{"messages": p.prompt + as_messages(p.chosen)} for p in pairs("train")],
            "prompts-train": prompts("train"), "prompts-eval": prompts("eval")}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    lines = Path(argv[0]).read_text(encoding="utf-8").splitlines()
    parts = split(lines)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in parts.items():
        (DATA_DIR / f"{name}.jsonl").write_text("".join(x + "\n" for x in rows), encoding="utf-8")
        print(f"wrote {DATA_DIR / name}.jsonl: {len(rows)} pairs")
    for name, rows in derived(parts).items():
        (DATA_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
        print(f"wrote {DATA_DIR / name}.jsonl: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
