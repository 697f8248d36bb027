"""`rlhf serve policy RUN_DIR/STAGE --monitor DB`: every answered completion is a row of the traffic log
(feedback/traffic.py) under the id its client got, `POST /v1/feedback` records thumbs and preferences on them, a
server killed with SIGKILL right after answering has lost no row, and nothing of a request's headers is stored.

    pytest -q tests/integration/test_serve_monitor.py      # about 30 s on 2 cores

A real `python -m pipeline serve policy` subprocess on the tiny model, driven by the official `openai` client (and
http.client for what a client library would not send); the log is read back with TrafficLog and as raw bytes.
"""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from feedback.traffic import TrafficLog
from tests.conftest import ROOT
from tests.integration.test_serve import (HI, KEY_ENV, Server, assert_openai_error, chat, openai,
                                          policy_artifact)  # noqa: F401 - policy_artifact is a fixture

pytestmark = pytest.mark.skipif(openai is None, reason="needs the openai client: pip install -e '.[dev]'")

CANARY = "canary-key-5c2e9f-must-never-be-stored"  # the bearer token: searched for in the log's bytes
SEA = [{"role": "user", "content": "Describe the sea."}]


@pytest.fixture(scope="module")
def monitored(policy_artifact, tmp_path_factory):  # noqa: F811
    db = tmp_path_factory.mktemp("traffic") / "traffic.db"
    srv = Server(["policy", str(policy_artifact), "--port", "0", "--api-key-env", KEY_ENV, "--monitor", str(db)],
                 env={KEY_ENV: CANARY})
    srv.db = db
    yield srv
    srv.stop()


def _new_rows(db, after: int) -> list[dict]:
    log = TrafficLog(db, readonly=True)
    try:
        return list(log.completions(after_seq=after))
    finally:
        log.close()


def _last_seq(db) -> int:
    return max((r["seq"] for r in _new_rows(db, 0)), default=0)


