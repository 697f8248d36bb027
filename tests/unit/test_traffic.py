"""feedback/traffic.py: the SQLite traffic log a served policy writes and `rlhf monitor` / `feedback export` read."""

import pytest

from feedback.traffic import Completion, TrafficLog, UnknownCompletion
from rlhf.errors import InvalidInput, UsageError


def _c(i: int, prompt: str = "Tell me about the river.") -> Completion:
    return Completion(id=f"chatcmpl-{i}", model="ppo", stage="runs/x/ppo",
                      messages=[{"role": "user", "content": prompt}], response=f"answer {i}",
                      finish_reason="stop", prompt_tokens=9, completion_tokens=3, latency_ms=12.5,
                      sampling={"temperature": 0.7, "max_tokens": 32})


def test_rows_round_trip_and_feedback_is_checked(tmp_path):
    log = TrafficLog(tmp_path / "t.db")
    for i in range(3):
        log.record(_c(i, "Describe the sea." if i == 2 else "Tell me about the river."))
    rows = list(log.completions())
    assert [r["id"] for r in rows] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"] and [r["seq"] for r in rows] == [1, 2, 3]
    assert rows[0]["messages"] == [{"role": "user", "content": "Tell me about the river."}]
    assert rows[0]["sampling"] == {"max_tokens": 32, "temperature": 0.7} and rows[0]["latency_ms"] == 12.5
    assert [r["id"] for r in log.completions(after_seq=2)] == ["chatcmpl-2"]
    assert log.add_feedback("chatcmpl-0", rating="up", comment="good") == 1
    assert log.add_feedback("chatcmpl-1", preferred_over="chatcmpl-0") == 2
    with pytest.raises(UnknownCompletion, match="no completion with id 'nope'") as unknown:
        log.add_feedback("nope", rating="down")
    assert unknown.value.param == "id"
    with pytest.raises(UnknownCompletion) as unknown:
        log.add_feedback("chatcmpl-0", preferred_over="gone")
    assert unknown.value.param == "preferred_over"
    with pytest.raises(InvalidInput, match="answer different messages"):
        log.add_feedback("chatcmpl-2", preferred_over="chatcmpl-0")
    with pytest.raises(InvalidInput, match="either 'rating'"):
        log.add_feedback("chatcmpl-0", rating="up", preferred_over="chatcmpl-1")
    with pytest.raises(InvalidInput, match="'rating' must be 'up' or 'down'"):
        log.add_feedback("chatcmpl-0", rating="meh")
    assert [(f["id"], f["rating"], f["preferred_over"]) for f in log.feedback()] == [
        ("chatcmpl-0", "up", None), ("chatcmpl-1", None, "chatcmpl-0")]
    assert log.counts() == {"completions": 3, "feedback": 2, "pruned": 0}


def test_max_rows_deletes_the_oldest_with_their_feedback(tmp_path):
    log = TrafficLog(tmp_path / "t.db", max_rows=2)
    log.record(_c(0))
    log.add_feedback("chatcmpl-0", rating="down")
    for i in (1, 2, 3):
        log.record(_c(i))
    assert [r["id"] for r in log.completions()] == ["chatcmpl-2", "chatcmpl-3"]
    assert log.counts() == {"completions": 2, "feedback": 0, "pruned": 2}


def test_a_second_process_reads_while_the_log_is_open_and_bad_files_are_refused(tmp_path):
    log = TrafficLog(tmp_path / "t.db")
    log.record(_c(0))
    reader = TrafficLog(tmp_path / "t.db", readonly=True)
    log.record(_c(1))
    assert [r["id"] for r in reader.completions()] == ["chatcmpl-0", "chatcmpl-1"]
    with pytest.raises(UsageError, match="no traffic log"):
        TrafficLog(tmp_path / "missing.db", readonly=True)
    (tmp_path / "junk.db").write_text("not sqlite at all" * 100)
    with pytest.raises(UsageError, match="not a traffic log"):
        TrafficLog(tmp_path / "junk.db")
