"""The `unpaired` preference format (prompt, completion, label: TRL's unpaired format, what KTOTrainer reads):
detected, read from JSONL, CSV and Parquet alike, every bad row named by FILE:LINE with its reason, repeated
answers resolved like repeated pairs, and `rlhf data validate|import|stats` on it."""

import json

import pytest

from feedback.readers import read_rows
from feedback.schema import read_pairs
from feedback.validate import validate_file
from pipeline.cli import main
from tests.conftest import ROOT

GOOD = [{"prompt": "Tell me about the river.", "completion": "The river is calm.", "label": True},
        {"prompt": "Tell me about the lake.", "completion": "The lake is dull.", "label": False},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}],
         "label": True, "annotator": "ann1"}]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_rows_read_in_both_shapes_and_detected(tmp_path):
    rows = list(read_rows(jsonl(tmp_path / "u.jsonl", GOOD), detected=(det := [])))
    assert det == ["unpaired"] and all(r.error is None for r in rows)
    got = [p.to_dict() for r in rows for p in r.pairs]
    assert [(g["prompt"], g["completion"], g["label"]) for g in got[:2]] == [
        ("Tell me about the river.", "The river is calm.", True), ("Tell me about the lake.", "The lake is dull.", False)]
    assert got[2]["completion"] == [{"role": "assistant", "content": "Hello!"}] and got[2]["annotator"] == "ann1"
    assert all(g["id"] and g["source"] == "human" for g in got)
    # a pair file with a `label` column is still a pair file
    pairs = jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b", "label": "helpful"}])
    assert validate_file(pairs).format == "pairs" and validate_file(pairs).ok


def test_validate_names_every_bad_row(tmp_path, capsys):
    path = jsonl(tmp_path / "bad.jsonl", [
        GOOD[0],
        GOOD[1],
        {"prompt": "Tell me about the lake.", "completion": "The lake is  dull.", "label": True},  # conflicts with 2
        {"prompt": "Tell me about the sea.", "completion": " ", "label": True},
        {"prompt": "Tell me about the sea.", "completion": "The sea is warm.", "label": "yes"},
        {"prompt": "Tell me about the sea.", "completion": "The sea is warm.", "label": 1},
        {"prompt": "Tell me about the sea.", "completon": "The sea is warm.", "label": True},
        {"prompt": "Tell me about the sea.", "completion": "The sea is warm.", "lable": True},
        {"prompt": "Tell me about the sea.", "completion": 7, "label": True},
        {"prompt": "Tell me about the sea.", "chosen": "a", "rejected": "b"},
        {"prompt": "Tell me about the sea.", "completion": "The sea is warm.", "label": True, "margin": 2.0},
        GOOD[0],
        "{not json",
    ])
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    want = {
        2: "conflicting duplicate of line 3 (same prompt and completion, different label)",
        3: "conflicting duplicate of line 2",
        4: "empty completion",
        5: "'label' must be true or false (desirable or not), got 'yes'",
        6: "'label' must be true or false (desirable or not), got 1",
        7: "missing key 'completion' (found keys: ['completon', 'label', 'prompt']); 'completon' looks like a typo",
        8: "missing key 'label' (found keys: ['completion', 'lable', 'prompt']); 'lable' looks like a typo",
        9: "'completion' must be a string or a list of messages, got int",
        10: "this row is in the pairs format but the file's first row",
        11: "'margin' on an unpaired row",
        12: "exact duplicate of line 1",
        13: "invalid JSON",
    }
    for n, reason in want.items():
        assert any(line.startswith(f"{path}:{n}: {reason}") for line in lines), (n, lines)
    assert lines[-1] == "13 rows: 1 valid, 12 invalid"
    assert "format: unpaired" in out.err and "repeated rows: 2 labelled more than once" in out.err


