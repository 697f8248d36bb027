"""The fast path of `scan_file` (feedback/fastpath.py: JSONL read in blocks with pyarrow, rows checked column by
column) gives the same scan as the per-line path: the same rows, messages, counts, repeated-pair decisions and
agreement, on files mixing good rows with every kind of row the fast path must hand to the per-line reader; and a
bad row in the middle of a block of good ones is named as the per-line path names it, never taken silently. Blocks
are made small (a few hundred bytes) so that one file spans many blocks, runs and halvings."""

import json
import random

import pytest

from feedback import candidates, fastpath
from feedback.schema import pair_id
from feedback.validate import row_problems, scan_file, validate_file
from pipeline.cli import main

WORDS = "river hill calm wet lovely ugly bright dark quiet loud".split()


def text(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))


def good(rng: random.Random, i: int) -> dict:
    return {"prompt": f"q{i} {text(rng)}", "chosen": text(rng), "rejected": f"no {text(rng)}"}


# Rows the fast path must not take as they are (each its own line, amid good rows), as JSON text: the per-line
# reader names each one, or reads it as it reads every row (a valid row with an optional field).
ODD = [
    '{"prompt": "Q", "chosen": "same", "rejected": "same"}',  # identical
    '{"prompt": "Q", "chosen": "a  b", "rejected": " a b"}',  # identical once whitespace is collapsed
    '{"prompt": "Q", "chosen": "caf\\u00e9", "rejected": "cafe\\u0301"}',  # identical once NFC
    '{"prompt": "Q", "chosen": "a\\nb", "rejected": "a b"}',  # identical: \\n is whitespace
    '{"prompt": "Q", "chosen": "a\\u001fb", "rejected": "a b"}',  # identical: U+001F is whitespace to str.split
    '{"prompt": "Q", "chosen": "x\\u0020 y", "rejected": "x y"}',  # identical: an escaped space makes two
    '{"prompt": "Q", "chosen": "\\u200b", "rejected": "x"}',  # blank: a zero-width space
    '{"prompt": "   ", "chosen": "x", "rejected": "y"}',  # blank prompt
    '{"prompt": "\\u3000\\u00a0", "chosen": "x", "rejected": "y"}',  # blank: Unicode spaces
    '{"prompt": "Q", "chosen": "Calm \\ud83d", "rejected": "Wet."}',  # lone surrogate
    '{"prompt": "Q", "chosen": "Calm \\ude00 x", "rejected": "Wet."}',  # lone low surrogate
    '{"prompt": "Q", "chosen": "Calm \\ud83d\\ude00", "rejected": "Wet."}',  # a whole pair: valid
    '{"prompt": null, "chosen": "x", "rejected": "y"}',  # null prompt
    '{"prompt": "Q", "chosen": 5, "rejected": "y"}',  # not a string
    '{"prompt": "Q", "rejected": "y"}',  # missing chosen
    '{"prompt": "Q", "chosn": "x", "rejected": "y"}',  # a typo
    '{"question": "Q", "chosen": "x", "rejected": "y"}',  # an alias
    '{"prompt": "Q", "question": "Q2", "chosen": "x", "rejected": "y"}',  # an alias beside the name
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "id": "my-id"}',  # optional fields: their own checks
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "margin": 0.5, "tie": false, "source": "ai"}',
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "margin": "big"}',
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "annotator": " "}',
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "extra": {"a": 1}, "other": [1, 2]}',  # unknown fields: read
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "responses": null}',  # ranked by having the key
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "chosen": "z"}',  # a repeated key
    '{"prompt": "Q", "chosen": "x\ty", "rejected": "y"}',  # a raw tab inside a string: not JSON to Python
    '{"prompt": "Q", "chosen": "x", "rejected": "y"} {"prompt": "Q"}',  # two objects on one line
    '{"prompt": "Q", "chosen": "x", "rejected": "y",}',  # a trailing comma
    '{"prompt": "Q", "chosen": "x", "rejected": NaN}',
    '{broken',
    '',  # a blank line
    '   {"prompt": "Q", "chosen": "indented", "rejected": "y"}',
    '[1, 2]',
    '{"prompt": "Q", "chosen": "x", "rejected": "y"}\r',  # a CRLF line
    '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}',  # HH
    '{"prompt": "Q", "chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}',
    '{"prompt": "Q", "chosen": "\\n\\nHum\\u0061n: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}',
    '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], '
    '"rejected": [{"role": "assistant", "content": "b"}]}',  # messages
    '{"prompt": "Q", "responses": ["a", "b"], "ranks": [1, 2]}',  # ranked
    '{"prompt": "Q", "completion": "a", "label": true}',  # unpaired
    '{"prompt": "Q", "chosen": "x", "rejected": "y", "big": 123456789012345678901234567890}',
    # valid rows whose texts import writes escaped: quotes, a backslash, a newline, a tab, a control character
    '{"prompt": "Say \\"hi\\"", "chosen": "a\\\\b", "rejected": "line 1\\nline 2\\tend\\u0001"}',
    '{"prompt": "caf\u00e9 \U0001f600", "chosen": "\\u00e9t\u00e9", "rejected": "\\ud83d\\ude00 ok"}',
]


