"""Every file is read as written: CSV quoting, byte-order marks, CSV cell types, non-finite numbers, dataset
splits, HH transcripts, normalised duplicates and JSON Lines in .json. The small inputs are tests/data/edge-*
(written byte for byte by tests/data/make_edge_files.py); large or binary ones are made here in tmp_path."""

import json
from pathlib import Path

import pytest

from feedback.readers import read_rows
from feedback.schema import PreferencePair
from feedback.validate import validate_file
from pipeline.cli import main

DATA = Path(__file__).resolve().parents[1] / "data"


def edge(name: str) -> Path:
    return DATA / f"edge-{name}"


def errors(path, **kw) -> dict[str, str]:
    """{location after the file name: reason} for every rejected row (whole-file checks included)."""
    return {r.where[len(str(path)) + 1:]: r.error[1] for r in validate_file(path, **kw).rows if r.error}


def pairs(path, **kw) -> list[dict]:
    return [p.to_dict() for r in read_rows(path, **kw) if r.error is None for p in r.pairs]


# --------------------------------------------------------------------------- 6. CSV through the csv module


def test_csv_line_separators_stay_inside_quoted_cells():
    """U+2028, U+0085, \\x0b, \\x0c and \\r\\n inside quoted cells belong to the cell (str.splitlines split them)."""
    p = edge("csv-separators.csv")
    rows = list(read_rows(p))
    assert [(r.where, r.error) for r in rows] == [(f"{p}:2", None), (f"{p}:3", None)]
    assert rows[0].pairs[0].chosen == "one\u2028two\u0085three\x0bfour\x0cfive"
    assert rows[1].pairs[0].chosen == "multi\r\nline"


