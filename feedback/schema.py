"""The canonical preference row, and reading/writing it as JSONL.

    {"id": str, "prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages],
     "source": "human" | "ai", "tie": bool, "margin": float, "annotator": str, "judge": object}

`margin`, `annotator` and `judge` are optional: written only when they hold a value (null is read
as absent).

`prompt` holds the shared context (a string, or the dialogue so far as {"role", "content"}
messages); `chosen` and `rejected` hold only the final responses. A row is TRL's preference format
as it is: all strings (standard), or all message lists (conversational: with a message prompt,
`chosen` and `rejected` are lists of assistant messages, a reply given as a string becoming one
assistant message), so that any file written here loads with `datasets.load_dataset("json", ...)`
straight into TRL's DPOTrainer and RewardTrainer. Readers accept both shapes.

The canonical unpaired row (binary feedback: one answer, good or not; TRL's unpaired preference format, as its
KTOTrainer reads it):

    {"id": str, "prompt": str | [messages], "completion": str | [messages], "label": bool,
     "source": "human" | "ai", "annotator": str, "judge": object}

`label` is true for a desirable answer (a thumbs-up) and false for an undesirable one; `annotator` and `judge`
are written only when they hold a value. The same two shapes: all strings, or all message lists (the completion
as assistant messages).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from rlhf.errors import InvalidInput
from rlhf.io import write_jsonl

Text = str | list  # a string or a list of {"role", "content"} messages

FIELDS = ("id", "prompt", "chosen", "rejected", "source", "tie", "margin", "annotator", "judge")
UNPAIRED_FIELDS = ("id", "prompt", "completion", "label", "source", "annotator", "judge")
NULLABLE = ("margin", "annotator", "judge")  # written only when they hold a value
SOURCES = ("human", "ai")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    id: str = ""
    source: str = "human"
    tie: bool = False
    margin: float | None = None
    annotator: str | None = None
    judge: dict | None = None

    def __post_init__(self):
        self.source = self.source or "human"
        self.tie = bool(self.tie)
        self.prompt, self.chosen, self.rejected = conform(self.prompt, self.chosen, self.rejected)
        if not self.id:
            self.id = pair_id(self.prompt, self.chosen, self.rejected)

    def to_dict(self) -> dict:
        """The row as written: optional fields without a value (margin, annotator, judge) are left out, so
        that TRL's RewardTrainer, which reads a `margin` column whenever there is one, loads the file as it is."""
        d = self.__dict__  # not dataclasses.asdict: a deep copy of every text that writing a row does not need
        return {k: d[k] for k in FIELDS if not (k in NULLABLE and d[k] is None)}


@dataclass
class UnpairedRow:
    """One answer and whether it is desirable (`label`): the row of the `unpaired` format."""

    prompt: Text
    completion: Text
    label: bool
    id: str = ""
    source: str = "human"
    annotator: str | None = None
    judge: dict | None = None

    def __post_init__(self):
        self.source = self.source or "human"
        self.prompt, self.completion, _ = conform(self.prompt, self.completion, self.completion)
        if not self.id:
            self.id = unpaired_id(self.prompt, self.completion, self.label)

    def to_dict(self) -> dict:
        d = self.__dict__
        return {k: d[k] for k in UNPAIRED_FIELDS if not (k in NULLABLE and d[k] is None)}


def conform(prompt: Text, chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """One shape for the three fields: all strings, or (when any of them is a message list) all message lists,
    a string prompt becoming a user turn and string replies assistant turns (TRL's conversational format)."""
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        return prompt, chosen, rejected
    as_turn = lambda x, role: [{"role": role, "content": x}] if isinstance(x, str) else x  # noqa: E731
    return as_turn(prompt, "user"), as_turn(chosen, "assistant"), as_turn(rejected, "assistant")


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical(obj: Any) -> str:
    """json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")), through one encoder made once
    (json.dumps with arguments builds a new one per call, a cost paid several times per row of a large file)."""
    return _CANONICAL.encode(obj)


def pair_id(prompt: Text, chosen: Text, rejected: Text) -> str:
    return hashlib.sha1(canonical([prompt, chosen, rejected]).encode()).hexdigest()[:16]


def unpaired_id(prompt: Text, completion: Text, label: bool) -> str:
    return hashlib.sha1(canonical([prompt, completion, label]).encode()).hexdigest()[:16]


def text_of(x: Text) -> str:
    """Plain text of a string or a message list (for lengths and comparisons)."""
    if isinstance(x, str):
        return x
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in x)


def reply_text(x: Text) -> str:
    """The text of a reply: a string, or the content of a list of assistant messages."""
    if isinstance(x, str):
        return x
    return "\n".join(m.get("content", "") for m in x if m.get("role") == "assistant") or text_of(x)