def mixed_file(path, seed: int = 0, rows: int = 400) -> None:
    """Good rows, each odd row once at a random place, exact and normalised repeats (some with the labels swapped:
    conflicts; one voted on three times), an explicit id that is another row's auto id, a line that is not UTF-8,
    and a last line without its newline."""
    rng = random.Random(seed)
    lines = [json.dumps(good(rng, i)) for i in range(rows)]
    victim = good(rng, rows)  # its auto id is given to a later row, whose texts differ
    lines += [json.dumps(victim), json.dumps({**good(rng, rows + 1), "id": pair_id(*victim.values())})]
    voted = good(rng, rows + 2)  # given once, then twice the other way: outvoted (majority), conflicts (fail)
    swapped = json.dumps({**voted, "chosen": voted["rejected"], "rejected": voted["chosen"]})
    lines += [json.dumps(voted), swapped, swapped]
    for odd in ODD:
        lines.insert(rng.randrange(len(lines)), odd)
    for _ in range(30):
        row = json.loads(rng.choice([x for x in lines if x.startswith('{"prompt": "q')]))
        kind = rng.random()
        if kind < 0.3:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]  # a conflict
        elif kind < 0.5:
            row["chosen"] = "  " + row["chosen"].replace(" ", "   ") + " "  # the same once normalised
        elif kind < 0.6:
            row["prompt"] = row["prompt"] + "\u00a0"  # a trailing no-break space: the same once normalised
        lines.insert(rng.randrange(len(lines)), json.dumps(row, ensure_ascii=rng.random() < 0.5))
    data = "\n".join(lines).encode() + b"\n"
    data += b'{"prompt": "Q", "chosen": "caf\xe9", "rejected": "y"}\n'  # not UTF-8
    data += json.dumps(good(rng, 9999)).encode()  # the last line without a newline
    path.write_bytes(data)


def scanned(path, fast: bool, **kw) -> dict:
    """Everything a scan says, from rows() and from problem_rows()."""
    with scan_file(path, fast=fast, buffer=16, **kw) as scan:
        rows = [(r.where, r.line, r.error, r.raw, [p.to_dict() for p in r.pairs],
                 [(p.to_dict(), c, why) for p, c, why in r.dropped]) for r in scan.rows()]
        counts = scan.counts()
        problems = [line for r in scan.problem_rows() for line in row_problems(r)]
        assert scan.counts() == counts  # problem_rows counts every row as rows() does
        return {"rows": rows, "counts": counts, "problems": problems, "summary": scan.summary(),
                "agreement": scan.agreement, "notes": scan.notes, "format": scan.format}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(fastpath, "BLOCK", 700)  # a few rows a block: many blocks, runs and halvings
    monkeypatch.setattr(fastpath, "MIN_LINES", 2)
    monkeypatch.setattr(candidates, "CANDIDATE_BATCH", 3)  # repeats resolved a few buckets at a time


def fast_rows(path, **kw) -> int:
    return sum(item.run.rows for item in fastpath.read_items(path, **kw) if isinstance(item, fastpath.Fast))


