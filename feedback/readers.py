"""Preference files in the shapes users have, turned into canonical `PreferencePair`s.

Formats (detected on every row, a file holding the one of its first row; or given with `--format`):
- `pairs`: prompt / chosen / rejected strings; also the aliases question / response_chosen /
  response_rejected and chosen_response / rejected_response, or any names given in `keys`.
- `messages`: {"role", "content"} lists: a `prompt` of shared turns with chosen/rejected replies,
  or two full conversations that share every turn but the last assistant one.
- `hh`: Anthropic HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."), split into the
  shared dialogue (messages) and the two final assistant replies. Line endings are normalised
  (\\r\\n and \\r to \\n) first; consecutive turns of one role (real HH data has the assistant
  continuing its own turn, or a "Human:" written without its blank line) are merged into one turn,
  counted in a note, which is how TRL's prompt/reply split reads them. A turn marker quoted inside a
  turn's text cannot be told from a real one. Transcripts are detected even beside a `prompt`
  column, which is then ignored (with a note): the transcripts hold the whole dialogue.
- `ranked`: a prompt with several responses and ranks (1 = best) or scores (higher = better),
  expanded into all pairs or best-versus-rest; equal ranks become ties. A row mixing ranks and
  scores is refused; so are non-finite values (NaN, Infinity), which would rank first or last. The
  row's `id` names its pairs (`ID:1>3`: response 1 over response 3); a row-level `tie: true` or
  `margin` is refused (ties and margins come from the ranks and scores).
- `unpaired`: one answer and whether it is desirable: prompt / completion / label (true or false;
  TRL's unpaired preference format, what its KTOTrainer reads); detected on a row with a
  completion or a label and no chosen/rejected. A label must be a boolean (in CSV: true/false, 1/0,
  yes/no); `tie` and `margin` have no meaning on such a row and are refused. Each row yields one
  `UnpairedRow` (in `Row.pairs`, the list of what a row yields).

With `auto`, every row's format is detected: a file holds one format (pairs and messages rows may
mix), and a row of another format than the first row's is rejected, naming that row, rather than
read in the wrong shape (a later HH row read as pairs would import whole transcripts as replies).

Texts are compared (chosen vs rejected, identical responses) on `schema.text_key`: Unicode NFC,
whitespace collapsed. Each row yields a `Row`: its location, the pairs it expands to, or an error
`(code, reason)`; validate.py may later set aside single pairs of a row (`dropped`).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from feedback.files import iter_records
from feedback.schema import SOURCES, PreferencePair, UnpairedRow, check_text, is_blank, text_key

FORMATS = ("auto", "pairs", "messages", "hh", "ranked", "unpaired")
RANKED_MODES = ("all_pairs", "best_vs_rest")
ALIASES = {
    "prompt": ("prompt", "question"),
    "chosen": ("chosen", "response_chosen", "chosen_response"),
    "rejected": ("rejected", "response_rejected", "rejected_response"),
    "completion": ("completion",),  # unpaired rows
    "label": ("label",),
}
OPTIONAL = ("id", "source", "tie", "margin", "annotator", "judge")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Row:
    where: str
    line: int
    pairs: list[PreferencePair | UnpairedRow] = field(default_factory=list)  # what the row yields
    error: tuple[str, str] | None = None  # (code, reason)
    raw: str | None = None
    dropped: list[tuple[PreferencePair, str, str]] = field(default_factory=list)  # (pair, code, reason)
    typo: tuple[str, str] | None = None  # (role, the row's name close to it): counted to hint at --keys


class Bad(Exception):
    def __init__(self, code: str, reason: str, typo: tuple[str, str] | None = None):
        super().__init__(reason)
        self.code, self.reason, self.typo = code, reason, typo


# --------------------------------------------------------------------------- helpers


def _find_key(row: dict, role: str, keys: dict[str, str] | None, required: bool = True) -> str | None:
    mapped = bool(keys and role in keys)
    names = (keys[role],) if mapped else ALIASES[role]
    for name in names:
        if name in row:
            return name
    if not required:
        return None
    found = sorted(map(str, row))
    if mapped:  # the user's own name is missing: say so, and what this row has instead
        usual = [n for n in ALIASES[role] if n in row]
        hint = (f"; this row names it '{usual[0]}', and --keys applies to every row: rename the column in the odd "
                "rows" if usual else "")
        raise Bad("missing_key", f"missing key '{names[0]}' (from --keys {role}={names[0]}; found keys: {found}){hint}",
                  typo=(role, usual[0]) if usual else None)
    close = difflib.get_close_matches(names[0], found, n=1, cutoff=0.7)
    if close:  # one row: a typo to fix; most rows: read_rows suggests --keys once, for the file
        raise Bad("missing_key", f"missing key '{names[0]}' (found keys: {found}); '{close[0]}' looks like a typo "
                  f"for '{names[0]}'", typo=(role, close[0]))
    raise Bad("missing_key", f"missing key '{names[0]}' (found keys: {found})")


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
        if k == "margin" and not math.isfinite(v):
            raise Bad("not_finite", f"'margin' must be a finite number, got {v!r}")
        if k == "source" and v not in SOURCES:
            raise Bad("wrong_type", f"'source' must be 'human' or 'ai', got {v!r}")
        if k in ("id", "annotator") and not isinstance(v, (str, int)):
            raise Bad("wrong_type", f"'{k}' must be a string, got {type(v).__name__}")
        if k in ("id", "annotator") and isinstance(v, str) and is_blank(v):
            raise Bad("empty", f"'{k}' is blank; leave it out (or null) when there is none")
        if k == "judge":
            _check_judge(v)
        out[k] = str(v) if k in ("id", "annotator") else v
    return out


def _check_judge(v: Any) -> None:
    """A judge field is an object that can be written as JSON: no NaN or Infinity inside (a canonical file is JSON)."""
    if not isinstance(v, dict):
        raise Bad("wrong_type", f"'judge' must be an object, got {type(v).__name__}")
    try:
        json.dumps(v, allow_nan=False)
    except ValueError:
        raise Bad("not_finite", "'judge' holds a non-finite number (NaN or Infinity), which JSON cannot hold") from None
    except TypeError as exc:
        raise Bad("wrong_type", f"'judge' holds a value that is not JSON: {exc}") from None


def _distinct(chosen: Any, rejected: Any) -> None:
    if chosen == rejected:
        raise Bad("identical", "chosen and rejected are identical")
    if text_key(chosen) == text_key(rejected):
        raise Bad("identical", "chosen and rejected are identical once Unicode (NFC) and whitespace are normalised")


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
    if is_blank(c):
        raise Bad("empty", "empty chosen reply")
    if is_blank(r):
        raise Bad("empty", "empty rejected reply")
    return prompt, c, r


def hh_text(transcript: str) -> str:
    """A transcript with \\r\\n and \\r line endings made \\n (files edited on Windows), and a first turn written
    "Human: ..." without the leading blank line given one, so that every turn starts with "\\n\\nHuman:"."""
    text = transcript.replace("\r\n", "\n").replace("\r", "\n")
    return "\n\n" + text if text.startswith("Human:") else text


def looks_hh(text: Any) -> bool:
    """A transcript: a "\\n\\nHuman:" turn followed by a "\\n\\nAssistant:" turn (after hh_text)."""
    if not isinstance(text, str):
        return False
    text = hh_text(text)
    human = text.find("\n\nHuman:")
    return human >= 0 and text.find("\n\nAssistant:", human) > human


def parse_hh(transcript: str, name: str, merged: list | None = None) -> list[dict]:
    """A transcript -> messages. Consecutive turns of one role (real HH data has the assistant continuing its own
    turn, and a "Human:" written inline leaves two Assistant markers in a row) are merged into one turn, their texts
    joined by a blank line, as a reader splitting the transcript at its last shared turn reads them (TRL does);
    `merged` (a list) receives `name` when that happened."""
    if not isinstance(transcript, str):
        raise Bad("wrong_type", f"'{name}' must be a transcript string, got {type(transcript).__name__}")
    parts = _HH_TURN.split(hh_text(transcript))
    if parts[0].strip():
        raise Bad("wrong_type", f"the {name} transcript does not start with a 'Human:' turn")
    turns: list[dict] = []
    for i in range(1, len(parts), 2):
        role, text = _HH_ROLES[parts[i]], parts[i + 1].strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{text}".strip()
            if merged is not None and name not in merged:
                merged.append(name)
        else:
            turns.append({"role": role, "content": text})
    return turns


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


def read_hh_row(row: dict, keys=None, source="human", merged: list | None = None) -> list[PreferencePair]:
    kc, kr = _find_key(row, "chosen", keys), _find_key(row, "rejected", keys)
    chosen, rejected = parse_hh(row[kc], "chosen", merged), parse_hh(row[kr], "rejected", merged)
    prompt, c, r = split_dialogues(chosen, rejected, what="transcripts")
    _distinct(c, r)
    return [PreferencePair(prompt=prompt, chosen=c, rejected=r, **{"source": source, **_optional(row)})]


def _ranked_items(row: dict, rkey: str) -> tuple[list, list | None, str | None]:
    """The responses of a ranked row, with the ranks or scores given inside the items (if any) and their kind."""
    items = row[rkey]
    if not isinstance(items, list) or len(items) < 2:
        raise Bad("wrong_type", f"'{rkey}' must be a list of at least 2 responses")
    texts, values, kinds = [], [], set()
    for j, it in enumerate(items):
        if not isinstance(it, dict):
            texts.append(_checked(it, f"{rkey}[{j}]"))
            continue
        tk = next((k for k in ("text", "response", "content") if k in it), None)
        if tk is None:
            raise Bad("missing_key", f"{rkey}[{j}] needs 'text' (found keys: {sorted(it)})")
        texts.append(_checked(it[tk], f"{rkey}[{j}]"))
        found = [k for k in ("rank", "score") if k in it]
        kinds.update(found)
        if found:
            values.append(it[found[0]])
    if len(kinds) > 1:
        raise Bad("mixed_rank_score", f"'{rkey}' mixes 'rank' and 'score'; give one of them for every response")
    return texts, values or None, kinds.pop() + "s" if kinds else None


def _ranked_values(row: dict, texts: list, values: list | None, kind: str | None) -> tuple[list, bool]:
    """The ranks or scores (one per response, finite numbers) and whether higher is better (scores)."""
    listed = [k for k in ("ranks", "scores") if k in row]
    if len(listed) > 1:
        raise Bad("mixed_rank_score", "the row has both 'ranks' and 'scores'; give one of them")
    if listed and kind:
        raise Bad("mixed_rank_score",
                  f"the responses carry {kind} and the row also has '{listed[0]}'; give one of them")
    if kind is None:
        if not listed:
            raise Bad("missing_key", f"missing 'ranks' or 'scores' for the responses (found keys: {sorted(row)})")
        kind, values = listed[0], row[listed[0]]
    if not isinstance(values, list) or len(values) != len(texts):
        raise Bad("wrong_type", f"{len(texts)} responses but {len(values) if isinstance(values, list) else 0} ranks/scores")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise Bad("wrong_type", "ranks and scores must be numbers")
    bad = [j + 1 for j, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise Bad("not_finite", f"{kind} must be finite numbers; response {bad[0]} has {values[bad[0] - 1]!r}")
    return values, kind == "scores"


def read_ranked_row(row: dict, keys=None, source="human", mode="all_pairs") -> list[PreferencePair]:
    kp = _find_key(row, "prompt", keys)
    prompt = _checked(row[kp], "prompt")
    rkey = next((k for k in ("responses", "completions") if k in row), None)
    if rkey is None:
        raise Bad("missing_key", f"missing key 'responses' (found keys: {sorted(row)})")
    texts, values, kind = _ranked_items(row, rkey)
    values, higher_better = _ranked_values(row, texts, values, kind)
    norm = [text_key(t) for t in texts]
    for a in range(len(texts)):
        for b in range(a + 1, len(texts)):
            if norm[a] == norm[b]:
                raise Bad("identical", f"responses {a + 1} and {b + 1} are identical"
                          + ("" if texts[a] == texts[b] else " once Unicode (NFC) and whitespace are normalised"))
    goodness = [v if higher_better else -v for v in values]
    optional = _optional(row)
    if optional.get("tie"):
        raise Bad("wrong_type", "'tie' on a ranked row: ties come from equal ranks or scores; leave it out")
    if optional.get("margin") is not None:
        raise Bad("wrong_type", "'margin' on a ranked row: margins come from score differences; leave it out")
    row_id = optional.get("id")
    extra = {"source": source, **{k: v for k, v in optional.items() if k not in ("id", "tie", "margin")}}
    out = []
    order = sorted(range(len(texts)), key=lambda i: -goodness[i])
    if mode == "best_vs_rest":
        combos = [(order[0], j) for j in order[1:]]
    else:
        combos = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    for i, j in combos:
        margin = float(goodness[i] - goodness[j]) if higher_better else None
        out.append(PreferencePair(prompt=prompt, chosen=texts[i], rejected=texts[j],
                                  tie=goodness[i] == goodness[j], margin=margin,
                                  id=f"{row_id}:{i + 1}>{j + 1}" if row_id else "", **extra))
    return out


def read_unpaired_row(row: dict, keys=None, source="human") -> list[UnpairedRow]:
    kp, kc, kl = (_find_key(row, role, keys) for role in ("prompt", "completion", "label"))
    prompt, completion = _checked(row[kp], "prompt"), _checked(row[kc], "completion")
    label = row[kl]
    if not isinstance(label, bool):
        raise Bad("wrong_type", f"'{kl}' must be true or false (desirable or not), got {label!r}: a JSON boolean "
                  "(in CSV: true/false, 1/0 or yes/no)")
    optional = _optional(row)
    for k in ("tie", "margin"):
        if optional.get(k):
            raise Bad("wrong_type", f"'{k}' on an unpaired row: an answer is desirable or not; leave it out")
    extra = {k: v for k, v in optional.items() if k not in ("tie", "margin")}
    return [UnpairedRow(prompt=prompt, completion=completion, label=label, **{"source": source, **extra})]


READERS = {"pairs": read_pairs_row, "messages": read_messages_row, "hh": read_hh_row, "ranked": read_ranked_row,
           "unpaired": read_unpaired_row}


def detect_format(row: Any, keys=None) -> str | None:
    """The format of a row: ranked (responses), unpaired (a completion or a label, no chosen/rejected), messages
    (lists), hh (both replies are transcripts, even beside a prompt column; without one, a chosen transcript is
    enough), or pairs."""
    if not isinstance(row, dict):
        return None
    if "responses" in row or "completions" in row:
        return "ranked"
    if (not any(_find_key(row, role, keys, required=False) for role in ("chosen", "rejected"))
            and any(_find_key(row, role, keys, required=False) for role in ("completion", "label"))):
        return "unpaired"
    try:
        kc = _find_key(row, "chosen", keys)
        kr = _find_key(row, "rejected", keys)
    except Bad:
        return None
    chosen = row[kc]
    if isinstance(chosen, list):
        return "messages"
    if looks_hh(chosen) and looks_hh(row[kr]):
        return "hh"
    has_prompt = _find_key(row, "prompt", keys, required=False) is not None
    if isinstance(chosen, str) and not has_prompt and ("\n\nAssistant:" in hh_text(chosen)
                                                       or hh_text(chosen).startswith("\n\nHuman:")):
        return "hh"
    return "pairs"


def read_rows(path, fmt: str = "auto", keys: dict[str, str] | None = None, source: str = "human",
              ranked: str = "all_pairs", detected: list | None = None, split: str | None = None,
              notes: list | None = None) -> Iterator[Row]:
    """Every row of `path` as a Row; `detected` (a list) receives the format used, `notes` (a list) what the user
    should know about how the file was read (dataset splits read and skipped, a prompt column ignored)."""
    notes = [] if notes is None else notes
    reader = RowReader(path, fmt, keys, source, ranked, detected, notes)
    for rec in iter_records(path, split=split, notes=notes, message_columns=reader.columns):
        yield reader.read(rec)
    reader.finish()


class RowReader:
    """The rows of one file read in order (read_rows; fastpath.read_items, which hands it the lines its fast path
    does not take): the file's format (given, or detected on the first row that tells it), where it was detected,
    and what the notes given at the end count."""

    def __init__(self, path, fmt: str, keys: dict[str, str] | None, source: str, ranked: str,
                 detected: list | None, notes: list):
        self.path, self.keys, self.source, self.ranked, self.detected, self.notes = (
            path, keys, source, ranked, detected, notes)
        self.auto = fmt == "auto"
        self.fmt = None if self.auto else fmt
        self.first = None  # (auto) where the file's format was read from
        self.columns = [n for names in ALIASES.values() for n in names] + list((keys or {}).values())
        self.noted = False  # hh: the note about a prompt column is given once, from the first row
        self.merged = [0, None]  # hh: how many rows had consecutive turns of one role, and where the first is (not a
        #                          list of every such row: memory must not grow with the file)
        self.typos: Counter = Counter()  # (role, the name rows use instead): how many rows
        self.rows = 0  # objects read (the denominator of "most rows")

    def read(self, rec) -> Row:
        """The Row of one record, in file order."""
        if rec.error:
            return Row(rec.where, rec.line, error=(rec.code or "unreadable", rec.error), raw=rec.raw)
        if not isinstance(rec.value, dict):
            return Row(rec.where, rec.line, error=("not_object", f"row is a {type(rec.value).__name__}, not an object"),
                       raw=rec.raw)
        keys = self.keys
        if self.fmt is None:
            self.fmt = detect_format(rec.value, keys)
            if self.fmt is None:
                row = _undetected(rec, keys)
                if row.typo:
                    self.typos[row.typo] += 1
                self.rows += 1
                return row
            self._detected(rec.where)
        elif self.first is not None:
            other = _other_format(rec.value, keys, self.fmt)
            if other:
                return Row(rec.where, rec.line, raw=rec.raw, error=("mixed_format", (
                    f"this row is in the {other} format but the file's first row ({self.first}) is {self.fmt}: a "
                    f"file holds one format; split the file, or give --format (data.format) to read every row as one")))
        if self.fmt == "hh" and not self.noted:
            self.noted = _note_ignored_prompt(self.path, rec.value, keys, self.notes)
        row = _read_row(rec, self.fmt, keys, self.source, self.ranked, self.merged)
        if row.typo:
            self.typos[row.typo] += 1
        self.rows += 1
        return row

    def _detected(self, where: str) -> None:
        self.first = where
        if self.detected is not None:
            self.detected.append(self.fmt)

    def takes_pairs(self) -> bool:
        """Whether a row of prompt/chosen/rejected strings read now is read as the pairs format (the format given,
        or detected from it: no earlier row told another)."""
        return self.fmt == "pairs" or (self.auto and self.fmt is None)

    def took_pairs(self, where: str, rows: int) -> None:
        """`rows` rows of the pairs format, the first at `where`, were read elsewhere (fastpath.py: valid rows of
        prompt/chosen/rejected strings that no later check needs to see): counted as read() counts them."""
        if self.fmt is None:
            self.fmt = "pairs"
            self._detected(where)
        self.rows += rows

    def finish(self) -> None:
        """The notes about the whole file, once every row was read."""
        path, merged = self.path, self.merged
        _note_typos(path, self.typos, self.rows, self.keys, self.notes)
        if merged[0]:
            loc = merged[1][len(str(path)) + 1:]
            self.notes.append(f"{path}: {merged[0]} row{'s' * (merged[0] != 1)} of hh transcripts had consecutive "
                              f"turns of one role (the first at {'line ' * loc.isdigit()}{loc}), merged into one "
                              "turn each")


def _undetected(rec, keys) -> Row:
    """A row whose format cannot be told: when it has one of chosen/rejected, the other one's missing key (with a
    close name, a typo) is the reason, not the format."""
    row = rec.value
    reasons = []
    for role in ("chosen", "rejected"):
        try:
            _find_key(row, role, keys)
        except Bad as bad:
            reasons.append(bad)
    if len(reasons) == 1:
        return Row(rec.where, rec.line, raw=rec.raw, error=(reasons[0].code, reasons[0].reason), typo=reasons[0].typo)
    typo = next((b.typo for b in reasons if b.typo), None)
    return Row(rec.where, rec.line, raw=rec.raw, typo=typo, error=(
        "missing_key", f"cannot tell the format: no chosen/rejected, completion/label or responses keys (found keys: "
        f"{sorted(map(str, row))}); use --format and --keys"))


def _note_typos(path, typos: Counter, rows: int, keys, notes: list) -> None:
    """Suggest --keys only when most rows use another name for a role; a few odd rows are typos, and mapping the
    name for every row would break the rest (their row-level message says 'looks like a typo'). When a --keys
    mapping itself misses most rows, which name they use instead."""
    for (role, name), n in typos.most_common():
        if 2 * n <= rows:
            continue
        if keys and role in keys:
            notes.append(f"{path}: {n} of {rows} rows name the {role} column '{name}', not '{keys[role]}': "
                         f"leave out --keys {role}={keys[role]} (data.keys in a config)")
        else:
            # the rows were reported one by one as they were read, each as a typo; most of them is the file's name
            notes.append(f"{path}: {n} of {rows} rows name the {role} column '{name}', so it is this file's name "
                         f"for it, not a typo in each row: read it with --keys {role}={name} (data.keys in a config)")


def _other_format(row: Any, keys, fmt: str) -> str | None:
    """The format of a row when it is not the file's (pairs and messages rows mix: the readers share their shape)."""
    found = detect_format(row, keys)
    if found is None or found == fmt or {found, fmt} <= {"pairs", "messages"}:
        return None
    return found


def _note_ignored_prompt(path, row: dict, keys, notes: list) -> bool:
    """HH rows beside a prompt column: the transcripts hold the whole dialogue, so the column is not read; say so."""
    kp = _find_key(row, "prompt", keys, required=False)
    if kp is not None:
        notes.append(f"{path}: the '{kp}' column is ignored: the hh transcripts in chosen/rejected hold the "
                     "whole dialogue")
    return True


def _read_row(rec, fmt: str, keys, source: str, ranked: str, merged: list) -> Row:
    try:
        if fmt == "ranked":
            pairs = read_ranked_row(rec.value, keys, source, ranked)
        elif fmt == "hh":
            turns: list = []
            pairs = read_hh_row(rec.value, keys, source, turns)
            if turns:
                merged[0] += 1
                merged[1] = merged[1] or rec.where
        else:
            pairs = READERS[fmt](rec.value, keys, source)
        return Row(rec.where, rec.line, pairs=pairs, raw=rec.raw)
    except Bad as bad:
        return Row(rec.where, rec.line, error=(bad.code, bad.reason), raw=rec.raw, typo=bad.typo)
