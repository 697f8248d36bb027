"""The HTTP judge keeps keys home and survives a misbehaving endpoint: redirects are refused (the key is never
re-sent to the target), URLs with credentials or query strings are refused, and malformed usage numbers or an
oversized body are malformed responses (retried, then abstain), not crashes."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from feedback.judges import JudgeItem
from pipeline.judging import HTTPConfig
from feedback.judges.http import HTTPJudge
from feedback.judges.prompting import load_template
from pipeline.blocks import validate
from rlhf.errors import UsageError
from tests.conftest import ROOT

TEMPLATE = load_template(ROOT / "configs" / "judges" / "pairwise.yaml")
ITEM = JudgeItem("Tell me about the river.", "The river is calm.", "The river is dull.")


class Recorder:
    """A local server answering every POST with `reply(handler)`; records each request's Authorization header."""

    def __init__(self, reply):
        self.auth = []
        rec = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                rec.auth.append(self.headers.get("Authorization"))
                code, body, headers = reply(self)
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(content="A", usage=None):
    msg = {"choices": [{"message": {"role": "assistant", "content": content}}],
           "usage": usage if usage is not None else {"prompt_tokens": 10, "completion_tokens": 1}}
    return lambda h: (200, json.dumps(msg).encode(), {})


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-canary-123")


def _judge(url, **kw):
    return HTTPJudge(url, "judge", TEMPLATE, [], api_key_env="TEST_JUDGE_KEY", max_retries=1,
                     sleep=lambda s: None, **kw)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_key_never_reaches_its_target(code):
    thief = Recorder(_answer("A"))
    redirector = Recorder(lambda h: (code, b"", {"Location": thief.url + "/chat/completions"}))
    try:
        verdict = _judge(redirector.url).judge([ITEM])[0]
    finally:
        thief.close()
        redirector.close()
    assert verdict.choice == "abstain" and f"HTTP {code} redirect to {thief.url}" in verdict.reason
    assert verdict.attempts == 1, "a redirect is not retried"
    assert redirector.auth == ["Bearer sk-canary-123"] and thief.auth == []


@pytest.mark.parametrize("url", ["http://user:SECRET@127.0.0.1:9/v1", "http://127.0.0.1:9/v1?api_key=SECRET",
                                 "http://127.0.0.1:9/v1#SECRET", "file:///etc/passwd", "127.0.0.1:9/v1"])
def test_base_urls_with_credentials_or_queries_are_refused(url):
    with pytest.raises(UsageError) as exc:
        validate(HTTPConfig, {"base_url": url, "model": "m"}, "judge.yaml")
    assert "base_url" in str(exc.value) and "SECRET" not in str(exc.value)  # the refusal does not echo the secret


@pytest.mark.parametrize("usage", [{"prompt_tokens": None}, {"prompt_tokens": "12"}, {"completion_tokens": -1},
                                   ["not", "a", "dict"]])
def test_malformed_usage_is_retried_then_abstains(usage):
    server = Recorder(_answer("A", usage))
    try:
        verdict = _judge(server.url).judge([ITEM])[0]
    finally:
        server.close()
    assert verdict.choice == "abstain" and "malformed response" in verdict.reason and len(server.auth) == 2


def test_an_oversized_response_body_is_malformed_not_read_whole():
    big = json.dumps({"choices": [{"message": {"content": "A" + " " * 50_000}}]}).encode()
    server = Recorder(lambda h: (200, big, {}))
    try:
        verdict = _judge(server.url, max_response_bytes=4096).judge([ITEM])[0]
    finally:
        server.close()
    assert verdict.choice == "abstain" and "over 4096 bytes" in verdict.reason


@pytest.mark.parametrize("key", ["sk-canary-123\r\n", "sk-canary-123\n", "sk-canary 123", "sk-canary-123\u00e9"])
def test_a_malformed_key_stops_the_run_without_showing_it(key, tmp_path, monkeypatch, capsys):
    """A key read with $(cat key.txt) from a Windows file ends in \\r: http.client raised from deep inside the
    first request, and the traceback printed the Authorization header with the key. Now the key is checked at
    start-up: exit 2, the variable and the problem named, the key never shown, nothing sent."""
    from pipeline.cli import main
    from tests.conftest import write_yaml

    monkeypatch.setenv("TEST_JUDGE_KEY", key)
    rec = Recorder(_answer())
    try:
        judge = write_yaml(tmp_path / "j.yaml", {"type": "http", "cache": "none", "template": str(
            ROOT / "configs" / "judges" / "pairwise.yaml"), "constitution": None, "http": {
            "base_url": rec.url, "model": "judge", "api_key_env": "TEST_JUDGE_KEY", "max_retries": 0}})
        human = tmp_path / "h.jsonl"
        human.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
        assert main(["feedback", "agree", "--human", str(human), "--judge", str(judge),
                     "-o", str(tmp_path / "a.json")]) == 2
    finally:
        rec.close()
    out = capsys.readouterr()
    assert "$TEST_JUDGE_KEY" in out.err and "key is not shown" in out.err
    assert "canary" not in out.err + out.out and "Traceback" not in out.err
    assert rec.auth == [], "nothing was sent"
