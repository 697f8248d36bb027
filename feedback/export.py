"""Users' feedback in a traffic log (feedback/traffic.py) as the next round's training data.

    rlhf feedback export traffic.db -o pairs.jsonl                    # preferred_over -> preference pairs
    rlhf feedback export traffic.db -o thumbs.jsonl --kind unpaired   # thumbs up/down -> unpaired rows

`pairs`: a feedback row "answer A is preferred over answer B" becomes the canonical pair (feedback/schema.py)
prompt = the messages both answered, chosen = A's response, rejected = B's response, source "human", id
"A>B" (the two completion ids). `unpaired`: a rating becomes {"prompt": messages, "completion": the response,
"label": rating == "up"}, id the completion's id. Both are the conversational shape (message lists), which
`rlhf data validate|import|stats`, the preferences stage and TRL read as they are.

One judgement per thing judged: when an answer was rated more than once, or a pair of answers compared more
than once (in either order), the LATEST feedback wins (a user correcting a click; the log does not say who gave
which, so votes cannot be told from second thoughts) and the earlier ones are counted as superseded. Two
different completions with the same text (the same prompt answered the same way) are one row too: the latest
feedback on either wins. So the output never holds a duplicate or a conflicting duplicate, and passes
`rlhf data validate`.

Nothing is dropped silently: every feedback row is either exported or counted with its reason (the other kind,
superseded, an answer no longer in the log, messages that are not text, an empty response, two identical
responses). Comments are not exported (neither format has a place for them); they stay in the log.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from feedback.schema import ROLES, PreferencePair, UnpairedRow, check_text, is_blank, text_key, write_pairs
from feedback.traffic import TrafficLog
from feedback.validate import repeat_key

KINDS = ("pairs", "unpaired")
REASONS = {  # why a feedback row is not exported, as the summary says it
    "other_kind": "the other kind of feedback",
    "superseded": "superseded by later feedback on the same answer(s)",
    "missing_completion": "an answer no longer in the log (pruned)",
    "unreadable_messages": "messages that are not plain text",
    "empty_response": "an empty response",
    "identical_responses": "two identical responses",
}


def _messages(raw) -> list | None:
    """The recorded request messages as plain {"role", "content"} text messages (content parts joined as the
    server joins them), or None when they cannot be (a role or a part that is not text)."""
    if not isinstance(raw, list):
        return None
    out = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return None
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                return None
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            return None
        out.append({"role": m["role"], "content": content})
    return out if check_text(out, "prompt") is None else None


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


class _Export:
    """The rows of one export and the count of each feedback row left out, by reason."""

    def __init__(self, log: TrafficLog, kind: str, annotator: str | None):
        self.log, self.kind, self.annotator = log, kind, annotator
        self.skipped: Counter = Counter()
        self._completions: dict[str, dict | None] = {}

    def completion(self, id: str) -> dict | None:
        if id not in self._completions:
            self._completions[id] = self.log.get(id)
        return self._completions[id]

    def latest(self, feedback: Iterable[dict]) -> list[dict]:
        """One feedback row per answer (unpaired) or per pair of answers (pairs), the latest; others superseded."""
        by_subject: dict = {}
        for fb in feedback:
            if (fb["rating"] is not None) != (self.kind == "unpaired"):
                self.skipped["other_kind"] += 1
                continue
            subject = fb["id"] if self.kind == "unpaired" else frozenset((fb["id"], fb["preferred_over"]))
            if subject in by_subject:
                self.skipped["superseded"] += 1
            by_subject[subject] = fb  # feedback comes in seq order: the later one wins
        return sorted(by_subject.values(), key=lambda fb: fb["seq"])

    def row(self, fb: dict) -> PreferencePair | UnpairedRow | None:
        """The training row of one feedback row, or None (counted) when there is none."""
        ids = [fb["id"]] if self.kind == "unpaired" else [fb["id"], fb["preferred_over"]]
        answers = [self.completion(i) for i in ids]
        if any(a is None for a in answers):
            self.skipped["missing_completion"] += 1
            return None
        prompt = _messages(answers[0]["messages"])
        if prompt is None:
            self.skipped["unreadable_messages"] += 1
            return None
        texts = [a["response"] for a in answers]
        if any(not isinstance(t, str) or is_blank(t) for t in texts):
            self.skipped["empty_response"] += 1
            return None
        extra = {"source": "human", "annotator": self.annotator}
        if self.kind == "unpaired":
            return UnpairedRow(prompt=prompt, completion=_reply(texts[0]), label=fb["rating"] == "up", id=ids[0],
                               **extra)
        if text_key(texts[0]) == text_key(texts[1]):
            self.skipped["identical_responses"] += 1
            return None
        return PreferencePair(prompt=prompt, chosen=_reply(texts[0]), rejected=_reply(texts[1]),
                              id=f"{ids[0]}>{ids[1]}", **extra)


def export_feedback(db: str | Path, kind: str = "pairs", annotator: str | None = None) -> tuple[list, dict]:
    """The training rows of a traffic log's feedback, and the counts: feedback rows read, rows exported, and the
    feedback rows not exported by reason (REASONS)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    log = TrafficLog(db, readonly=True)
    try:
        ex = _Export(log, kind, annotator)
        feedback = list(log.feedback())
        rows: dict[str, tuple[int, PreferencePair | UnpairedRow]] = {}  # by repeated text: (seq, row)
        for fb in ex.latest(feedback):
            row = ex.row(fb)
            if row is None:
                continue
            key = repeat_key(row)
            if key in rows:  # another completion with the same text: the later feedback (this one) wins
                ex.skipped["superseded"] += 1
            rows[key] = (fb["seq"], row)
    finally:
        log.close()
    out = [row for _, row in sorted(rows.values(), key=lambda sr: sr[0])]
    counts = {"feedback": len(feedback), "exported": len(out), "kind": kind,
              "not_exported": sum(ex.skipped.values()), "not_exported_by_reason": dict(ex.skipped)}
    if kind == "unpaired":
        counts.update(desirable=sum(r.label for r in out), undesirable=sum(not r.label for r in out))
    return out, counts


def write_export(db: str | Path, out: str | Path, kind: str = "pairs", annotator: str | None = None) -> dict:
    """Export and write OUT atomically (an empty file when nothing is exported: the counts say why)."""
    rows, counts = export_feedback(db, kind, annotator)
    write_pairs(out, rows)
    return counts


def describe(counts: dict) -> str:
    """The counts as the command prints them."""
    what = "preference pairs" if counts["kind"] == "pairs" else (
        f"unpaired rows ({counts['desirable']} desirable, {counts['undesirable']} undesirable)")
    line = f"{counts['feedback']} feedback rows: {counts['exported']} exported as {what}"
    if counts["not_exported"]:
        other = ("thumbs ratings (exported with --kind unpaired)" if counts["kind"] == "pairs"
                 else "preferences between two answers (exported with --kind pairs)")
        reasons = "; ".join(f"{n} {other if k == 'other_kind' else REASONS[k]}"
                            for k, n in sorted(counts["not_exported_by_reason"].items()))
        line += f"; {counts['not_exported']} not exported: {reasons}"
    return line