def norm_text(s: str) -> str:
    """The form in which two texts are compared: Unicode NFC, whitespace runs collapsed to one space, ends
    stripped; so that an NFD copy or a trailing space does not make a different prompt or response."""
    return " ".join(unicodedata.normalize("NFC", s).split())


def text_key(x: Text) -> str:
    """The comparison key of a string or a message list (roles kept, each content normalised with norm_text).
    Used for chosen-vs-rejected identity, duplicates, conflicts and the train/eval split by prompt."""
    if isinstance(x, str):
        return _str_key(x)
    return canonical([{"role": m.get("role"), "content": norm_text(m["content"])} if isinstance(m, dict)
                      and isinstance(m.get("content"), str) else m for m in x])


@functools.lru_cache(maxsize=16)
def _str_key(x: str) -> str:
    """text_key of a string, remembered for the last few: a row's texts are keyed several times in a row (chosen vs
    rejected, then its repeat key), and normalising is the costly part of reading a large file."""
    return canonical(norm_text(x))


def prompt_key(prompt: Text) -> str:
    return text_key(prompt)


def is_blank(s: str) -> bool:
    """True when `s` shows nothing: only whitespace and invisible format characters (a zero-width space U+200B,
    joiners, U+FEFF, a soft hyphen: Unicode category Cf), which str.strip() keeps."""
    return not any(not c.isspace() and unicodedata.category(c) != "Cf" for c in s)


def check_text(value: Any, name: str) -> str | None:
    """None if `value` is a non-empty string or a non-empty list of valid messages; otherwise the reason. Text of
    only whitespace and invisible characters (a zero-width space) is empty."""
    if isinstance(value, str):
        return None if not is_blank(value) else f"empty {name}"
    if isinstance(value, list):
        if not value:
            return f"empty {name}"
        for j, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                return f"{name}[{j}] must be an object with string 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"{name}[{j}].role is {m['role']!r}; expected one of {list(ROLES)}"
            if not isinstance(m["content"], str):
                return f"{name}[{j}].content must be a string, got {type(m['content']).__name__}"
        if all(is_blank(m["content"]) for m in value):
            return f"empty {name}"
        return None
    return f"'{name}' must be a string or a list of messages, got {type(value).__name__}"


def from_dict(d: dict) -> tuple[PreferencePair | None, str | None]:
    """A canonical row -> PreferencePair, or the reason it is not one."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in d]
    if missing:
        return None, f"missing key '{missing[0]}' (found keys: {sorted(d)})"
    for k in ("prompt", "chosen", "rejected"):
        err = check_text(d[k], k)
        if err:
            return None, err
    if d.get("source", "human") not in SOURCES:
        return None, f"'source' must be 'human' or 'ai', got {d.get('source')!r}"
    if not isinstance(d.get("tie", False), bool):
        return None, f"'tie' must be true or false, got {d.get('tie')!r}"
    margin = d.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        return None, f"'margin' must be a finite number or null, got {margin!r}"
    unknown = set(d) - set(FIELDS)
    if unknown:
        return None, f"unknown keys {sorted(unknown)} in a canonical row"
    return PreferencePair(**{k: d[k] for k in FIELDS if k in d}), None


def unpaired_from_dict(d: dict) -> tuple[UnpairedRow | None, str | None]:
    """A canonical unpaired row -> UnpairedRow, or the reason it is not one."""
    missing = [k for k in ("prompt", "completion", "label") if k not in d]
    if missing:
        return None, f"missing key '{missing[0]}' (found keys: {sorted(d)})"
    for k in ("prompt", "completion"):
        err = check_text(d[k], k)
        if err:
            return None, err
    if not isinstance(d["label"], bool):
        return None, f"'label' must be true or false, got {d['label']!r}"
    if d.get("source", "human") not in SOURCES:
        return None, f"'source' must be 'human' or 'ai', got {d.get('source')!r}"
    unknown = set(d) - set(UNPAIRED_FIELDS)
    if unknown:
        return None, f"unknown keys {sorted(unknown)} in a canonical unpaired row"
    return UnpairedRow(**{k: d[k] for k in UNPAIRED_FIELDS if k in d}), None


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair | UnpairedRow]) -> int:
    """Canonical rows (pairs, or unpaired rows) as JSONL, written atomically."""
    return write_jsonl(path, (p.to_dict() for p in pairs))


def read_pairs(path: str | Path, unpaired: bool = False) -> Iterator[PreferencePair]:
    """Read a canonical JSONL file written by this project (of unpaired rows with `unpaired`); any bad row is an
    error naming its line."""
    parse = unpaired_from_dict if unpaired else from_dict
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pair, err = parse(json.loads(line))
            except json.JSONDecodeError as exc:
                err = f"invalid JSON: {exc.msg}"
            if err:
                raise InvalidInput(f"{path}:{i}: {err}")
            yield pair
