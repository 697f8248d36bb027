"""Files read as written, third round (issue 20): dataset splits of SFT and prompt files, CSV with spaces after
commas, repeated JSON keys, lone surrogates, NaN inside a judge field, encodings, delimiters and suffixes, HH rows
of another format than the file's, ranked rows' own fields, blank annotators and zero-width replies. Each input is
the small file a user would have; every check goes through the reader or the real CLI."""

import codecs
import gzip
import json

import pytest

from feedback.readers import read_rows
from feedback.validate import validate_file
from pipeline.cli import main

PAIRS = [{"prompt": "Tell me about the river.", "chosen": "The river is calm.", "rejected": "The river is bad."},
         {"prompt": "Tell me about the hill.", "chosen": "The hill is lovely.", "rejected": "The hill is ugly."}]


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def pairs(path, **kw) -> list[dict]:
    return [p.to_dict() for r in read_rows(path, **kw) if r.error is None for p in r.pairs]


def errors(path, **kw) -> dict[str, str]:
    return {r.where[len(str(path)) + 1:]: r.error[1] for r in validate_file(path, **kw).rows if r.error}


# --------------------------------------------------------------------------- 1. splits of SFT and prompt files


def _dataset_dict(path, **splits):
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return path


def test_sft_and_prompt_files_read_the_train_split_of_a_dataset_dict(tmp_path, capsys):
    """{train: 40, test: 20} gives the 40 training rows (not 60), and says which splits it read and skipped."""
    from pipeline.data import read_examples, read_prompts

    sft = _dataset_dict(tmp_path / "sft", train=[{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(40)],
                        test=[{"prompt": f"T{i}", "completion": f"B{i}"} for i in range(20)])
    rows, n = read_examples(sft, "auto", "fail", [])
    assert n == 40 and rows[0]["messages"][0]["content"] == "Q0"
    assert f"note: {sft}: read split train; skipped test" in capsys.readouterr().out
    rows, n = read_examples(sft, "auto", "fail", [], split="test")
    assert n == 20 and rows[0]["messages"][0]["content"] == "T0"

    prompts = _dataset_dict(tmp_path / "prompts", train=[{"prompt": f"P{i}"} for i in range(150)],
                            test=[{"prompt": f"H{i}"} for i in range(42)])
    assert len(read_prompts(prompts)) == 150
    assert read_prompts(prompts, split="test")[0] == "H0"


def test_a_dataset_dict_without_a_train_split_needs_the_split_named(tmp_path):
    from pipeline.data import read_examples, read_prompts
    from rlhf.errors import UsageError

    d = _dataset_dict(tmp_path / "d", validation=[{"prompt": "Q", "completion": "A"}])
    with pytest.raises(UsageError, match=r"splits \['validation'\] and no 'train' split: name the split to read "
                                         r"with data\.split"):
        read_examples(d, "auto", "fail", [])
    with pytest.raises(UsageError, match="name the split to read with prompts_split"):
        read_prompts(d)
    assert read_prompts(d, split="validation") == ["Q"]


def test_the_split_settings_are_in_the_stage_configs(tmp_path, capsys):
    from tests.conftest import tiny_sft_block, write_yaml

    d = _dataset_dict(tmp_path / "sft", only=[{"prompt": "Q", "completion": "A"}])
    blocks = [tiny_sft_block(data={"train": str(d), "split": "only"}),
              {"stage": "evaluate", "policies": {"a": "tiny", "b": "tiny"}, "prompts": "synthetic:prompts",
               "prompts_split": "test", "few_shot": {"model": "tiny", "data": "synthetic:sft", "split": "train"}},
              {"stage": "ppo", "policy": "tiny", "prompts": "synthetic:prompts", "prompts_split": "train",
               "reward": {"rule": "feedback.synthetic:rule_score"}},
              {"stage": "ai_preferences", "policy": "tiny", "prompts": "synthetic:prompts", "prompts_split": "train",
               "judge": "configs/judges/rule.yaml"}]
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": blocks})
    assert main(["run", str(cfg), "--check"]) == 0
    bad = write_yaml(tmp_path / "bad.yaml", {"run_dir": str(tmp_path / "run"), "stages": [
        tiny_sft_block(data={"train": str(d), "eval_split": "test"})]})
    assert main(["run", str(bad), "--check"]) == 2
    assert "eval_split has no effect without an eval file (data.eval)" in capsys.readouterr().err


# --------------------------------------------------------------------------- 5. CSV with a space after each comma


def test_csv_with_a_space_after_each_comma_reads_the_quoted_cells(tmp_path):
    p = tmp_path / "spaced.csv"
    p.write_text('prompt, chosen, rejected\n"Tell me", "The river is calm.", "The river is bad."\n', encoding="utf-8")
    assert [(x["prompt"], x["chosen"], x["rejected"]) for x in pairs(p)] == [
        ("Tell me", "The river is calm.", "The river is bad.")]


# --------------------------------------------------------------------------- 7. repeated JSON keys


def test_a_repeated_json_key_is_refused_with_its_line(tmp_path):
    row = '{"prompt": "Q", "chosen": "Calm.", "rejected": "Wet.", "chosen": "Wet!"}'
    p = tmp_path / "rep.jsonl"
    p.write_text(row + "\n" + json.dumps(PAIRS[0]) + "\n", encoding="utf-8")
    msg = "the key 'chosen' appears twice in one object (JSON would silently keep the last)"
    assert errors(p) == {"1": msg}
    a = tmp_path / "rep.json"
    a.write_text(f"[{json.dumps(PAIRS[0])}, {row}]", encoding="utf-8")
    assert errors(a) == {"row 2": msg}
    c = tmp_path / "rep.csv"  # a message list in a CSV cell is JSON too
    cell = '[{""role"": ""assistant"", ""content"": ""Calm."", ""content"": ""Wet!""}]'
    c.write_text(f'prompt,chosen,rejected\nQ,"{cell}",Wet.\n', encoding="utf-8")
    assert errors(c) == {"2": f"'chosen' cell: the key 'content' {msg.split(' ', 3)[3]}"}


# --------------------------------------------------------------------------- 9. lone surrogates, NaN in a judge


def test_a_lone_surrogate_is_a_row_error_not_a_traceback(tmp_path, capsys):
    p = tmp_path / "emoji.jsonl"
    p.write_text('{"prompt": "Q", "chosen": "Calm \\ud83d", "rejected": "Wet."}\n'
                 '{"prompt": "Q2", "chosen": "Calm \\ud83d\\ude00", "rejected": "Wet."}\n', encoding="utf-8")
    assert main(["data", "validate", str(p)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{p}:1: 'chosen' holds a lone surrogate \\ud83d at character 6 (half of a character, e.g. a cut "
                   "emoji): not valid Unicode text", "2 rows: 1 valid, 1 invalid"]
    out_file = tmp_path / "out.jsonl"
    assert main(["data", "import", str(p), "-o", str(out_file), "--on-error", "skip"]) == 0
    assert json.loads(out_file.read_text())["chosen"] == "Calm \U0001F600"  # a whole pair of surrogates is an emoji
    assert json.loads((tmp_path / "out.rejected.jsonl").read_text())["code"] == "bad_unicode"


def test_a_judge_field_holding_nan_is_refused_at_validate(tmp_path, capsys):
    p = tmp_path / "judged.jsonl"
    p.write_text(jsonl([{**PAIRS[0], "judge": {"p_a": float("nan")}}, {**PAIRS[1], "judge": "gpt"}]), encoding="utf-8")
    assert errors(p) == {"1": "'judge' holds a non-finite number (NaN or Infinity), which JSON cannot hold",
                         "2": "'judge' must be an object, got str"}
    assert main(["data", "import", str(p), "-o", str(tmp_path / "o.jsonl")]) == 1  # a named row, not a write error


# --------------------------------------------------------------------------- 10. encodings, delimiters, suffixes


def test_a_windows_1252_csv_names_the_line_of_the_first_bad_byte(tmp_path, capsys):
    p = tmp_path / "excel.csv"
    p.write_bytes("prompt,chosen,rejected\nQ1,good,bad\nQ2,\u201csmart\u201d quotes,bad\n".encode("cp1252"))
    assert main(["data", "validate", str(p)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {p}:3: not valid UTF-8 (byte 0x93 at column 4): saved in another encoding, such as Windows-1252 or "
        "Latin-1? Save it as UTF-8")


def test_utf16_with_a_byte_order_mark_is_read_and_without_one_named(tmp_path, capsys):
    p = tmp_path / "u16.jsonl"
    p.write_bytes(jsonl(PAIRS).encode("utf-16"))  # with a BOM, as Windows tools write it
    assert main(["data", "validate", str(p)]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[-1] == "2 rows: 2 valid, 0 invalid"
    assert f"note: {p}: read as UTF-16 (byte-order mark)" in cap.err
    c = tmp_path / "u16.csv"
    c.write_bytes(codecs.BOM_UTF16_BE + "prompt,chosen,rejected\nQ,good,bad\n".encode("utf-16-be"))
    assert [x["chosen"] for x in pairs(c)] == ["good"]
    n = tmp_path / "nobom.jsonl"
    n.write_bytes(jsonl(PAIRS).encode("utf-16-le"))
    assert main(["data", "validate", str(n)]) == 2
    assert "UTF-16 (little-endian) without a byte-order mark, not UTF-8 text" in capsys.readouterr().err


def test_a_semicolon_csv_from_excel_is_read_with_its_delimiter(tmp_path, capsys):
    p = tmp_path / "excel.csv"
    p.write_text('prompt;chosen;rejected;tie\nQ1;good;bad;\nQ2;"one; two";bad;yes\n', encoding="utf-8")
    assert [(x["chosen"], x["tie"]) for x in pairs(p)] == [("good", False), ("one; two", True)]
    assert main(["data", "validate", str(p)]) == 0
    assert f"note: {p}: the header has no commas: read with ';' as the delimiter" in capsys.readouterr().err


def test_tsv_and_gzip_are_read_as_what_they_are_and_unknown_suffixes_refused(tmp_path, capsys):
    t = tmp_path / "p.tsv"
    t.write_text("prompt\tchosen\trejected\nQ1\tgood, really\tbad\n", encoding="utf-8")
    assert [x["chosen"] for x in pairs(t)] == ["good, really"]
    g = tmp_path / "p.jsonl.gz"
    g.write_bytes(gzip.compress(jsonl(PAIRS).encode()))
    assert [x["chosen"] for x in pairs(g)] == ["The river is calm.", "The hill is lovely."]
    cg = tmp_path / "p.csv.gz"
    cg.write_bytes(gzip.compress(b"prompt,chosen,rejected\nQ,good,bad\n"))
    assert [x["chosen"] for x in pairs(cg)] == ["good"]
    x = tmp_path / "p.txt"
    x.write_text(jsonl(PAIRS), encoding="utf-8")
    assert main(["data", "validate", str(x)]) == 2
    assert "unknown file type (suffix .txt): expected .jsonl (.ndjson), .json, .csv, .tsv" in capsys.readouterr().err


def test_a_pretty_printed_json_array_named_jsonl_is_read_as_an_array(tmp_path, capsys):
    p = tmp_path / "pretty.jsonl"
    p.write_text(json.dumps(PAIRS, indent=2), encoding="utf-8")
    assert main(["data", "validate", str(p)]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[-1] == "2 rows: 2 valid, 0 invalid"
    assert f"note: {p}: holds one JSON array, not JSON Lines: read as a JSON array" in cap.err


def test_a_spreadsheets_trailing_empty_records_are_blank_lines(tmp_path, capsys):
    p = tmp_path / "sheet.csv"
    p.write_text("prompt,chosen,rejected,tie\nQ1,good,bad,\n,,,\n,,,\n", encoding="utf-8")
    assert main(["data", "validate", str(p)]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[-1] == "1 rows: 1 valid, 0 invalid"
    assert "2 records with only empty cells" in cap.err


# --------------------------------------------------------------------------- 11. one format per file


def test_a_later_hh_row_in_a_pairs_file_is_refused_not_imported_as_transcripts(tmp_path):
    hh = {"prompt": "Hi", "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    p = tmp_path / "mixed.jsonl"
    p.write_text(jsonl([PAIRS[0], hh, {**PAIRS[1], "chosen": [{"role": "assistant", "content": "Lovely."}]}]),
                 encoding="utf-8")
    assert errors(p) == {"2": f"this row is in the hh format but the file's first row ({p}:1) is pairs: a file holds "
                              "one format; split the file, or give --format (data.format) to read every row as one"}
    assert len(pairs(p)) == 2  # a message reply beside string ones is the same shape: read


# --------------------------------------------------------------------------- 13. ranked rows, blank text


def test_ranked_rows_keep_their_id_and_refuse_a_row_level_tie_or_margin(tmp_path):
    p = tmp_path / "ranked.jsonl"
    p.write_text(jsonl([{"id": "r1", "prompt": "Q", "responses": ["a", "b", "c"], "ranks": [2, 1, 3]},
                        {"prompt": "Q2", "responses": ["a", "b"], "ranks": [1, 2], "tie": True},
                        {"prompt": "Q3", "responses": ["a", "b"], "scores": [1, 2], "margin": 0.5},
                        {"prompt": "Q4", "responses": ["a", "b"], "ranks": [1, 2], "tie": False}]), encoding="utf-8")
    got = pairs(p)
    assert [(x["id"], x["chosen"], x["rejected"]) for x in got[:3]] == [
        ("r1:2>1", "b", "a"), ("r1:2>3", "b", "c"), ("r1:1>3", "a", "c")]
    assert errors(p) == {"2": "'tie' on a ranked row: ties come from equal ranks or scores; leave it out",
                         "3": "'margin' on a ranked row: margins come from score differences; leave it out"}


def test_a_blank_annotator_and_a_zero_width_reply_are_refused(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text(jsonl([{**PAIRS[0], "annotator": "   "}, {**PAIRS[1], "chosen": "\u200b"},
                        {"prompt": "Q", "chosen": [{"role": "assistant", "content": "\u200b\u2060 "}], "rejected": "b"},
                        {"prompt": "Q", "chosen": "ok\u200b", "rejected": "b", "annotator": "a1"}]), encoding="utf-8")
    assert errors(p) == {"1": "'annotator' is blank; leave it out (or null) when there is none",
                         "2": "empty chosen", "3": "empty chosen"}