def test_csv_labels_and_bad_rows_by_line(tmp_path, capsys):
    path = tmp_path / "u.csv"
    path.write_text('prompt,completion,label\n'
                    'Tell me about the river.,The river is calm.,true\n'
                    'Tell me about the lake.,"The lake is\ndull.",0\n'
                    'Tell me about the sea.,The sea is warm.,maybe\n'
                    'Tell me about the sky.,The sky is grey.,\n'
                    'Tell me about the park.,The park is nice.,Yes\n')
    assert main(["data", "validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}:5: 'label' must be true or false (desirable or not), got 'maybe'")
    assert lines[1].startswith(f"{path}:6: 'label' must be true or false (desirable or not), got ''")
    assert lines[-1] == "5 rows: 3 valid, 2 invalid"
    out = tmp_path / "out.jsonl"
    assert main(["data", "import", str(path), "-o", str(out), "--on-error", "skip"]) == 0
    assert "wrote 3 unpaired rows" in capsys.readouterr().out
    rows = [r.to_dict() for r in read_pairs(out, unpaired=True)]
    assert [(r["completion"], r["label"]) for r in rows] == [("The river is calm.", True), ("The lake is\ndull.", False),
                                                             ("The park is nice.", True)]
    rejected = [json.loads(x) for x in (tmp_path / "out.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in rejected] == [(5, "wrong_type"), (6, "wrong_type")]
    # the canonical file reads back as it was written, and validates
    assert validate_file(out).ok and validate_file(out).format == "unpaired"


def test_parquet_reads_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = GOOD[:2]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "u.parquet")
    report = validate_file(tmp_path / "u.parquet")
    assert report.ok and report.format == "unpaired"
    assert [p.to_dict() for p in report.pairs] == [p.to_dict() for p in validate_file(jsonl(tmp_path / "u.jsonl", rows)).pairs]


def test_stats_counts_desirable_and_undesirable(tmp_path, capsys):
    path = jsonl(tmp_path / "u.jsonl", GOOD + [
        {"prompt": "Tell me about the sea.", "completion": "The sea is cold.", "label": False},
        {"prompt": "Tell me about the sea.", "completion": "The sea is grey.", "label": False}])
    assert main(["data", "stats", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["format"], stats["desirable"], stats["undesirable"], stats["desirable_share"]) == ("unpaired", 2, 3, 0.4)
    assert stats["distinct_prompts"] == 4 and set(stats["lengths"]) == {"prompt", "completion"}
    assert main(["data", "stats", str(path)]) == 0
    assert "desirable: 2; undesirable: 3" in capsys.readouterr().out


@pytest.mark.parametrize("mode,kept", [("first", [True]), ("majority", [False])])
def test_repeated_answers_resolved_like_pairs(tmp_path, mode, kept):
    row = {"prompt": "Tell me about the sea.", "completion": "The sea is cold."}
    path = jsonl(tmp_path / "r.jsonl", [{**row, "label": True}, {**row, "label": False}, {**row, "label": False}])
    report = validate_file(path, duplicates=mode)
    assert [p.label for p in report.pairs] == kept
    assert report.agreement["pairs_labelled_more_than_once"] == 1


def test_keys_map_an_unpaired_files_own_names(tmp_path, capsys):
    path = jsonl(tmp_path / "k.jsonl", [{"question": "Q", "answer": "A", "thumbs_up": False}])
    assert main(["data", "validate", str(path), "--format", "unpaired", "--keys", "completion=answer,label=thumbs_up"]) == 0
    assert validate_file(path, "unpaired", {"completion": "answer", "label": "thumbs_up"}).pairs[0].label is False


def test_agree_refuses_unpaired_rows(tmp_path, capsys):
    path = jsonl(tmp_path / "u.jsonl", GOOD)
    assert main(["feedback", "agree", "--human", str(path), "--judge", str(ROOT / "configs" / "judges" / "rule.yaml")]) == 2
    assert "agreement is measured on pairs" in capsys.readouterr().err
