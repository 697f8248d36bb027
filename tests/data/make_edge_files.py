"""Write the tiny edge-case preference files used by tests/unit/test_file_edge_cases.py (tests/data/edge-*).

    .venv/bin/python tests/data/make_edge_files.py

The bytes matter (byte-order marks, U+2028 and other line separators inside cells, \\r\\n line
endings, NFD text), so every file is written as bytes from the literals below. Larger or binary
inputs (a 131,073-character cell, Parquet, dataset directories) are made by the tests in tmp_path.
"""

import json
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOM = "\ufeff"


def jl(*rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def hh(*turns) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


CAFE_NFC = "Describe a café."
CAFE_NFD = unicodedata.normalize("NFD", CAFE_NFC)
assert CAFE_NFC != CAFE_NFD

FILES = {
    # 6. CSV: separators inside quoted cells stay in the cell; \r\n records; a quote never closed
    "edge-csv-separators.csv": (
        'prompt,chosen,rejected\r\n'
        'Q1,"one\u2028two\u0085three\x0bfour\x0cfive",no\r\n'
        'Q2,"multi\r\nline",bad\r\n'
    ),
    "edge-csv-unterminated.csv": (
        "prompt,chosen,rejected\n"
        "Q1,good,bad\n"
        'Q2,"never closed,bad\n'
        "Q3,good,bad\n"
        "Q4,good,bad\n"
    ),
    "edge-csv-multiline-bad.csv": (
        "prompt,chosen,rejected,tie\n"
        'Q1,"spans\ntwo lines",bad,maybe\n'
    ),
    # 7. byte-order marks
    "edge-bom-id.csv": BOM + "id,prompt,chosen,rejected\r\nrow-1,Q1,good,bad\r\nrow-2,Q2,yes,no\r\n",
    "edge-bom-prompt.csv": BOM + "prompt,chosen,rejected\nQ1,good,bad\nQ2,yes,no\n",
    "edge-bom.jsonl": BOM + jl({"prompt": "Q1", "chosen": "good", "rejected": "bad"},
                               {"prompt": "Q2", "chosen": "yes", "rejected": "no"}),
    "edge-bom.json": BOM + json.dumps([{"prompt": "Q1", "chosen": "good", "rejected": "bad"}]),
    # 8. CSV cell types
    "edge-csv-types.csv": (
        "id,prompt,chosen,rejected,tie,margin,annotator,source\n"
        'a1,Primes?,"[2, 3, 5]",{},false,0.5,7,human\n'
        "a2,Q2,good,bad,TRUE,,ann,ai\n"
        "a3,Q3,good,bad,,,,\n"
        "a4,Q4,good,bad,yes,-1,,\n"
        "a5,Q5,good,bad,maybe,,,\n"
        "a6,Q6,good,bad,0,abc,,\n"
        'a7,"[{""role"": ""user"", ""content"": ""Hi""}]",Hello,Go away,no,,,\n'
    ),
    # 9. non-finite numbers (JSON Lines as Python's json writes them)
    "edge-nonfinite.jsonl": (
        '{"prompt": "Q1", "responses": ["a", "b"], "scores": [NaN, 1.0]}\n'
        '{"prompt": "Q2", "responses": ["a", "b"], "ranks": [1, Infinity]}\n'
        '{"prompt": "Q3", "responses": [{"text": "a", "score": -Infinity}, {"text": "b", "score": 0}]}\n'
        '{"prompt": "Q4", "responses": ["a", "b"], "scores": [0.5, 1.0]}\n'
    ),
    "edge-nonfinite-margin.jsonl": (
        '{"prompt": "Q1", "chosen": "good", "rejected": "bad", "margin": NaN}\n'
        '{"prompt": "Q2", "chosen": "good", "rejected": "bad", "margin": 1.5}\n'
    ),
    # 11. HH transcripts
    "edge-hh-turns.jsonl": jl(
        {"chosen": hh(("Human", "Hi"), ("Assistant", "Hello"), ("Assistant", "Anything else?")),
         "rejected": hh(("Human", "Hi"), ("Assistant", "Hello"), ("Assistant", "Go away"))},
        {"chosen": hh(("Human", "Say 'x'"), ("Human", "quoted"), ("Assistant", "x")),
         "rejected": hh(("Human", "Say 'x'"), ("Human", "quoted"), ("Assistant", "no"))},
        {"chosen": hh(("Human", "Hi"), ("Assistant", "Hello"), ("Human", "Bye"), ("Human", "again"),
                      ("Assistant", "Bye")),
         "rejected": hh(("Human", "Hi"), ("Assistant", "Hello"), ("Human", "Bye"), ("Human", "again"),
                        ("Assistant", "No"))},
    ),
    "edge-hh-crlf.jsonl": jl(
        {"chosen": "\r\n\r\nHuman: Hi\r\nthere\r\n\r\nAssistant: Hello!",
         "rejected": "\r\n\r\nHuman: Hi\r\nthere\r\n\r\nAssistant: Go away."},
        {"chosen": "\r\rHuman: Hi\r\rAssistant: Fine.", "rejected": "\r\rHuman: Hi\r\rAssistant: Bad."},
    ),
    "edge-hh-prompt.jsonl": jl(
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": hh(("Human", "Hi"), ("Assistant", "Hello!")),
         "rejected": hh(("Human", "Hi"), ("Assistant", "Go away."))},
    ),
    # 12. duplicates and conflicts on normalised text
    "edge-dup-normalised.jsonl": jl(
        {"prompt": CAFE_NFC, "chosen": "Warm.", "rejected": "Cold."},
        {"prompt": CAFE_NFD, "chosen": "Cold.", "rejected": "Warm."},
        {"prompt": "Trailing", "chosen": "a", "rejected": "b"},
        {"prompt": "Trailing ", "chosen": "b ", "rejected": "a"},
        {"prompt": "Same?", "chosen": "same", "rejected": "same "},
    ),
    "edge-dup-votes.jsonl": jl(
        {"prompt": "Q", "chosen": "a", "rejected": "b", "annotator": "x"},
        {"prompt": "Q", "chosen": "a", "rejected": "b", "annotator": "y"},
        {"prompt": "Q", "chosen": "b", "rejected": "a", "annotator": "z"},
        {"prompt": "R", "chosen": "c", "rejected": "d", "annotator": "x"},
        {"prompt": "R", "chosen": "d", "rejected": "c", "annotator": "y"},
        {"prompt": "S", "chosen": "e", "rejected": "f", "annotator": "x"},
    ),
    "edge-dup-ranked.jsonl": jl(
        {"prompt": "Q", "responses": ["a", "b"], "ranks": [1, 2]},
        {"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]},
    ),
    "edge-dup-ids.jsonl": jl(
        {"id": "p1", "prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"id": "p2", "prompt": "Q2", "chosen": "good", "rejected": "bad"},
        {"id": "p1", "prompt": "Q3", "chosen": "good", "rejected": "bad"},
    ),
    # 13. JSON Lines in a .json file; ranks and scores mixed
    "edge-jsonlines.json": jl({"prompt": "Q1", "chosen": "good", "rejected": "bad"},
                              {"prompt": "Q2", "chosen": "yes", "rejected": "no"}),
    "edge-rank-score.jsonl": jl(
        {"prompt": "Q1", "responses": [{"text": "a", "rank": 1}, {"text": "b", "score": 5.0}]},
        {"prompt": "Q2", "responses": ["a", "b"], "ranks": [1, 2], "scores": [0.0, 9.0]},
        {"prompt": "Q3", "responses": [{"text": "a", "rank": 2, "score": 9.0}, {"text": "b", "rank": 1, "score": 0}]},
        {"prompt": "Q4", "responses": [{"text": "a", "rank": 2}, {"text": "b", "rank": 1}], "scores": [9.0, 0.0]},
        {"prompt": "Q5", "responses": [{"text": "a", "rank": 2}, {"text": "b", "rank": 1}]},
    ),
}


def main() -> None:
    for name, text in FILES.items():
        (HERE / name).write_bytes(text.encode("utf-8"))
        print(f"wrote tests/data/{name}")


if __name__ == "__main__":
    main()
