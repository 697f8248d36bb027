"""SFT data rows: every problem is reported as FILE:LINE: reason; skip keeps counts."""

import json

import pytest

from rlhf.errors import InvalidInput
from pipeline.data import read_examples, to_example

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def test_prompt_completion_becomes_chat():
    ex, err = to_example({"prompt": "Hi", "completion": "Hello."}, "auto")
    assert err is None and ex == GOOD


def test_bad_rows_are_reported_with_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"text": "x"}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"prompt": "Hi", "completion": ""}),
    ]
    p.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    with pytest.raises(InvalidInput) as exc:
        read_examples(p, "auto", "fail", [])
    msg = str(exc.value)
    assert f"{p}:2: invalid JSON" in msg
    assert f"{p}:3: row is a list, not an object" in msg
    assert f"{p}:4: expected key 'messages' or 'prompt'/'completion'; found keys ['text']" in msg
    assert f"{p}:5: messages[0].role is 'robot'" in msg
    assert f"{p}:6: no non-empty assistant message" in msg
    assert f"{p}:7: empty prompt or completion" in msg
    assert f"{p}:8: not valid UTF-8" in msg
    assert "8 rows: 1 valid, 7 invalid" in msg
    rejected = []
    examples, n = read_examples(p, "auto", "skip", rejected)
    assert len(examples) + len(rejected) == n == 8
    assert all(r["reason"] and r["where"].startswith(str(p)) for r in rejected)
