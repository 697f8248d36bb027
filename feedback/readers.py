"""Preference files in the shapes users have, turned into canonical `PreferencePair`s.

Formats (detected from the first row, or given with `--format`):
- `pairs`: prompt / chosen / rejected strings; also the aliases question / response_chosen /
  response_rejected and chosen_response / rejected_response, or any names given in `keys`.
- `messages`: {"role", "content"} lists: a `prompt` of shared turns with chosen/rejected replies,
  or two full conversations that share every turn but the last assistant one.
- `hh`: Anthropic HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."), split into the
  shared dialogue (messages) and the two final assistant replies.
- `ranked`: a prompt with several responses and ranks (1 = best) or scores (higher = better),
  expanded into all pairs or best-versus-rest; equal ranks become ties.

Each row yields a `Row`: its location, the pairs it expands to, or an error `(code, reason)`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from feedback.records import iter_records
from feedback.schema import PreferencePair, check_text

FORMATS = ("auto", "pairs", "messages", "hh", "ranked")
RANKED_MODES = ("all_pairs", "best_vs_rest")
ALIASES = {
    "prompt": ("prompt", "question"),
    "chosen": ("chosen", "response_chosen", "chosen_response"),
    "rejected": ("rejected", "response_rejected", "rejected_response"),
}
OPTIONAL = ("id", "source", "tie", "margin", "annotator", "judge")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass
class Row:
    where: str
    line: int
    pairs: list[PreferencePair] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (code, reason)
    raw: str | None = None


class Bad(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


# --------------------------------------------------------------------------- helpers


def _find_key(row: dict, role: str, keys: dict[str, str] | None, required: bool = True) -> str | None:
    if keys and role in keys:
        names = (keys[role],)
    else:
        names = ALIASES[role]
    for name in names:
        if name in row:
            return name
    if not required:
        return None
    hint = ""
    close = difflib.get_close_matches(names[0], [str(k) for k in row], n=1, cutoff=0.7)
    if close:
        hint = f"; did you mean '{close[0]}'? (map it with --keys {role}={close[0]})"
    raise Bad("missing_key", f"missing key '{names[0]}' (found keys: {sorted(map(str, row))}){hint}")


def _checked(value: Any, name: str) -> Any:
    err = check_text(value, name)
    if err:
        raise Bad("empty" if err.startswith("empty") else "wrong_type", err)
    return value


def _optional(row: dict) -> dict:
    out = {}
    for k in OPTIONAL:
        if k not in row or row[k] is None:
            continue
        v = row[k]
        if k == "tie" and not isinstance(v, bool):
            raise Bad("wrong_type", f"'tie' must be true or false, got {v!r}")
        if k == "margin" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise Bad("wrong_type", f"'margin' must be a number, got {v!r}")
        if k == "source" and v not in ("human", "ai"):
            raise Bad("wrong_type", f"'source' must be 'human' or 'ai', got {v!r}")
        if k in ("id", "annotator") and not isinstance(v, (str, int)):
            raise Bad("wrong_type", f"'{k}' must be a string, got {type(v).__name__}")
        out[k] = str(v) if k in ("id", "annotator") else v
    return out


def _distinct(chosen: Any, rejected: Any) -> None:
    if chosen == rejected:
        raise Bad("identical", "chosen and rejected are identical")


def split_dialogues(chosen: list[dict], rejected: list[dict], what: str = "conversations") -> tuple:
    """Two full dialogues -> (shared prompt turns, chosen reply, rejected reply)."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv:
            raise Bad("empty", f"empty {name} {what[:-1]}")
        if conv[-1]["role"] != "assistant":
            raise Bad("ends_on_human", f"the {name} {what[:-1]} ends on a {conv[-1]['role']} turn, not an assistant reply")
    if chosen[:-1] != rejected[:-1]:
        n = min(len(chosen), len(rejected)) - 1
        k = next((i for i in range(n) if chosen[i] != rejected[i]), n)
        raise Bad("prefix_mismatch",
                  f"the {what} differ before the last assistant turn (first at turn {k + 1}; chosen has "
                  f"{len(chosen)} turns, rejected {len(rejected)})")
    prompt = chosen[:-1]
    if not prompt:
        raise Bad("empty", f"the {what} have no turns before the final replies (empty prompt)")
    c, r = chosen[-1]["content"], rejected[-1]["content"]
    if not c.strip():
        raise Bad("empty", "empty chosen reply")
    if not r.strip():
        raise Bad("empty", "empty rejected reply")
    return prompt, c, r


def parse_hh(transcript: str, name: str) -> list[dict]:
    if not isinstance(transcript, str):
        raise Bad("wrong_type", f"'{name}' must be a transcript string, got {type(transcript).__name__}")
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise Bad("wrong_type", f"the {name} transcript does not start with a 'Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


# --------------------------------------------------------------------------- per-format row readers


def read_pairs_row(row: dict, keys=None, source="human") -> list[PreferencePair]:
    kp, kc, kr = (_find_key(row, role, keys) for role in ("prompt", "chosen", "rejected"))
    prompt, chosen, rejected = _checked(row[kp], "prompt"), _checked(row[kc], "chosen"), _checked(row[kr], "rejected")
    _distinct(chosen, rejected)
    return [PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, **{"source": source, **_optional(row)})]


def read_messages_row(row: dict, keys=None, source="human") -> list[PreferencePair]:
    kc, kr = _find_key(row, "chosen", keys), _find_key(row, "rejected", keys)
    kp = _find_key(row, "prompt", keys, required=False)
    chosen, rejected = _checked(row[kc], "chosen"), _checked(row[kr], "rejected")
    if kp is not None:
        prompt = _checked(row[kp], "prompt")
    else:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise Bad("wrong_type", "without a 'prompt', 'chosen' and 'rejected' must be full conversations (message lists)")
        prompt, chosen, rejected = split_dialogues(chosen, rejected)
    _distinct(chosen, rejected)
    return [PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, **{"source": source, **_optional(row)})]


