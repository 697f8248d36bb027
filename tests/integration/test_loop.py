"""The deploy-monitor-maintain loop end to end (examples/loop.py, `make loop`), on the tiny run: a served policy's
traffic through the official openai client, simulated feedback, rlhf monitor, the feedback exported and validated,
a KTO round 2 trained on it and evaluated against round 1."""

import json
import runpy
import sqlite3

from pipeline import artifacts
from tests.conftest import ROOT


def test_the_loop_serves_records_monitors_exports_and_trains_round_2(tiny_run, tmp_path, capsys):
    loop = runpy.run_path(str(ROOT / "examples" / "loop.py"))
    out = tmp_path / "loop"
    assert loop["main"](["--run-dir", str(tiny_run), "--out", str(out), "--prompts", "6"]) == 0
    said = capsys.readouterr().out
    with sqlite3.connect(out / "traffic.db") as db:
        rows = db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
        ratings = db.execute("SELECT COUNT(*) FROM feedback WHERE rating IS NOT NULL").fetchone()[0]
        comments = {c for (c,) in db.execute("SELECT comment FROM feedback")}
    assert rows == 12 and ratings == 12, "two answers per prompt, each recorded and rated"
    assert comments == {"simulated user: feedback.synthetic:rule_score"}, "simulated feedback says so"
    assert "replayed 12 completions" in said
    monitor = json.loads((out / "monitor" / "monitor.json").read_text())
    assert monitor["alerts"] == [], "the served policy is the baseline's: unchanged traffic raises no alert"
    exported = (out / "feedback.unpaired.jsonl").read_text().splitlines()
    assert len(exported) == 12 and {"prompt", "completion", "label"} <= set(json.loads(exported[0]))
    kto = artifacts.load_artifact(out / "round2" / "kto", "policy").manifest
    assert kto["counts"]["train_rows"] + kto["counts"].get("eval_rows", 0) <= 12
    ev = artifacts.load_artifact(out / "round2" / "evaluate", "eval").manifest
    assert set(ev["evaluate"]["policies"]) == {"round1", "round2"} and ev["evaluate"]["baseline"] == "round1"
    assert "eval/round2/win_rate" in ev["metrics"] and (out / "round2" / "report.html").exists()
