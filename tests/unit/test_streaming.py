"""Files of any size in bounded memory: the readers stream (CSV line by line, Parquet batch by batch), and `rlhf data
validate/import/stats` go through validate.scan_file, which spools the rows and finds repeated pairs and ids through
8-byte digests spilled to disk. Memory is measured with tracemalloc on files 10x apart; whole-file checks
(duplicates, majority votes, reused ids) are checked across many flushes of the digest buffer, against
validate_file's in-memory answer."""

import csv
import io
import json
import tracemalloc
from pathlib import Path

import pytest

from feedback import digests, files
from feedback.files import iter_records
from feedback.stats import _dist
from feedback.validate import row_problems, scan_file, validate_file
from pipeline.cli import main

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def text(i: int, n: int = 40) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] + str(i) for k in range(n))


def peak(fn) -> int:
    """The peak of Python allocations (bytes) while fn() runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def drain(path) -> int:
    return sum(1 for _ in iter_records(path))


def write_csv(path: Path, rows: int) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        for i in range(rows):
            w.writerow([f"q{i}", text(i), text(i + 1)])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": text(i), "rejected": text(i + 1)} for i in range(n)]


def test_csv_reader_memory_does_not_grow_with_the_file(tmp_path):
    """Reading a CSV 10x longer (about 4 MB against 0.4 MB) peaks at about the same memory: it is read line by
    line, not as one string."""
    small, large = write_csv(tmp_path / "s.csv", 1000), write_csv(tmp_path / "l.csv", 10000)
    assert drain(small) == 1000 and drain(large) == 10000
    p_small, p_large = peak(lambda: drain(small)), peak(lambda: drain(large))
    assert p_large < 1.5 * p_small + 200_000, (p_small, p_large)


def test_csv_streamed_keeps_line_numbers_of_lone_cr_and_quoted_line_breaks(tmp_path):
    """Lines counted as the csv module counts them on the whole text (a lone \\r ends a line; a quoted cell's line
    breaks are inside its record), so FILE:LINE stays where it was; a bad byte is still named by line and column."""
    body = ('prompt,chosen,rejected\r"q1","a\nb","c"\r\nq2,d,e\rq3,"f\r\ng",h\nq4,i\n'
            "q5,j,k\n")
    p = tmp_path / "cr.csv"
    p.write_bytes(body.encode())
    expected = []
    reader = csv.reader(io.StringIO(body, newline=""), skipinitialspace=True, strict=True)
    next(reader)
    while True:
        start = reader.line_num + 1
        try:
            next(reader)
        except StopIteration:
            break
        expected.append(start)
    got = list(iter_records(p))
    assert [r.line for r in got] == expected == [2, 4, 5, 7, 8]
    assert got[3].error == "2 fields but the header has 3"
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"prompt,chosen,rejected\nq,a,b\nq2,caf\xe9,d\n")
    with pytest.raises(Exception, match=rf"{bad}:3: not valid UTF-8 \(byte 0xe9 at column 7\)"):
        drain(bad)


def test_parquet_is_read_batch_by_batch_with_row_numbers(tmp_path, monkeypatch):
    """Parquet rows come a batch at a time (never the whole table as Python objects); a bad row in a later batch is
    named by its row number in the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pairs_rows(2000)
    rows[1234] = {**rows[1234], "margin": float("nan")}
    for r in rows:
        r.setdefault("margin", 1.0)
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=100)
    monkeypatch.setattr(files, "PARQUET_BATCH", 64)
    errs = {r.where: r.error[1] for r in validate_file(p).rows if r.error}
    assert errs == {f"{p}:row 1235": "'margin' must be a finite number, got nan"}
    small = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:200]), small, row_group_size=100)
    p_small, p_large = peak(lambda: drain(small)), peak(lambda: drain(p))
    assert p_large < 1.5 * p_small + 200_000, (p_small, p_large)


def test_validate_memory_does_not_grow_with_the_file(tmp_path, capsys, monkeypatch):
    """`rlhf data validate` on 10x the rows peaks at about the same memory: rows are spooled to disk, only digests
    (16 bytes a pair, flushed every `BUFFER`) and one chunk of rows are held, not the rows."""
    monkeypatch.setattr(digests, "BUFFER", 512)
    monkeypatch.setattr(digests, "SPOOL_CHUNK", 64)
    small = write_jsonl(tmp_path / "s.jsonl", pairs_rows(1000))
    large = write_jsonl(tmp_path / "l.jsonl", pairs_rows(10000))
    p_small = peak(lambda: main(["data", "validate", str(small)]))
    p_large = peak(lambda: main(["data", "validate", str(large)]))
    assert capsys.readouterr().out.splitlines()[-1] == "10000 rows: 10000 valid, 0 invalid"
    assert p_large < 1.5 * p_small + 300_000, (p_small, p_large)