def read_hh_row(row: dict, keys=None, source="human") -> list[PreferencePair]:
    kc, kr = _find_key(row, "chosen", keys), _find_key(row, "rejected", keys)
    chosen, rejected = parse_hh(row[kc], "chosen"), parse_hh(row[kr], "rejected")
    prompt, c, r = split_dialogues(chosen, rejected, what="transcripts")
    _distinct(c, r)
    return [PreferencePair(prompt=prompt, chosen=c, rejected=r, **{"source": source, **_optional(row)})]


def read_ranked_row(row: dict, keys=None, source="human", mode="all_pairs") -> list[PreferencePair]:
    kp = _find_key(row, "prompt", keys)
    prompt = _checked(row[kp], "prompt")
    rkey = next((k for k in ("responses", "completions") if k in row), None)
    if rkey is None:
        raise Bad("missing_key", f"missing key 'responses' (found keys: {sorted(row)})")
    items = row[rkey]
    if not isinstance(items, list) or len(items) < 2:
        raise Bad("wrong_type", f"'{rkey}' must be a list of at least 2 responses")
    texts, values, higher_better = [], [], None
    for j, it in enumerate(items):
        if isinstance(it, dict):
            tk = next((k for k in ("text", "response", "content") if k in it), None)
            if tk is None:
                raise Bad("missing_key", f"{rkey}[{j}] needs 'text' (found keys: {sorted(it)})")
            texts.append(_checked(it[tk], f"{rkey}[{j}]"))
            vk = next((k for k in ("rank", "score") if k in it), None)
            if vk:
                values.append(it[vk])
                higher_better = vk == "score"
        else:
            texts.append(_checked(it, f"{rkey}[{j}]"))
    if not values:
        vk = next((k for k in ("ranks", "scores") if k in row), None)
        if vk is None:
            raise Bad("missing_key", f"missing 'ranks' or 'scores' for the responses (found keys: {sorted(row)})")
        values, higher_better = row[vk], vk == "scores"
    if not isinstance(values, list) or len(values) != len(texts):
        raise Bad("wrong_type", f"{len(texts)} responses but {len(values) if isinstance(values, list) else 0} ranks/scores")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise Bad("wrong_type", "ranks and scores must be numbers")
    for a in range(len(texts)):
        for b in range(a + 1, len(texts)):
            if texts[a] == texts[b]:
                raise Bad("identical", f"responses {a + 1} and {b + 1} are identical")
    goodness = [v if higher_better else -v for v in values]
    extra = {"source": source, **{k: v for k, v in _optional(row).items() if k not in ("id", "tie", "margin")}}
    out = []
    order = sorted(range(len(texts)), key=lambda i: -goodness[i])
    if mode == "best_vs_rest":
        combos = [(order[0], j) for j in order[1:]]
    else:
        combos = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    for i, j in combos:
        margin = float(goodness[i] - goodness[j]) if higher_better else None
        out.append(PreferencePair(prompt=prompt, chosen=texts[i], rejected=texts[j],
                                  tie=goodness[i] == goodness[j], margin=margin, **extra))
    return out


READERS = {"pairs": read_pairs_row, "messages": read_messages_row, "hh": read_hh_row, "ranked": read_ranked_row}


def detect_format(row: Any, keys=None) -> str | None:
    if not isinstance(row, dict):
        return None
    if "responses" in row or "completions" in row:
        return "ranked"
    try:
        kc = _find_key(row, "chosen", keys)
        _find_key(row, "rejected", keys)
    except Bad:
        return None
    chosen = row[kc]
    if isinstance(chosen, list):
        return "messages"
    has_prompt = _find_key(row, "prompt", keys, required=False) is not None
    if isinstance(chosen, str) and not has_prompt and ("\n\nAssistant:" in chosen or chosen.startswith("\n\nHuman:")):
        return "hh"
    return "pairs"


def read_rows(path, fmt: str = "auto", keys: dict[str, str] | None = None, source: str = "human",
              ranked: str = "all_pairs", detected: list | None = None) -> Iterator[Row]:
    """Every row of `path` as a Row; `detected` (a list) receives the format used."""
    chosen_fmt = None if fmt == "auto" else fmt
    for rec in iter_records(path):
        if rec.error:
            code = "not_utf8" if "UTF-8" in rec.error else "invalid_json"
            yield Row(rec.where, rec.line, error=(code, rec.error), raw=rec.raw)
            continue
        if not isinstance(rec.value, dict):
            yield Row(rec.where, rec.line, error=("not_object", f"row is a {type(rec.value).__name__}, not an object"),
                      raw=rec.raw)
            continue
        if chosen_fmt is None:
            chosen_fmt = detect_format(rec.value, keys)
            if chosen_fmt is None:
                yield Row(rec.where, rec.line, raw=rec.raw, error=(
                    "missing_key", f"cannot tell the format: no chosen/rejected or responses keys "
                    f"(found keys: {sorted(rec.value)}); use --format and --keys"))
                continue
            if detected is not None:
                detected.append(chosen_fmt)
        try:
            if chosen_fmt == "ranked":
                pairs = read_ranked_row(rec.value, keys, source, ranked)
            else:
                pairs = READERS[chosen_fmt](rec.value, keys, source)
            yield Row(rec.where, rec.line, pairs=pairs, raw=rec.raw)
        except Bad as bad:
            yield Row(rec.where, rec.line, error=(bad.code, bad.reason), raw=rec.raw)