def test_csv_unterminated_quote_is_an_error_not_one_pair_swallowing_the_file(capsys):
    p = edge("csv-unterminated.csv")
    assert main(["data", "validate", str(p)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{p}:3: unterminated quoted cell")
    assert out[-1] == "2 rows: 1 valid, 1 invalid"


def test_csv_error_is_located_where_the_record_starts():
    p = edge("csv-multiline-bad.csv")
    assert errors(p) == {"2": "'tie' is 'maybe'; expected true/false, 1/0, yes/no or an empty cell"}


def test_csv_cell_longer_than_the_default_field_limit(tmp_path):
    long = "x" * 131_073
    p = tmp_path / "long.csv"
    p.write_text(f'prompt,chosen,rejected\nQ,"{long}",short\n', encoding="utf-8")
    assert [len(x["chosen"]) for x in pairs(p)] == [131_073]


# --------------------------------------------------------------------------- 7. byte-order marks


def test_byte_order_marks_are_accepted_everywhere():
    assert [x["id"] for x in pairs(edge("bom-id.csv"))] == ["row-1", "row-2"], "the BOM must not hide the id column"
    for name in ("bom-prompt.csv", "bom.jsonl"):
        assert [x["prompt"] for x in pairs(edge(name))] == ["Q1", "Q2"], name
    assert [x["prompt"] for x in pairs(edge("bom.json"))] == ["Q1"]


# --------------------------------------------------------------------------- 8. CSV cell types


def test_csv_cells_take_their_column_types():
    p = edge("csv-types.csv")
    det = []
    got = {x["id"]: x for x in pairs(p, detected=det)}
    assert det == ["pairs"], "a reply that looks like JSON must not flip the format"
    assert (got["a1"]["chosen"], got["a1"]["rejected"]) == ("[2, 3, 5]", "{}")
    assert (got["a1"]["tie"], got["a1"]["margin"], got["a1"]["annotator"], got["a1"]["source"]) == (
        False, 0.5, "7", "human")
    assert (got["a2"]["tie"], got["a2"]["source"], "margin" in got["a2"]) == (True, "ai", False)
    assert (got["a3"]["tie"], got["a3"]["source"], "annotator" in got["a3"]) == (False, "human", False)
    assert (got["a4"]["tie"], got["a4"]["margin"]) == (True, -1.0)
    assert got["a7"]["prompt"] == [{"role": "user", "content": "Hi"}], "a message-list cell is parsed"
    assert errors(p) == {"6": "'tie' is 'maybe'; expected true/false, 1/0, yes/no or an empty cell",
                         "7": "'margin' is 'abc'; expected a number or an empty cell"}


# --------------------------------------------------------------------------- 9. non-finite numbers


def test_non_finite_scores_ranks_and_margins_are_rejected():
    assert errors(edge("nonfinite.jsonl")) == {
        "1": "scores must be finite numbers; response 1 has nan",
        "2": "ranks must be finite numbers; response 2 has inf",
        "3": "scores must be finite numbers; response 1 has -inf",
    }
    assert errors(edge("nonfinite-margin.jsonl")) == {"1": "'margin' must be a finite number, got nan"}


def test_parquet_nan_margin_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "m.parquet"  # written with pyarrow: pandas would store NaN as null (a missing margin)
    pq.write_table(pa.table({"prompt": ["Q1", "Q2"], "chosen": ["a", "a"], "rejected": ["b", "b"],
                             "margin": pa.array([float("nan"), 2.0])}), p)
    assert errors(p) == {"row 1": "'margin' must be a finite number, got nan"}


def test_write_jsonl_refuses_nan(tmp_path):
    from pipeline.artifacts import write_jsonl
    from rlhf.errors import InvalidInput

    out = tmp_path / "out.jsonl"
    with pytest.raises(InvalidInput, match="row 2 cannot be written as JSON"):
        write_jsonl(out, [{"a": 1.0}, {"a": float("nan")}])
    assert not out.exists()
    out.write_text('{"kept": true}\n')
    with pytest.raises(InvalidInput, match="row 2 cannot be written as JSON"):
        write_jsonl(out, [{"a": 1.0}, {"a": float("inf")}])
    assert out.read_text() == '{"kept": true}\n' and list(tmp_path.iterdir()) == [out]  # the old file, no leftover


def test_write_jsonl_writes_rows_as_they_come(tmp_path):
    """A generator of rows is streamed to the (temporary) file, never gathered first: a million-row file costs
    a line of memory, not the file."""
    from pipeline.artifacts import write_jsonl

    out = tmp_path / "out.jsonl"
    seen_on_disk = []

    def rows():
        for i in range(20_000):
            if i == 19_999:  # before the last row: most of the file is already in the temporary file
                seen_on_disk.append(sum(p.stat().st_size for p in tmp_path.iterdir() if p.name != "out.jsonl"))
            yield {"i": i, "text": "x" * 50}

    assert write_jsonl(out, rows()) == 20_000
    assert seen_on_disk[0] > 500_000 and len(out.read_text().splitlines()) == 20_000


# --------------------------------------------------------------------------- 10. dataset directories


def test_dataset_dict_reads_every_split_or_the_one_asked(tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    d = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list([{"prompt": "Q1", "chosen": "a", "rejected": "b"}]),
                 "test": Dataset.from_list([{"prompt": "Q2", "chosen": "a", "rejected": ""}])}).save_to_disk(str(d))
    report = validate_file(d)
    assert [r.where for r in report.rows] == [f"{d}:train:row 1", f"{d}:test:row 1"]
    assert report.notes == [f"{d}: read splits train, test"]
    assert main(["data", "validate", str(d), "--split", "train"]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines() == ["1 rows: 1 valid, 0 invalid"]
    assert f"note: {d}: read split train; skipped test" in cap.err
    assert main(["data", "validate", str(d), "--split", "nope"]) == 2


def test_sequence_of_dict_columns_become_message_lists(tmp_path):
    from datasets import Dataset, Features, Sequence, Value

    msg = Sequence({"role": Value("string"), "content": Value("string")})
    feats = Features({"prompt": msg, "chosen": msg, "rejected": msg})
    d = tmp_path / "seq"
    Dataset.from_dict({"prompt": [{"role": ["user"], "content": ["Hi"]}],
                       "chosen": [{"role": ["assistant"], "content": ["Hello!"]}],
                       "rejected": [{"role": ["assistant"], "content": ["Go away."]}]}, features=feats).save_to_disk(
        str(d))
    assert pairs(d) == [PreferencePair(prompt=[{"role": "user", "content": "Hi"}],
                                       chosen=[{"role": "assistant", "content": "Hello!"}],
                                       rejected=[{"role": "assistant", "content": "Go away."}]).to_dict()]


# --------------------------------------------------------------------------- 11. HH transcripts


def test_hh_consecutive_turns_of_one_role_are_merged_and_noted():
    """Real HH data has the assistant continuing its own turn (and a 'Human:' written inline): such rows are read,
    the consecutive turns merged into one, as a split at the last shared turn reads them, and counted in a note."""
    p = edge("hh-turns.jsonl")
    report = validate_file(p, fmt="hh")
    assert report.summary() == "3 rows: 3 valid, 0 invalid"
    first, second, third = report.pairs
    assert first.prompt == [{"role": "user", "content": "Hi"}]
    assert first.chosen == [{"role": "assistant", "content": "Hello\n\nAnything else?"}]
    assert first.rejected == [{"role": "assistant", "content": "Hello\n\nGo away"}]
    assert second.prompt == [{"role": "user", "content": "Say 'x'\n\nquoted"}]
    assert [m["role"] for m in third.prompt] == ["user", "assistant", "user"]
    assert third.prompt[-1]["content"] == "Bye\n\nagain"
    assert report.notes == [f"{p}: 3 rows of hh transcripts had consecutive turns of one role (the first at line 1), "
                            "merged into one turn each"]


def test_hh_line_endings_are_normalised_before_detection_and_parsing():
    det = []
    got = pairs(edge("hh-crlf.jsonl"), detected=det)
    assert det == ["hh"]
    assert got[0]["prompt"] == [{"role": "user", "content": "Hi\nthere"}]
    assert got[0]["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert got[1]["rejected"] == [{"role": "assistant", "content": "Bad."}]


def test_hh_transcripts_beside_a_prompt_column_are_split_and_the_column_noted():
    p = edge("hh-prompt.jsonl")
    report = validate_file(p)
    assert report.format == "hh" and report.summary() == "1 rows: 1 valid, 0 invalid"
    assert report.pairs[0].prompt == [{"role": "user", "content": "Hi"}]
    assert report.pairs[0].chosen == [{"role": "assistant", "content": "Hello!"}]
    assert report.notes == [f"{p}: the 'prompt' column is ignored: the hh transcripts in chosen/rejected hold the "
                            "whole dialogue"]


# --------------------------------------------------------------------------- 12. normalised comparison, voting


def test_duplicates_and_identity_compare_normalised_text():
    assert errors(edge("dup-normalised.jsonl")) == {
        "1": "conflicting duplicate of line 2 (same prompt and responses, different preference)",
        "2": "conflicting duplicate of line 1 (same prompt and responses, different preference)",
        "3": "conflicting duplicate of line 4 (same prompt and responses, different preference)",
        "4": "conflicting duplicate of line 3 (same prompt and responses, different preference)",
        "5": "chosen and rejected are identical once Unicode (NFC) and whitespace are normalised",
    }


def test_duplicates_fail_first_majority(tmp_path, capsys):
    p = edge("dup-votes.jsonl")
    assert errors(p) == {str(i): f"conflicting duplicate of line {j} (same prompt and responses, different "
                         "preference)" for i, j in ((1, 3), (2, 3), (3, 1), (4, 5), (5, 4))}
    assert validate_file(p).agreement == {"pairs_labelled_more_than_once": 2, "label_pairs": 4, "agreement": 0.25}
    first = {r.line: r.error for r in validate_file(p, duplicates="first").rows}
    assert first[1] is None and first[4] is None and first[6] is None
    assert first[2] == ("duplicate", "duplicate of line 1, which is kept (--duplicates first)")
    assert first[3] == ("duplicate", "repeat with a different label of line 1, which is kept (--duplicates first)")
    out = tmp_path / "out.jsonl"
    assert main(["data", "import", str(p), "-o", str(out), "--duplicates", "majority", "--on-error", "skip"]) == 0
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(k["prompt"], k["chosen"], k["annotator"]) for k in kept] == [("Q", "a", "x"), ("S", "e", "x")]
    rejected = {r["line"]: (r["code"], r["reason"]) for r in
                map(json.loads, (tmp_path / "out.rejected.jsonl").read_text().splitlines())}
    assert rejected[2] == ("duplicate", "exact duplicate of line 1")
    assert rejected[3] == ("outvoted", "outvoted (2 of 3 preferred the other response)")
    assert rejected[4][0] == rejected[5][0] == "conflict" and "no majority" in rejected[4][1]


def test_ranked_row_keeps_its_other_pairs_when_one_is_a_duplicate(capsys):
    p = edge("dup-ranked.jsonl")
    report = validate_file(p)
    assert [r.error for r in report.rows] == [None, None]
    assert [(x.chosen, x.rejected) for x in report.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert report.problems() == [f"{p}:2: the pair 'a' over 'b': exact duplicate of line 1"]
    assert main(["data", "validate", str(p)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "2 rows: 2 valid, 0 invalid; 1 pair of valid rows rejected"


def test_duplicate_explicit_ids_name_both_lines():
    assert errors(edge("dup-ids.jsonl")) == {"3": "duplicate id 'p1': line 1 has it too"}


def test_split_by_prompt_keeps_near_identical_prompts_together():
    import unicodedata

    from pipeline.data import split_by_prompt

    items = []
    for i in range(20):
        prompt = f"Describe café number {i}."
        for variant in (prompt, prompt + " ", unicodedata.normalize("NFD", prompt), "  ".join(prompt.split(" ", 1))):
            items.append(PreferencePair(prompt=variant, chosen=f"good {i}", rejected=f"bad {i}"))
    train, evals = split_by_prompt(items, 0.5, seed=0)
    assert len(train) == len(evals) == 40
    assert not {p.chosen for p in train} & {p.chosen for p in evals}


# --------------------------------------------------------------------------- 13. JSON Lines in .json; rank and score


def test_json_file_holding_json_lines(tmp_path):
    p = edge("jsonlines.json")
    rows = list(read_rows(p))
    assert [(r.where, r.error) for r in rows] == [(f"{p}:1", None), (f"{p}:2", None)]
    bad = tmp_path / "bad.json"
    bad.write_text(p.read_text() + "{broken\n")
    assert errors(bad) == {"3": "invalid JSON: Expecting property name enclosed in double quotes (column 2)"}


def test_ranked_row_mixing_rank_and_score_is_refused():
    assert errors(edge("rank-score.jsonl")) == {
        "1": "'responses' mixes 'rank' and 'score'; give one of them for every response",
        "2": "the row has both 'ranks' and 'scores'; give one of them",
        "3": "'responses' mixes 'rank' and 'score'; give one of them for every response",
        "4": "the responses carry ranks and the row also has 'scores'; give one of them",
    }


def test_generator_matches_the_committed_files(tmp_path):
    """The edge files are exactly what make_edge_files.py writes (the bytes are the point of the tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_edge_files", DATA / "make_edge_files.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, text in mod.FILES.items():
        assert (DATA / name).read_bytes() == text.encode("utf-8"), name