def spread_duplicates(n: int = 300) -> list[dict]:
    """Rows with repeats far apart: line 2 and 299 agree, line 3 and 150 disagree (one with the other label), lines
    10, 160 and 290 vote 1-2, line 50 reuses line 20's id, and line 70 is an NFC/whitespace copy of line 5."""
    rows = pairs_rows(n)
    rows[298] = dict(rows[1])
    rows[149] = {**rows[2], "chosen": rows[2]["rejected"], "rejected": rows[2]["chosen"]}
    rows[159] = {**rows[9], "chosen": rows[9]["rejected"], "rejected": rows[9]["chosen"]}
    rows[289] = dict(rows[159])
    rows[19]["id"] = rows[49]["id"] = "same-id"
    rows[69] = {**rows[4], "chosen": "  " + rows[4]["chosen"].replace(" ", "   ") + " "}
    return rows


@pytest.mark.parametrize("mode", ["fail", "first", "majority"])
def test_repeats_and_ids_found_across_digest_flushes_as_in_memory(tmp_path, mode):
    """With a digest buffer of 8 entries (37 flushes over 300 rows, the copies in different flushes and buckets),
    the scan rejects the same rows with the same FILE:LINE messages and measures the same agreement as
    validate_file holding every row."""
    p = write_jsonl(tmp_path / "d.jsonl", spread_duplicates())
    whole = validate_file(p, duplicates=mode)
    with scan_file(p, duplicates=mode, buffer=8) as scan:
        lines = [line for row in scan.rows() for line in row_problems(row)]
        assert scan.counts() == whole.counts() and scan.summary() == whole.summary()
        assert scan.agreement == whole.agreement
    assert lines == whole.problems()
    assert len(lines) >= 4


def test_majority_vote_across_chunks_names_the_kept_copy(tmp_path):
    """Lines 10, 160 and 290: the first prefers one response, the two later ones the other; the majority keeps
    line 160 and names it from line 290, line 10 is outvoted, though each copy came in a different flush."""
    p = write_jsonl(tmp_path / "d.jsonl", spread_duplicates())
    with scan_file(p, duplicates="majority", buffer=8) as scan:
        errs = {row.line: row.error for row in scan.rows() if row.error}
    assert errs[10] == ("outvoted", "outvoted (2 of 3 preferred the other response)")
    assert errs[290] == ("duplicate", "exact duplicate of line 160")
    assert 160 not in errs
    assert errs[50] == ("duplicate_id", "duplicate id 'same-id': line 20 has it too")
    assert errs[70] == ("duplicate", "duplicate of line 5 (same prompt and responses and label once Unicode and "
                                     "whitespace are normalised)")


