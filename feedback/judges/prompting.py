"""Pairwise judge prompts: a template, a constitution of principles, and fenced responses.

Responses are untrusted text. Each one is placed between fence lines that carry a tag derived
from a hash of the whole item; a response that contains the fence (or anything that looks like
a fence line) has it neutralised first, so a response can neither close its fence nor pose as
the instructions that follow it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from feedback.schema import canonical
from rlhf.errors import UsageError
from rlhf.yaml import load_yaml

_FENCE_LIKE = re.compile(r"^(\s*)(<{3,}|>{3,}|={3,}|`{3,}|#{3,}\s*(END|BEGIN))", re.M | re.I)


@dataclass
class Template:
    system: str
    user: str  # with {prompt}, {response_a}, {response_b}, {principles}
    choices: tuple[str, str, str] = ("A", "B", "TIE")
    source: str = "built-in"

    def hash(self) -> str:
        return hashlib.sha256(canonical([self.system, self.user, list(self.choices)]).encode()).hexdigest()[:16]


def load_template(path: str | Path) -> Template:
    data = load_yaml(path)
    if not isinstance(data, dict) or not {"system", "user"} <= set(data):
        raise UsageError(f"{path}: a judge template needs 'system' and 'user'")
    unknown = set(data) - {"system", "user", "choices"}
    if unknown:
        raise UsageError(f"{path}: {sorted(unknown)[0]}: unknown key")
    for key in ("{prompt}", "{response_a}", "{response_b}"):
        if key not in data["user"]:
            raise UsageError(f"{path}: user: the template must contain {key}")
    choices = tuple(data.get("choices", ("A", "B", "TIE")))
    return Template(data["system"], data["user"], choices, str(path))


def load_principles(path: str | Path) -> list[str]:
    data = load_yaml(path)
    principles = data.get("principles") if isinstance(data, dict) else None
    if not isinstance(principles, list) or not all(isinstance(p, str) and p.strip() for p in principles):
        raise UsageError(f"{path}: principles: expected a list of non-empty strings")
    return principles


def render_text(x) -> str:
    """A response or prompt as the judge reads it: a string, a single assistant reply as its text, a
    dialogue as [role] lines."""
    if isinstance(x, str):
        return x
    if len(x) == 1 and x[0].get("role") == "assistant":
        return x[0]["content"]
    return "\n".join(f"[{m['role']}] {m['content']}" for m in x)


# Every line break a reader (a model, or a tokenizer's pre-splitting) may treat as one: \r\n, \r, vertical
# tab, form feed, NEL (U+0085), and the Unicode line and paragraph separators.
_LINE_BREAKS = re.compile(r"\r\n|[\r\v\f\x85\u2028\u2029]")


def neutralise(text: str) -> str:
    """Break anything that looks like a fence line so it cannot end the block it sits in; every kind of line
    break becomes \\n first, so a fence after a \\r or U+2028 is caught as well."""
    text = _LINE_BREAKS.sub("\n", text)
    return _FENCE_LIKE.sub(lambda m: m.group(1) + "\u200b" + m.group(2), text)


def fence(label: str, text: str, tag: str) -> str:
    body = neutralise(text)
    open_, close = f"<<<{label} {tag}>>>", f"<<<END {label} {tag}>>>"
    for marker in (open_, close):  # the exact fence mid-line (not caught as a fence line): escape it too
        body = body.replace(marker, "<\u200b" + marker[1:])
    return f"{open_}\n{body}\n{close}"


def select_principles(principles: list[str], mode: str, n: int, key: str) -> list[str]:
    if not principles or mode == "none":
        return []
    if mode == "all" or n >= len(principles):
        return list(principles)
    # seeded by the item, so a rerun (and the cache) sees the same principles
    rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    return rng.sample(principles, n)


def build_messages(template: Template, prompt, response_a, response_b, principles: list[str]) -> list[dict]:
    tag = hashlib.sha256(canonical([prompt, response_a, response_b]).encode()).hexdigest()[:10]
    text = template.user.format(
        prompt=fence("CONVERSATION", render_text(prompt), tag),
        response_a=fence("RESPONSE A", render_text(response_a), tag),
        response_b=fence("RESPONSE B", render_text(response_b), tag),
        principles="\n".join(f"- {p}" for p in principles) or "- Prefer the more helpful, honest and harmless response.",
    )
    return [{"role": "system", "content": template.system}, {"role": "user", "content": text}]


def parse_choice(text: str | None, choices: tuple[str, str, str] = ("A", "B", "TIE")) -> str:
    """The answer -> a | b | tie | abstain. Strict: one choice word, optionally after 'Answer:' and in bold
    or brackets; anything else (including answers that name both) is abstain, never a winner."""
    if not text:
        return "abstain"
    t = text.strip()
    t = re.sub(r"^(final\s+)?(answer|verdict|choice)\s*[:\-]\s*", "", t, flags=re.I)
    t = t.strip("*`'\" \n[]().")
    mapping = {choices[0].upper(): "a", choices[1].upper(): "b", choices[2].upper(): "tie"}
    up = t.upper()
    if up in mapping:
        return mapping[up]
    first = re.match(r"^([A-Za-z]+)\b[\s.!:]*$", t)
    if first and first.group(1).upper() in mapping:
        return mapping[first.group(1).upper()]
    m = re.match(r"^(?:RESPONSE\s+)?([A-Za-z]+)\b", t, flags=re.I)
    if m and m.group(1).upper() in mapping and len(t) <= 40:
        rest = t[m.end():].upper()
        others = [c for c in mapping if c != m.group(1).upper()]
        if not any(re.search(rf"\b{re.escape(o)}\b", rest) for o in others):
            return mapping[m.group(1).upper()]
    return "abstain"
