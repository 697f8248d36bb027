"""Preference readers and validation: each format, each file type, each listed problem, with files
written by the test; the CLI's line numbers, reasons, summary and exit codes."""

import json

import pytest

from feedback.readers import read_rows
from feedback.validate import validate_file
from pipeline.cli import main

PROMPT_MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "How are you?"}]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pairs_of(path, **kw):
    rows = list(read_rows(path, **kw))
    assert all(r.error is None for r in rows), [r.error for r in rows]
    return [p.to_dict() for r in rows for p in r.pairs]


def test_pairs_format_and_aliases(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad", "annotator": "ann1", "margin": 2},
        {"question": "Q2", "response_chosen": "good", "response_rejected": "bad"},
        {"prompt": "Q3", "chosen_response": "good", "rejected_response": "bad", "tie": True},
    ])
    got = pairs_of(p)
    assert [(g["prompt"], g["chosen"], g["rejected"]) for g in got] == [("Q1", "good", "bad"), ("Q2", "good", "bad"),
                                                                         ("Q3", "good", "bad")]
    assert got[0]["annotator"] == "ann1" and got[0]["margin"] == 2 and got[2]["tie"] is True
    assert all(g["source"] == "human" and g["id"] for g in got)
    q = jsonl(tmp_path / "b.jsonl", [{"q": "Q", "good": "x", "bad": "y"}])
    assert pairs_of(q, keys={"prompt": "q", "chosen": "good", "rejected": "bad"})[0]["chosen"] == "x"


def test_messages_format_both_shapes(tmp_path):
    p = jsonl(tmp_path / "m.jsonl", [
        {"prompt": PROMPT_MSGS, "chosen": [{"role": "assistant", "content": "Fine."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": PROMPT_MSGS + [{"role": "assistant", "content": "Fine."}],
         "rejected": PROMPT_MSGS + [{"role": "assistant", "content": "Go away."}]},
    ])
    got = pairs_of(p)
    assert got[0] == got[1] and got[0]["prompt"] == PROMPT_MSGS
    # TRL's conversational format: a message prompt goes with replies as lists of one assistant message
    assert (got[0]["chosen"], got[0]["rejected"]) == ([{"role": "assistant", "content": "Fine."}],
                                                      [{"role": "assistant", "content": "Go away."}])


def test_hh_multi_turn_split(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?"
    p = jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + "\n\nAssistant: Fine.",
                                       "rejected": shared + "\n\nAssistant: Go away."}])
    rows = list(read_rows(p, detected=(det := [])))
    assert det == ["hh"]
    pair = rows[0].pairs[0]
    assert pair.prompt == PROMPT_MSGS and (pair.chosen, pair.rejected) == (
        [{"role": "assistant", "content": "Fine."}], [{"role": "assistant", "content": "Go away."}])


def test_ranked_expansion(tmp_path):
    p = jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]},
        {"prompt": "P", "responses": [{"text": "x", "score": 0.5}, {"text": "y", "score": 2.0}]},
    ])
    got = [(g["prompt"], g["chosen"], g["rejected"], g["tie"], g.get("margin")) for g in pairs_of(p)]
    assert got == [("Q", "b", "a", False, None), ("Q", "b", "c", False, None), ("Q", "a", "c", True, None),
                   ("P", "y", "x", False, 1.5)]
    best = [(g["chosen"], g["rejected"], g["tie"]) for g in pairs_of(p, ranked="best_vs_rest")]
    assert best == [("b", "a", False), ("b", "c", False), ("y", "x", False)]


def test_every_file_type_reads_the_same_pairs(tmp_path):
    import pandas as pd
    from datasets import Dataset

    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"},
            {"prompt": "Q2", "chosen": "yes", "rejected": "no"}]
    expected = pairs_of(jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.json", "a.csv", "a.parquet", "ds"):
        assert pairs_of(tmp_path / name) == expected, name
    msgs = [{"prompt": PROMPT_MSGS, "chosen": "A", "rejected": "B"}]
    pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in msgs[0].items()}]).to_csv(
        tmp_path / "m.csv", index=False)
    assert pairs_of(tmp_path / "m.csv")[0]["prompt"] == PROMPT_MSGS, "CSV cells holding JSON lists are parsed"


BAD_ROWS = [
    ({"prompt": "ok", "chosen": "good", "rejected": "bad"}, None),
    ("{broken json", "invalid JSON"),
    ("[1, 2]", "row is a list, not an object"),
    ({"prompt": "Q", "chosen": "a"}, "missing key 'rejected' (found keys: ['chosen', 'prompt'])"),
    ({"prompt": "Q", "chosen": "a", "rejectd": "b"}, "'rejectd' looks like a typo for 'rejected'"),
    ({"prompt": "Q", "chosen": 5, "rejected": "b"}, "'chosen' must be a string or a list of messages, got int"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"prompt": "Q", "chosen": "a", "rejected": ""}, "empty rejected"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "ok", "chosen": "good", "rejected": "bad"}, "exact duplicate of line 1"),
    ({"prompt": "C", "chosen": "x", "rejected": "y"}, "conflicting duplicate of line 12"),
    ({"prompt": "C", "chosen": "y", "rejected": "x"}, "conflicting duplicate of line 11"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "tie": "yes"}, "'tie' must be true or false"),
]


