"""`rlhf feedback export`: a traffic log's feedback as preference pairs or unpaired rows that `rlhf data validate`
accepts; the latest feedback on an answer (or a pair of answers) wins, and every feedback row not exported is
counted with its reason."""

import json

from feedback.export import export_feedback
from feedback.traffic import Completion, TrafficLog
from feedback.validate import validate_file
from pipeline.cli import main

RIVER, SEA = "Tell me about the river.", "Tell me about the sea."


def _log(tmp_path):
    """Nine answers and twelve feedback rows, each of them there for one rule of the export."""
    log = TrafficLog(tmp_path / "traffic.db")
    answers = [
        (RIVER, "The river is calm."), (RIVER, "The river is dull."), (RIVER, "The river is  calm."),  # c2 = c0's text
        (SEA, "The sea is warm."), (SEA, "The sea is cold."), (RIVER, "   "),
        ([{"type": "text", "text": "Tell me about"}, {"type": "text", "text": "the lake."}], "The lake is lovely."),
        (RIVER, "The river is nice."), (SEA, "The sea is warm."),  # c7: a role we do not read; c8 = c3's text
    ]
    for i, (prompt, response) in enumerate(answers):
        role = "developer" if i == 7 else "user"
        log.record(Completion(id=f"c{i}", model="m", stage="runs/x/sft", messages=[{"role": role, "content": prompt}],
                              response=response))
    for id, rating in [("c0", "up"), ("c1", "down"), ("c0", "down"), ("c2", "up"), ("c5", "up"), ("c6", "up"),
                       ("c7", "down"), ("c3", "up")]:
        log.add_feedback(id, rating=rating)
    for id, other in [("c3", "c4"), ("c4", "c3"), ("c0", "c1"), ("c3", "c8")]:
        log.add_feedback(id, preferred_over=other)
    log.close()
    return tmp_path / "traffic.db"


def test_unpaired_export_keeps_the_latest_label_and_counts_the_rest(tmp_path):
    rows, counts = export_feedback(_log(tmp_path), "unpaired")
    got = [(r.id, r.prompt[0]["content"], r.completion[0]["content"], r.label) for r in rows]
    assert got == [("c1", RIVER, "The river is dull.", False),
                   ("c2", RIVER, "The river is  calm.", True),  # c0 said up, then down; c2 (same text) up, later
                   ("c6", "Tell me about\nthe lake.", "The lake is lovely.", True),  # content parts joined
                   ("c3", SEA, "The sea is warm.", True)]
    assert all(r.source == "human" and r.completion[0]["role"] == "assistant" for r in rows)
    assert counts["not_exported_by_reason"] == {"superseded": 2, "empty_response": 1, "unreadable_messages": 1,
                                                "other_kind": 4}
    assert counts["feedback"] == 12 == counts["exported"] + counts["not_exported"]
    assert (counts["desirable"], counts["undesirable"]) == (3, 1)


def test_pairs_export_latest_preference_wins(tmp_path):
    rows, counts = export_feedback(_log(tmp_path), "pairs")
    got = [(p.id, p.chosen[0]["content"], p.rejected[0]["content"], p.prompt) for p in rows]
    assert got == [("c4>c3", "The sea is cold.", "The sea is warm.", [{"role": "user", "content": SEA}]),
                   ("c0>c1", "The river is calm.", "The river is dull.", [{"role": "user", "content": RIVER}])]
    assert counts["not_exported_by_reason"] == {"other_kind": 8, "superseded": 1, "identical_responses": 1}
    assert counts["feedback"] == counts["exported"] + counts["not_exported"]


def test_cli_export_writes_files_that_validate(tmp_path, capsys):
    db = _log(tmp_path)
    for kind, fmt, n in (("pairs", "messages", 2), ("unpaired", "unpaired", 4)):
        out = tmp_path / f"{kind}.jsonl"
        assert main(["feedback", "export", str(db), "-o", str(out), "--kind", kind, "--annotator", "simulated"]) == 0
        printed = capsys.readouterr().out
        assert f"12 feedback rows: {n} exported" in printed and "not exported" in printed
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == n and all(r["annotator"] == "simulated" and r["source"] == "human" for r in rows)
        report = validate_file(out)
        assert report.ok and report.format == fmt and len(report.pairs) == n, report.problems()
        assert main(["data", "validate", str(out)]) == 0
    assert main(["feedback", "export", str(tmp_path / "none.db"), "-o", str(tmp_path / "x.jsonl")]) == 2
    assert "no traffic log" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