@pytest.mark.parametrize("mode", ["fail", "first", "majority"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_and_per_line_paths_give_the_same_scan(tmp_path, small_blocks, mode, seed):
    """The same rows (where, line, error, raw text, pairs), problems, counts, agreement and notes with the fast path
    on and off, and the same as validate_file holding every row; most rows went through the fast path."""
    p = tmp_path / "mixed.jsonl"
    mixed_file(p, seed)
    fast, slow = scanned(p, True, duplicates=mode), scanned(p, False, duplicates=mode)
    assert fast == slow
    whole = validate_file(p, duplicates=mode)
    assert slow["problems"] == whole.problems() and slow["counts"] == whole.counts()
    assert slow["agreement"] == whole.agreement
    repeats = {"fail": "conflict", "first": "duplicate", "majority": "outvoted"}[mode]
    assert {"identical", "empty", "bad_unicode", "invalid_json", "not_utf8", repeats, "duplicate_id", "mixed_format",
            "repeated_key", "not_object", "wrong_type"} <= set(slow["counts"]["rejected_by_reason"])
    assert fast_rows(p) > 300


def test_fast_path_with_keys_and_the_format_given(tmp_path, small_blocks):
    """--keys names the columns, and --format pairs reads every row as pairs: the same scan either way."""
    rng = random.Random(3)
    rows = [{"q": f"q{i}", "good": text(rng), "bad": f"no {text(rng)}"} for i in range(200)]
    rows[50] = {"q": "q50", "good": "same", "bad": "same "}
    rows[120] = {"prompt": "q", "chosen": "a", "rejected": "b"}  # not the mapped names
    p = tmp_path / "k.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    for fmt in ("auto", "pairs"):
        fast, slow = scanned(p, True, keys=keys, fmt=fmt), scanned(p, False, keys=keys, fmt=fmt)
        assert fast == slow
        assert len(slow["problems"]) == 2
    assert fast_rows(p, keys=keys) >= 190


BAD_IN_THE_MIDDLE = {
    "identical once normalised": ('{"prompt": "Q", "chosen": "calm  river", "rejected": "calm river "}',
                                  "chosen and rejected are identical once Unicode (NFC) and whitespace are normalised"),
    "zero-width reply": ('{"prompt": "Q", "chosen": "\\u200b", "rejected": "x"}', "empty chosen"),
    "lone surrogate": ('{"prompt": "Q", "chosen": "x \\udc00", "rejected": "y"}',
                       "'chosen' holds a lone surrogate \\udc00 at character 3 (half of a character, e.g. a cut "
                       "emoji): not valid Unicode text"),
    "a null": ('{"prompt": "Q", "chosen": "x", "rejected": null}',
               "'rejected' must be a string or a list of messages, got NoneType"),
    "a bad margin": ('{"prompt": "Q", "chosen": "x", "rejected": "y", "margin": Infinity}',
                     "'margin' must be a finite number, got inf"),
    "a repeated key": ('{"prompt": "Q", "chosen": "x", "rejected": "y", "rejected": "z"}',
                       "the key 'rejected' appears twice in one object (JSON would silently keep the last)"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IN_THE_MIDDLE))
def test_a_bad_row_in_the_middle_of_a_block_is_named_not_taken(tmp_path, capsys, kind):
    """One bad row amid 999 good ones, in one block of the default size: `rlhf data validate` names it with its
    line and the per-line path's reason, and the fast path takes every other row (but the few lines a part that
    pyarrow cannot parse is halved down to)."""
    line, reason = BAD_IN_THE_MIDDLE[kind]
    rng = random.Random(5)
    lines = [json.dumps(good(rng, i)) for i in range(1000)]
    lines[500] = line
    p = tmp_path / "one-bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    assert main(["data", "validate", str(p)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{p}:501: {reason}", "1000 rows: 999 valid, 1 invalid"]
    assert 999 - fastpath.MIN_LINES <= fast_rows(p) <= 999


def test_import_and_stats_write_the_same_with_the_fast_path_on_and_off(tmp_path, small_blocks, monkeypatch, capsys):
    """`rlhf data import` writes the same pairs and rejected rows, and `rlhf data stats` prints the same numbers,
    whether the fast path reads the file or not."""
    p = tmp_path / "mixed.jsonl"
    mixed_file(p, 2)
    outputs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(fastpath, "eligible", lambda *a: False)
        out = tmp_path / f"out-{fast}.jsonl"
        assert main(["data", "import", str(p), "-o", str(out), "--on-error", "skip", "--duplicates", "majority"]) == 0
        printed = capsys.readouterr().out.replace(str(out), "OUT").replace(f"out-{fast}", "out")
        assert main(["data", "stats", str(p), "--json"]) == 0
        outputs.append((out.read_text(), (tmp_path / f"out-{fast}.rejected.jsonl").read_text(), printed,
                        capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0].splitlines()) > 300 and len(outputs[0][1].splitlines()) > 30


def test_ranked_rows_repeating_across_batches_resolve_as_in_memory(tmp_path, small_blocks):
    """Ranked rows whose pairs repeat in other rows (a row's pairs in several digest buckets: one batch of all), and
    pairs rows resolved a few buckets at a time: the same problems, counts and agreement as validate_file."""
    rng = random.Random(7)
    ranked = []
    for i in range(60):
        texts = [text(rng) + f" {i} {j}" for j in range(3)]
        ranked.append({"prompt": f"q{i % 20}", "responses": texts if i < 20 else ranked[i % 20]["responses"][::-1],
                       "ranks": [1, 2, 3]})
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ranked))
    for mode in ("fail", "first", "majority"):
        whole = validate_file(p, duplicates=mode)
        assert scanned(p, True, duplicates=mode)["problems"] == whole.problems() != []
        assert scanned(p, True, duplicates=mode)["agreement"] == whole.agreement