def test_each_answer_is_one_row_under_the_id_the_client_got(monitored, policy_artifact):  # noqa: F811
    client = monitored.client(api_key=CANARY)
    before, t0 = _last_seq(monitored.db), time.time()
    asked = [HI, SEA, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]]
    replies = [chat(client, messages, max_tokens=6) for messages in asked]
    sampled = chat(client, HI, max_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]}]
    chunks = list(chat(client, parts, max_tokens=8, stream=True))
    t1 = time.time()

    rows = _new_rows(monitored.db, before)
    streamed_id = chunks[0].id
    assert [r["id"] for r in rows] == [r.id for r in replies] + [sampled.id, streamed_id]  # once each, in order
    for row, reply, messages in zip(rows, replies + [sampled], asked + [HI]):
        choice = reply.choices[0]
        assert row["response"] == choice.message.content and row["finish_reason"] == choice.finish_reason
        assert (row["prompt_tokens"], row["completion_tokens"]) == (reply.usage.prompt_tokens,
                                                                    reply.usage.completion_tokens)
        assert row["messages"] == messages and row["model"] == reply.model == "sft"
        assert row["stage"] == str(policy_artifact.resolve())
        assert t0 <= row["created"] <= t1 and 0 < row["latency_ms"] <= 1000 * (t1 - t0)
    assert rows[0]["sampling"] == {"temperature": 0, "top_p": 1.0, "max_tokens": 6, "seed": None}
    assert rows[3]["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "seed": 3}

    streamed = rows[4]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and streamed["response"] == text  # the text the client was streamed, recorded once
    assert streamed["finish_reason"] == [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert streamed["completion_tokens"] > 0
    assert streamed["messages"] == [{"role": "user", "content": "Tell me\na story."}]  # the text the model read


def test_feedback_is_recorded_and_every_error_is_openai_shaped(monitored):
    client = monitored.client(api_key=CANARY)
    a, b = (chat(client, HI, max_tokens=4, temperature=1.0, seed=s) for s in (1, 2))
    sea = chat(client, SEA, max_tokens=4)
    log = TrafficLog(monitored.db, readonly=True)
    before = max((f["seq"] for f in log.feedback()), default=0)

    # through the official client (its base URL and key), as docs/serving.md shows
    up = client.post("/feedback", body={"id": a.id, "rating": "up", "comment": "clear"}, cast_to=object)
    assert up == {"id": a.id, "object": "feedback", "recorded": True, "feedback_seq": before + 1}
    auth = {"Authorization": f"Bearer {CANARY}"}
    status, _, body = monitored.request("POST", "/feedback", {"id": b.id, "preferred_over": a.id}, auth)
    assert status == 200 and body["recorded"] is True and body["feedback_seq"] == before + 2

    refused = [  # (body, status, param)
        ({"id": "chatcmpl-never", "rating": "down"}, 404, "id"),
        ({"id": a.id, "preferred_over": "chatcmpl-never"}, 404, "preferred_over"),
        ({"id": a.id, "preferred_over": sea.id}, 400, "preferred_over"),  # answers to different prompts
        ({"id": a.id, "preferred_over": a.id}, 400, "preferred_over"),
        ({"id": a.id, "rating": "up", "preferred_over": b.id}, 400, None),  # both
        ({"id": a.id}, 400, None),  # neither
        ({"id": a.id, "comment": "no verdict"}, 400, None),
        ({"id": a.id, "rating": "meh"}, 400, "rating"),
        ({"id": a.id, "rating": True}, 400, "rating"),
        ({"id": 5, "rating": "up"}, 400, "id"),
        ({"id": a.id, "rating": "up", "comment": 3}, 400, "comment"),
        ({"id": a.id, "rating": "up", "comment": "x" * 4001}, 400, "comment"),
        ({"id": a.id, "rating": "up", "user": "u1"}, 400, "user"),  # our own format: unknown keys are refused
        ({"rating": "up"}, 400, "id"),
        (b"{not json", 400, None),
        (b'["id"]', 400, None),
    ]
    for sent, expected, param in refused:
        status, _, body = monitored.request("POST", "/v1/feedback", sent, auth)
        assert_openai_error(status, body, expected)
        assert body["error"]["param"] == param, (sent, body)
    status, _, body = monitored.request("POST", "/v1/feedback", {"id": a.id, "rating": "up"})
    assert_openai_error(status, body, 401)
    status, _, body = monitored.request("POST", "/v1/feedback", b"id=x&rating=up",
                                        {**auth, "Content-Type": "application/x-www-form-urlencoded"})
    assert_openai_error(status, body, 415)
    with pytest.raises(openai.NotFoundError):
        client.post("/feedback", body={"id": "chatcmpl-gone", "rating": "up"}, cast_to=object)

    rows = [(f["seq"], f["id"], f["rating"], f["preferred_over"], f["comment"]) for f in log.feedback(before)]
    assert rows == [(before + 1, a.id, "up", None, "clear"), (before + 2, b.id, None, a.id, None)]  # nothing else
    assert all(time.time() - 120 < f["created"] <= time.time() for f in log.feedback(before))
    log.close()


def test_nothing_from_the_request_headers_is_stored_and_the_log_is_private(monitored):
    client = monitored.client(api_key=CANARY)
    reply = chat(client, HI, max_tokens=6, extra_headers={"X-Forwarded-For": "203.0.113.7"})
    client.post("/feedback", body={"id": reply.id, "rating": "down"}, cast_to=object)
    files = list(monitored.db.parent.glob(monitored.db.name + "*"))
    assert {p.name.removeprefix(monitored.db.name) for p in files} == {"", "-wal", "-shm"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}  # users' prompts: the owner's alone
    stored = b"".join(p.read_bytes() for p in files)
    assert reply.id.encode() in stored and reply.choices[0].message.content.encode() in stored  # the right bytes
    for secret in (CANARY, "Bearer", "OpenAI/Python", "127.0.0.1", "203.0.113.7", "X-Forwarded-For"):
        assert secret.encode() not in stored, secret


def test_a_server_killed_right_after_answering_has_lost_no_row(policy_artifact, tmp_path):  # noqa: F811
    db = tmp_path / "traffic.db"
    srv = Server(["policy", str(policy_artifact), "--port", "0", "--monitor", str(db), "--monitor-max-rows", "4"])
    try:
        client = srv.client()
        first = [chat(client, HI, max_tokens=3).id for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:  # the last three at once: the writes meet in the writer thread
            last = list(pool.map(lambda n: chat(client, SEA, max_tokens=n).id, (2, 3, 4)))
        srv.proc.send_signal(signal.SIGKILL)  # no shutdown, no checkpoint: what was committed is all there is
        srv.proc.wait(10)
    finally:
        srv.stop()
    log = TrafficLog(db)  # a writer opens (and recovers) the log a killed server left behind
    kept = {r["id"] for r in log.completions()}
    assert kept == set(first[2:] + last) and log.counts()["pruned"] == 2  # --monitor-max-rows 4 kept the newest


@pytest.mark.parametrize("args, message", [
    (["--monitor-max-rows", "3"], "--monitor-max-rows bounds the traffic log: give it with --monitor DB"),
    (["--monitor", "{tmp}/traffic.db", "--monitor-max-rows", "0"], "--monitor-max-rows must be at least 1"),
    (["--monitor", "{tmp}/missing/traffic.db"], "the directory {tmp}/missing does not exist"),
    (["--monitor", "{tmp}"], "is a directory"),
])
def test_monitor_options_are_checked_before_the_model_loads(policy_artifact, tmp_path, args, message):  # noqa: F811
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run([sys.executable, "-m", "pipeline", "serve", "policy", str(policy_artifact), "--port", "0",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and message.replace("{tmp}", str(tmp_path)) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "traffic.db").exists()