def _mixed_file(tmp_path):
    p = jsonl(tmp_path / "mixed.jsonl", [r for r, _ in BAD_ROWS])
    with open(p, "ab") as f:
        f.write(b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n')
    return p


def test_mixed_file_validate_cli(tmp_path, capsys):
    p = _mixed_file(tmp_path)
    assert main(["data", "validate", str(p), "--format", "pairs"]) == 1
    out = capsys.readouterr().out.splitlines()
    for line, (_, reason) in enumerate(BAD_ROWS, 1):
        if reason:
            assert any(o.startswith(f"{p}:{line}: ") and reason in o for o in out), (line, reason, out)
    assert any(o.startswith(f"{p}:14: not valid UTF-8") for o in out)
    assert out[-1] == "14 rows: 1 valid, 13 invalid"
    assert len(out) == 14, "one line per problem plus the summary"


def test_import_skip_accounts_for_every_row(tmp_path, capsys):
    p = _mixed_file(tmp_path)
    out = tmp_path / "out.jsonl"
    assert main(["data", "import", str(p), "-o", str(out), "--format", "pairs"]) == 1
    assert not out.exists(), "fail writes nothing"
    assert main(["data", "import", str(p), "-o", str(out), "--format", "pairs", "--on-error", "skip"]) == 0
    accepted = out.read_text().splitlines()
    rejected = [json.loads(x) for x in (tmp_path / "out.rejected.jsonl").read_text().splitlines()]
    assert len(accepted) + len(rejected) == 14
    assert all(r["reason"] and r["where"].startswith(f"{p}:") and "row" in r for r in rejected)
    canon = json.loads(accepted[0])
    # required keys always; margin, annotator and judge only when they hold a value
    assert {"id", "prompt", "chosen", "rejected", "source", "tie"} <= set(canon) <= {
        "id", "prompt", "chosen", "rejected", "source", "tie", "margin", "annotator", "judge"}
    assert main(["data", "validate", str(tmp_path / "nope.jsonl")]) == 2


def test_hh_structural_problems(tmp_path):
    s = "\n\nHuman: Hi\n\nAssistant: Hello"
    p = jsonl(tmp_path / "hh.jsonl", [
        {"chosen": s + "\n\nHuman: more?", "rejected": s + "\n\nHuman: more?\n\nAssistant: x"},
        {"chosen": "\n\nHuman: A\n\nAssistant: one", "rejected": "\n\nHuman: B\n\nAssistant: two"},
        {"chosen": "\n\nHuman: A\n\nAssistant: ", "rejected": "\n\nHuman: A\n\nAssistant: two"},
    ])
    reasons = [r.error[1] for r in read_rows(p, fmt="hh")]
    assert "ends on a user turn, not an assistant reply" in reasons[0]
    assert "differ before the last assistant turn" in reasons[1]
    assert reasons[2] == "empty chosen reply"


def test_truncation_checks_with_tokenizer(tmp_path, tiny_path):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(tiny_path)
    p = jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Tell me about the river.", "chosen": "The river is calm and lovely.",
         "rejected": "The river is dull and cold."},
        {"prompt": "Tell me about the river. " * 20, "chosen": "Calm.", "rejected": "Dull."},
        {"prompt": "Hi", "chosen": "The river is calm and lovely and bright and warm and cheerful and friendly.",
         "rejected": "The river is calm and lovely and bright and warm and cheerful and dull."},
    ])
    report = validate_file(p, tokenizer=tok, max_length=24)
    assert report.rows[0].error is None
    assert "responses would be empty after truncation to max_length 24" in report.rows[1].error[1]
    assert "identical after truncation to max_length 24" in report.rows[2].error[1]
    assert validate_file(p, tokenizer=tok, max_length=256).summary() == "3 rows: 3 valid, 0 invalid"