def test_import_writes_as_it_reads_and_a_late_bad_row_leaves_nothing(tmp_path, capsys):
    """--on-error fail: a bad row at line 2999 means no output file (the one being written is removed, an older one
    is left as it was); --on-error skip writes every valid pair, in order, and the rejected row with its reason."""
    rows = pairs_rows(3000)
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[:2998]) + "{broken\n"
                 + json.dumps(rows[2999]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    assert main(["data", "import", str(p), "-o", str(out)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{p}:2999: invalid JSON")
    assert out.read_text() == "old\n" and not list(tmp_path.glob(".out*"))
    assert main(["data", "import", str(p), "-o", str(out), "--on-error", "skip"]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["prompt"] for w in written] == [f"q{i}" for i in range(3000) if i != 2998]
    rejected = [json.loads(x) for x in (tmp_path / "out.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in rejected] == [(2999, "invalid_json")]


def test_stats_quantiles_from_counts_are_those_of_the_sorted_values():
    """min/p50/p90/max/mean from {length: count}, by hand: the values 1,1,2,3,3,3,7,9,9,10 sorted; p50 is the 6th
    (index 5): 3; p90 the 10th (index 9): 10; mean 48/10."""
    from collections import Counter

    assert _dist(Counter([3, 1, 9, 3, 10, 2, 3, 7, 9, 1])) == {"min": 1, "p50": 3, "p90": 10, "max": 10, "mean": 4.8}
    assert _dist(Counter()) == {}


def test_import_to_parquet_when_asked(tmp_path, capsys):
    """-o OUT.parquet writes the canonical rows as Parquet (texts as strings, judge as JSON text, every column in
    every row), the rejected rows to OUT.rejected.jsonl; a file mixing string and message rows is refused by row,
    as one Parquet column holds one type, and nothing is written."""
    import pyarrow.parquet as pq

    rows = pairs_rows(5000)
    rows[7] = {**rows[7], "margin": 0.5, "judge": {"name": "rule", "p": 0.9}}
    rows[4000] = {**rows[4000], "rejected": rows[4000]["chosen"]}
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out.parquet"
    assert main(["data", "import", str(p), "-o", str(out), "--on-error", "skip"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "prompt", "chosen", "rejected", "source", "tie", "margin", "annotator", "judge"]
    got = table.to_pylist()
    assert [g["prompt"] for g in got] == [f"q{i}" for i in range(5000) if i != 4000]
    assert got[7]["margin"] == 0.5 and json.loads(got[7]["judge"]) == {"name": "rule", "p": 0.9}
    assert got[0]["margin"] is None and got[0]["judge"] is None and got[0]["tie"] is False
    rejected = [json.loads(x) for x in (tmp_path / "out.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in rejected] == [(4001, "identical")]

    mixed = write_jsonl(tmp_path / "m.jsonl", [rows[0], {"prompt": [{"role": "user", "content": "hi"}],
                                                          "chosen": [{"role": "assistant", "content": "a"}],
                                                          "rejected": [{"role": "assistant", "content": "b"}]}])
    capsys.readouterr()
    assert main(["data", "import", str(mixed), "-o", str(tmp_path / "m.parquet")]) == 1
    assert "row 2 holds message lists where row 1 holds strings" in capsys.readouterr().err
    assert not (tmp_path / "m.parquet").exists() and not list(tmp_path.glob(".m.parquet*"))


def test_the_preferences_stage_streams_and_splits_as_in_memory(tmp_path, capsys, monkeypatch):
    """The preferences stage on 10x the pairs peaks at about the same memory (it held every row as Python objects:
    about 12x more at 10,000 pairs); what it holds grows only by the distinct prompts' keys, which decide the split.
    Its split is split_by_prompt's over validate_file's pairs, pair for pair, and bad rows are still named."""
    from pipeline import artifacts
    from pipeline.data import split_by_prompt
    from tests.conftest import write_yaml

    from feedback import fastpath

    monkeypatch.setattr(digests, "BUFFER", 512)
    monkeypatch.setattr(digests, "SPOOL_CHUNK", 64)
    monkeypatch.setattr(fastpath, "BLOCK", 64 << 10)  # a block's columns are held while it is written: 64 KiB

    def stage(name: str, path: Path, **data) -> int:
        cfg = {"run_dir": str(tmp_path / "run"), "seed": 3, "stages": [
            {"stage": "preferences", "name": name, "data": {"path": str(path), **data}, "eval_fraction": 0.25}]}
        return main(["run", str(write_yaml(tmp_path / f"{name}.yaml", cfg))])

    rows = pairs_rows(10000)
    for i in range(0, 10000, 7):  # several pairs of one prompt: they must land on one side
        rows[i]["prompt"] = f"q{i // 70}"
    rows[5] = {"prompt": "q5", "chosen": "same", "rejected": "same"}  # a bad row, skipped and listed
    warm, small, large = (write_jsonl(tmp_path / f"{n}.jsonl", rows[:n]) for n in (10, 1000, 10000))
    assert stage("warm", warm, on_error="skip") == 0  # imports and caches, before anything is measured
    p_small = peak(lambda: stage("small", small, on_error="skip"))
    p_large = peak(lambda: stage("large", large, on_error="skip"))
    assert p_large < 1.5 * p_small + 2_000_000, (p_small, p_large)

    art = artifacts.load_artifact(tmp_path / "run" / "large", "preferences")
    train, held = (art.output(k).read_text().splitlines() for k in ("train", "eval"))
    expected = split_by_prompt(validate_file(large).pairs, 0.25, 3)
    assert [json.loads(x) for x in train] == [p.to_dict() for p in expected[0]]
    assert [json.loads(x) for x in held] == [p.to_dict() for p in expected[1]]
    rejected = [json.loads(x) for x in art.output("rejected").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in rejected] == [(6, rejected[0]["code"])] and len(rejected) == 1
    assert art.manifest["counts"]["train"] + art.manifest["counts"]["eval"] == 9999
    capsys.readouterr()
    assert stage("failing", large) == 1  # on_error: fail names the row and writes nothing
    assert f"{large}:6: " in capsys.readouterr().err
    assert not (tmp_path / "run" / "failing").exists()
