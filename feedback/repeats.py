"""Repeated pairs and reused ids across a preference file: which copies `validate` rejects and why.

Two pairs repeat when they hold the same prompt and the same two responses, in either order, on normalised text
(`schema.text_key`: Unicode NFC, whitespace collapsed); unpaired rows when they hold the same prompt and completion.
How the copies are resolved (`fail`, `first`, `majority`) is described in validate.py, which uses these checks on
every row (validate_file) or on the rows whose digests repeat (scan_file).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from feedback.readers import Row
from feedback.schema import PreferencePair, UnpairedRow, canonical, norm_text, text_key

Copy = tuple[Row, int]  # one copy of a repeated pair: its row and the pair's index in row.pairs
Rejection = tuple[Row, int, str, str]  # (row, pair index, code, reason)


def _label(p: PreferencePair | UnpairedRow) -> str:
    if isinstance(p, UnpairedRow):
        return "desirable" if p.label else "undesirable"
    return "tie" if p.tie else text_key(p.chosen)


def repeat_key(p: PreferencePair | UnpairedRow) -> str:
    """The same prompt and the same two responses, in either order (unpaired: the same completion), on normalised
    text."""
    if isinstance(p, UnpairedRow):
        return canonical([text_key(p.prompt), text_key(p.completion)])
    return canonical([text_key(p.prompt), sorted([text_key(p.chosen), text_key(p.rejected)])])


def norm_key(x) -> str:
    """A text's normal form, equal for two texts exactly when their text_key is: a string's norm_text (which never
    starts with a space: what fastpath.py gets without Python for most rows), a message list's text_key after a
    space."""
    return norm_text(x) if isinstance(x, str) else " " + text_key(x)


def repeat_texts(p: PreferencePair | UnpairedRow) -> tuple[str, ...]:
    """The normal forms (norm_key) a repeat is found by: (prompt, chosen, rejected), the responses in the order
    given (digests.repeat_digests takes them in either order); unpaired rows: (prompt, completion). What scan_file
    digests, cheaper than the JSON of repeat_key."""
    return tuple(map(norm_key, _texts(p)))


def _texts(p: PreferencePair | UnpairedRow) -> list:
    return [p.prompt, p.completion] if isinstance(p, UnpairedRow) else [p.prompt, p.chosen, p.rejected]


def _what(p: PreferencePair | UnpairedRow) -> tuple[str, str]:
    """How messages name what repeats and what its copies disagree on."""
    return ("prompt and completion", "label") if isinstance(p, UnpairedRow) else ("prompt and responses",
                                                                                  "preference")


def _repeat_groups(rows: list[Row]) -> list[list[Copy]]:
    """The pairs of valid rows labelled more than once, grouped by repeat_key, in file order."""
    groups: dict[str, list[Copy]] = defaultdict(list)
    for row in rows:
        if row.error is None:
            for i, p in enumerate(row.pairs):
                groups[repeat_key(p)].append((row, i))
    return [g for g in groups.values() if len(g) > 1]


def _agreement(groups: list[list[Copy]]) -> dict:
    """Over pairs labelled more than once: the share of label pairs (two copies) that agree."""
    return agreement(_agreement_counts(groups))


def _agreement_counts(groups: list[list[Copy]]) -> tuple[int, int, int]:
    """(pairs labelled more than once, label pairs, label pairs that agree): what agreement() reports, as counts
    that add up over groups checked apart (candidates.py)."""
    agree = total = 0
    for g in groups:
        labels = [_label(row.pairs[i]) for row, i in g]
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                total += 1
                agree += labels[a] == labels[b]
    return len(groups), total, agree


def agreement(counts: tuple[int, int, int]) -> dict:
    groups, total, agree = counts
    return {"pairs_labelled_more_than_once": groups, "label_pairs": total,
            "agreement": round(agree / total, 4) if total else None}


def _where(row: Row, path: str) -> str:
    """How a message names another row: "line 12" in text files, "row 3" or "train:row 3" otherwise."""
    loc = row.where[len(path) + 1:] if row.where.startswith(path + ":") else row.where
    return f"line {loc}" if loc.isdigit() else loc


def _same_text(a: PreferencePair | UnpairedRow, b: PreferencePair | UnpairedRow) -> bool:
    return canonical(_texts(a)) == canonical(_texts(b))


def _pair(m: Copy) -> PreferencePair:
    return m[0].pairs[m[1]]


def _resolve(group: list[Copy], mode: str, path: str) -> list[Rejection]:
    """The copies of one repeated pair to reject. `fail`: every copy when the labels differ, else the later copies;
    `first`: the later copies; `majority`: all but the first copy of the winning label (every copy on a tie)."""
    labels = [_label(_pair(m)) for m in group]
    if mode == "first":
        kept = _where(group[0][0], path)
        return [(*m, "duplicate", f"{'duplicate' if lab == labels[0] else 'repeat with a different label'} of "
                 f"{kept}, which is kept (--duplicates first)") for m, lab in zip(group[1:], labels[1:])]
    if mode == "fail" and len(set(labels)) > 1:
        same, differs = _what(_pair(group[0]))
        return [(*m, "conflict", f"conflicting duplicate of {_where(_first_other(group, labels, lab)[0], path)} "
                 f"(same {same}, different {differs})") for m, lab in zip(group, labels)]
    return _resolve_votes(group, labels, path)


def _first_other(group: list[Copy], labels: list[str], label: str) -> Copy:
    """The first copy whose label differs from `label`."""
    return next(m for m, lab in zip(group, labels) if lab != label)


def _resolve_votes(group: list[Copy], labels: list[str], path: str) -> list[Rejection]:
    """Keep the first copy of the label most copies give: the other agreeing copies are duplicates, the rest
    outvoted; when two labels have as many votes, no copy is kept."""
    votes = Counter(labels).most_common()
    winner, top = votes[0]
    if len(votes) > 1 and votes[1][1] == top:
        split = "-".join(str(n) for _, n in votes)
        where = ", ".join(_where(m[0], path) for m in group)
        return [(*m, "conflict", f"conflicting duplicate with no majority (votes {split} across {where})")
                for m in group]
    kept = group[labels.index(winner)]
    out = []
    for m, lab in zip(group, labels):
        if m is kept:
            continue
        if lab != winner:
            out.append((*m, "outvoted", f"outvoted ({top} of {len(group)} {_winner_says(winner, lab)})"))
        elif _same_text(_pair(m), _pair(kept)):
            out.append((*m, "duplicate", f"exact duplicate of {_where(kept[0], path)}"))
        else:
            out.append((*m, "duplicate", f"duplicate of {_where(kept[0], path)} (same {_what(_pair(m))[0]} and label "
                                         "once Unicode and whitespace are normalised)"))
    return out


def _winner_says(winner: str, loser: str) -> str:
    if winner in ("desirable", "undesirable"):
        return f"labelled it {winner}"
    if winner == "tie":
        return "called it a tie"
    return "preferred one of the responses" if loser == "tie" else "preferred the other response"


def _reject_pairs(rejections: list[Rejection]) -> None:
    """Apply pair rejections: a row losing all its pairs is rejected (first reason); otherwise only those pairs go."""
    by_row: dict[int, list] = defaultdict(list)
    rows = {}
    for row, i, code, reason in rejections:
        by_row[id(row)].append((i, code, reason))
        rows[id(row)] = row
    for key, items in by_row.items():
        row, gone = rows[key], {i for i, _, _ in items}
        if len(gone) == len(row.pairs):
            i, code, reason = min(items)
            row.error = (code, reason)
        else:
            row.dropped += [(row.pairs[i], code, reason) for i, code, reason in sorted(items)]
            row.pairs = [p for i, p in enumerate(row.pairs) if i not in gone]


def _check_repeats(rows: list[Row], mode: str, path: str) -> dict:
    """Resolve repeated pairs per `mode`; returns the agreement over them (measured before resolving)."""
    return agreement(_check_repeat_counts(rows, mode, path))


def _check_repeat_counts(rows: list[Row], mode: str, path: str) -> tuple[int, int, int]:
    """_check_repeats, the agreement as _agreement_counts."""
    groups = _repeat_groups(rows)
    counts = _agreement_counts(groups)
    _reject_pairs([r for g in groups for r in _resolve(g, mode, path)])
    return counts


def _check_ids(rows: list[Row], path: str) -> None:
    """An id used by two kept rows: the later one is rejected, naming the first."""
    seen: dict[str, Row] = {}
    for row in rows:
        if row.error is not None:
            continue
        for p in row.pairs:
            if p.id in seen and seen[p.id] is not row:
                row.error = ("duplicate_id", f"duplicate id {p.id!r}: {_where(seen[p.id], path)} has it too")
                break
            seen.setdefault(p.id, row)