def test_stats_reports_annotator_agreement(tmp_path, capsys):
    p = jsonl(tmp_path / "s.jsonl", [
        {"prompt": "Q", "chosen": "a", "rejected": "b", "annotator": "x"},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "annotator": "y"},
        {"prompt": "Q", "chosen": "b", "rejected": "a", "annotator": "z"},
        {"prompt": "R", "chosen": "c", "rejected": "d", "annotator": "x", "tie": True},
    ])
    assert main(["data", "stats", str(p), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["agreement"] == {"pairs_labelled_more_than_once": 1, "label_pairs": 3, "agreement": round(1 / 3, 4)}
    assert stats["ties"] == 1 and stats["annotators"]["x"] == 1 and stats["rows_read"] == 4
    assert main(["data", "stats", str(p)]) == 0
    assert "annotator agreement: 0.3333" in capsys.readouterr().out


def test_real_hh_sample(capsys, tmp_path):
    from tests.conftest import SHARED_DATA

    src = SHARED_DATA / "hh-rlhf-harmless-sample.jsonl"
    if not src.exists():
        pytest.skip("../shared/data is not beside this checkout")
    assert main(["data", "validate", str(src)]) == 1
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert "format: hh" in cap.err
    assert lines[-1] == "1200 rows: 1198 valid, 2 invalid"
    bad = {int(line.split(":")[1]): line.split(": ", 1)[1] for line in lines[:-1]}
    assert bad == {335: "empty chosen reply", 1013: "empty chosen reply"}
    # rows where the assistant continues its own turn (221, 317, 763, 827, 939) are read, merged, and noted
    assert "5 rows of hh transcripts had consecutive turns of one role (the first at line 221)" in cap.err
    out = tmp_path / "hh.jsonl"
    assert main(["data", "import", str(src), "-o", str(out), "--on-error", "skip"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    rejected = [json.loads(x) for x in (tmp_path / "hh.rejected.jsonl").read_text().splitlines()]
    assert len(rows) == 1198 and len(rejected) == 2
    row_221 = json.loads(src.read_text().splitlines()[220])
    merged = next(r for r in rows if r["rejected"][0]["content"] == row_221["rejected"].rsplit("Assistant: ", 1)[1])
    assert merged["chosen"][0]["content"].startswith("Human: I think there's an easier way")
    assert merged["chosen"][0]["content"].endswith("then we can talk more about it later?")
    assert [m["role"] for m in merged["prompt"]] == ["user", "assistant", "user"]
    first = json.loads(src.read_text().splitlines()[0])
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["prompt"][-1]["role"] == "user"
    assert rows[0]["chosen"][0]["role"] == rows[0]["rejected"][0]["role"] == "assistant"
    assert first["chosen"].endswith(rows[0]["chosen"][0]["content"])
    assert first["rejected"].endswith(rows[0]["rejected"][0]["content"])
    assert all(isinstance(r["prompt"], list) and isinstance(r["chosen"], list) for r in rows)


def _rows(path, n, odd=(), name="rejectd"):
    return jsonl(path, [{"prompt": f"p{i}", "chosen": "x", ("rejected" if i not in odd else name): "y"}
                        for i in range(n)])


def test_one_odd_key_is_a_typo_not_a_keys_mapping(tmp_path, capsys):
    """One row of five with `rejectd`: a typo in that row; no --keys suggestion, which would break the other four."""
    p = _rows(tmp_path / "five.jsonl", 5, odd={4})
    assert main(["data", "validate", str(p)]) == 1
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [
        f"{p}:5: missing key 'rejected' (found keys: ['chosen', 'prompt', 'rejectd']); 'rejectd' looks like a typo "
        "for 'rejected'", "5 rows: 4 valid, 1 invalid"]
    assert "--keys" not in cap.out + cap.err


def test_keys_suggested_when_most_rows_use_the_other_name(tmp_path, capsys):
    p = _rows(tmp_path / "most.jsonl", 5, odd={0, 1, 2, 3})
    assert main(["data", "validate", str(p)]) == 1
    err = capsys.readouterr().err
    # the rows above were each called a typo as they were read: the note says which it is
    assert (f"note: {p}: 4 of 5 rows name the rejected column 'rejectd', so it is this file's name for it, not a "
            "typo in each row: read it with --keys rejected=rejectd" in err)
    # following the hint: the four read, the odd one is named as a row whose own name differs
    assert main(["data", "validate", str(p), "--keys", "rejected=rejectd"]) == 1
    cap = capsys.readouterr()
    assert cap.out.splitlines()[-1] == "5 rows: 4 valid, 1 invalid"
    assert f"{p}:5: missing key 'rejectd' (from --keys rejected=rejectd" in cap.out
    assert "this row names it 'rejected'" in cap.out and "--keys rejected=rejected" not in cap.out + cap.err


def test_a_keys_mapping_that_misses_most_rows_says_to_leave_it_out(tmp_path, capsys):
    """The issue's trap: following a one-row hint for the whole file; now it says which name the rows use."""
    p = _rows(tmp_path / "five.jsonl", 5, odd={4})
    assert main(["data", "validate", str(p), "--keys", "rejected=rejectd"]) == 1
    cap = capsys.readouterr()
    assert "cannot tell the format" not in cap.out
    assert (f"note: {p}: 4 of 5 rows name the rejected column 'rejected', not 'rejectd': leave out "
            "--keys rejected=rejectd" in cap.err)


def test_notes_never_interleave_with_stdout(tmp_path):
    """Through one pipe (2>&1), every line is whole: stdout is flushed before a note is written."""
    import subprocess
    import sys
    p = _rows(tmp_path / "most.jsonl", 5, odd={0, 1, 2, 3})
    out = subprocess.run([sys.executable, "-m", "pipeline", "data", "validate", str(p)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True).stdout.splitlines()
    assert out[-3].startswith("note: ") and out[-2:] == ["format: pairs", "5 rows: 1 valid, 4 invalid"]
    assert all(line.startswith((f"{p}:", "note: ", "format: ", "5 rows: ")) for line in out), out
