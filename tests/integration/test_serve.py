"""`rlhf serve judge` / `rlhf serve policy` (pipeline/serve/) as a real subprocess on the tiny model,
driven by the official `openai` client and by raw sockets for what a client library would never send.

    pytest -q tests/integration/test_serve.py      # about 25 s on 2 cores

Three servers, each shared by the module: `server` (`serve judge --model tiny --timeout 3
--max-prompt-tokens 300`, concurrency 2), `policy_server` (`serve policy` of a fake policy artifact
whose generation_config.json is poisoned, with a bearer token, concurrency 1 and no queue) and
`eos_server` (a model directory whose tokenizer ends turns at a token the tiny model reaches).
Each test checks something the old `http.server` judge server got wrong.
"""

import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT

try:
    import openai
except ImportError:  # a dev dependency (pip install -e '.[dev]'); Server itself works without it
    openai = None
pytestmark = pytest.mark.skipif(openai is None, reason="needs the openai client: pip install -e '.[dev]'")

KEY_ENV = "RLHF_TEST_SERVE_KEY"
KEY = "test-token-7f3a"
HI = [{"role": "user", "content": "Hi"}]
# ~90 prompt tokens: 90 + 400 new tokens stay inside the tiny model's 512 positions, and the
# tiny model's greedy answer to it never produces EOS, so it really runs 400 steps.
LONG = [{"role": "user", "content": "Tell me about the river. " * 12}]


class Server:
    """A `python -m pipeline serve ...` subprocess; its stdout+stderr collected line by line."""

    def __init__(self, args, env=None, wait=True):
        full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", *args], cwd=ROOT, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            deadline = time.time() + 90
            while not self.ready.wait(0.1):
                assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.log()}"
                assert time.time() < deadline, f"server not ready:\n{self.log()}"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.match(r"serving \S+ at http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
                self.ready.set()

    def log(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)

    def rss_mb(self) -> float:
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def request(self, method, path, body=None, headers=None):
        """(status, headers, parsed JSON or raw bytes) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, dict(resp.getheaders()), json.loads(raw)
            except ValueError:
                return resp.status, dict(resp.getheaders()), raw
        finally:
            conn.close()

    def raw(self, data: bytes, timeout=15) -> bytes:
        """Send bytes on a new socket and read until the server closes or answers in full."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            return _read_response(s)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _read_response(s: socket.socket) -> bytes:
    buf = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return buf
        if not chunk:
            return buf
        buf += chunk
        head, sep, body = buf.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head, re.I)
        if sep and m and len(body) >= int(m.group(1)):
            return buf


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else -1


def assert_openai_error(status, body, expected):
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"], body


def chat(srv_client, messages=HI, **kw):
    return srv_client.chat.completions.create(model="any", messages=messages, **{"temperature": 0, **kw})


@pytest.fixture(scope="module")
def server(tiny_path):
    srv = Server(["judge", "--model", "tiny", "--port", "0", "--timeout", "3", "--max-prompt-tokens", "300"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def policy_artifact(tiny_path, tmp_path_factory):
    """RUN_DIR/sft holding the tiny model as a policy, with a generation_config.json that would
    change every greedy answer if it leaked into sampling (no token may repeat, huge penalties)."""
    stage = tmp_path_factory.mktemp("run") / "sft"
    shutil.copytree(tiny_path, stage / "model")
    gc_path = stage / "model" / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    gc.update({"no_repeat_ngram_size": 1, "repetition_penalty": 50.0, "do_sample": True, "temperature": 30.0,
               "top_k": 1, "max_new_tokens": 2})
    gc_path.write_text(json.dumps(gc))
    (stage / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "stage": "sft", "kind": "policy", "status": "complete", "outputs": {"model": "model"}}))
    return stage


@pytest.fixture(scope="module")
def policy_server(policy_artifact):
    srv = Server(["policy", str(policy_artifact), "--port", "0", "--api-key-env", KEY_ENV, "--concurrency", "1",
                  "--queue", "0"], env={KEY_ENV: KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def eos_server(tiny_path, tmp_path_factory):
    """`serve judge` of a directory: the tiny model with a tokenizer whose end-of-turn token is
    ' school', which the tiny model's greedy answer to HI reaches after a few newlines."""
    model = tmp_path_factory.mktemp("models") / "tiny-school"
    shutil.copytree(tiny_path, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "\u0120school"  # byte-level BPE spells " school" as "Ġschool"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    srv = Server(["judge", "--model", str(model), "--port", "0"])
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- the happy path


def test_completion_usage_and_finish_reason(server, tiny_path):
    from pipeline.generation import chat_ids
    from pipeline.models import load_tokenizer

    client = server.client()
    # (fields this server does not know are ignored, as OpenAI does)
    r = chat(client, max_tokens=8, extra_body={"frequency_penalty": 0, "user": "u1", "not_an_openai_field": {}})
    assert r.object == "chat.completion" and r.model == "tiny"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"
    n_prompt = len(chat_ids(load_tokenizer(tiny_path), HI))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == n_prompt + 8
    assert r.choices[0].finish_reason == "length", "max_tokens was hit, so not 'stop'"
    assert chat(client, max_tokens=8).choices[0].message.content == r.choices[0].message.content, "greedy is greedy"
    status, _, body = server.request("GET", "/health")
    assert status == 200 and body == {"status": "ok"}
    # the bare-path aliases
    status, _, body = server.request("POST", "/chat/completions", {"messages": HI, "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert server.request("GET", "/models")[2]["data"][0]["id"] == "tiny"


def test_finish_reason_stop_on_eos(server, eos_server):
    ref = chat(server.client(), max_tokens=16, logprobs=True)
    tokens = [e.token for e in ref.choices[0].logprobs.content]
    assert " school" in tokens, "precondition: the greedy answer reaches ' school'"
    k = tokens.index(" school")
    r = chat(eos_server.client(), max_tokens=16)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == k + 1, "EOS is counted"
    assert r.choices[0].message.content == "".join(tokens[:k]), "the EOS token itself is not in the text"
    chunks = list(chat(eos_server.client(), max_tokens=16, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert [m.id for m in eos_server.client().models.list().data] == ["tiny-school"], "a directory's basename"


def test_models_shows_a_name_never_a_path(server, policy_server, policy_artifact, tiny_path):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    listed = policy_server.client(api_key=KEY).models.list()
    assert [m.id for m in listed.data] == ["sft"], "a policy artifact is shown by its stage name"
    for srv, headers in ((server, {}), (policy_server, {"Authorization": f"Bearer {KEY}"})):
        raw = json.dumps(srv.request("GET", "/v1/models", headers=headers)[2])
        assert str(tiny_path) not in raw and str(policy_artifact) not in raw and "/" not in raw


def test_streaming_joins_to_the_greedy_answer(server):
    client = server.client()
    whole = chat(client, max_tokens=24)
    chunks = list(chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "streamed token by token, not in one piece"
    assert "".join(pieces) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # on the wire: SSE lines ending with [DONE]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": 4, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.getheader("content-type").startswith("text/event-stream")
    events = [line for line in resp.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_logprobs(server):
    client = server.client()
    r = chat(client, max_tokens=12, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    for entry in content:
        assert entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == tops[0], "greedy takes the top token"
    assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content
    # sampling: log-probabilities of the sampling distribution (temperature and top_p applied)
    s = chat(client, max_tokens=12, logprobs=True, top_logprobs=20, temperature=0.5, top_p=0.05, seed=3)
    for entry in s.choices[0].logprobs.content:
        kept = [(t.token, t.logprob) for t in entry.top_logprobs if t.logprob > -9999]
        assert len(kept) < 20, "top_p 0.05 keeps a few tokens of the tiny model's flat distribution"
        assert abs(sum(math.exp(lp) for _, lp in kept) - 1) < 1e-3, "renormalised over what top_p kept"
        assert (entry.token, entry.logprob) in kept and entry.logprob <= 0, "the sampled token is one of those kept"
    # the same entries arrive in streamed chunks
    streamed = [e for c in chat(client, max_tokens=12, logprobs=True, top_logprobs=5, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_seed_makes_sampling_reproducible(server):
    client = server.client()
    with ThreadPoolExecutor(4) as pool:  # seeded requests race with an unseeded sampling one
        futures = [pool.submit(chat, client, max_tokens=16, temperature=1.0, seed=s) for s in (1234, 1234, None, 99)]
        a, b, _, c = [f.result().choices[0].message.content for f in futures]
    assert a == b and a != c


def test_generation_config_json_of_the_model_is_ignored(server, policy_server):
    """The policy is the tiny model with a poisoned generation_config.json; greedy must not notice."""
    ref = chat(server.client(), max_tokens=16, logprobs=True)
    tokens = [e.token for e in ref.choices[0].logprobs.content]
    assert len(set(tokens)) < len(tokens), "precondition: the answer repeats a token, which the poison forbids"
    got = chat(policy_server.client(api_key=KEY), max_tokens=16)
    assert got.choices[0].message.content == ref.choices[0].message.content
    assert got.usage.completion_tokens == 16


# --------------------------------------------------------------------------- bad requests


def test_feedback_without_a_traffic_log_is_404_naming_monitor(policy_server):
    """Without --monitor there is no answer to rate: a clear 404, not an unknown route or a 500 (the recorded path is
    tested in test_serve_monitor.py)."""
    for path in ("/v1/feedback", "/feedback"):
        status, _, body = policy_server.request("POST", path, {"id": "chatcmpl-1", "rating": "up"},
                                                {"Authorization": f"Bearer {KEY}"})
        assert_openai_error(status, body, 404)
        assert body["error"]["code"] == "monitor_off" and "--monitor DB" in body["error"]["message"], body
    status, _, body = policy_server.request("POST", "/v1/feedback", {"id": "chatcmpl-1", "rating": "up"})
    assert_openai_error(status, body, 401)  # the same guard as completions


def test_every_bad_request_gets_an_openai_error(server):
    over = 1024 * 1024 + 1
    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'"just a string"', 400),
        ({"messages": []}, 422),
        ({"messages": HI, "max_tokens": -1}, 422),
        ({"messages": [{"role": "user"}]}, 422),
        ({"messages": [{"role": "robot", "content": "x"}]}, 422),
        ({"messages": HI, "temperature": "hot"}, 422),
        ({"messages": HI, "top_logprobs": 21, "logprobs": True}, 422),
        ({"messages": HI, "n": 2}, 400),
        ({"messages": HI, "stop": ["\n"]}, 400),
        ({"messages": [{"role": "user", "content": "river " * 400}]}, 400),  # > --max-prompt-tokens 300
    ]
    for body, expected in cases:
        status, _, got = server.request("POST", "/v1/chat/completions", body)
        assert_openai_error(status, got, expected)
    status, _, got = server.request("POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "river " * 400}]})
    assert "300" in got["error"]["message"] and got["error"]["code"] == "context_length_exceeded"
    status, _, got = server.request("POST", "/v1/chat/completions", {"messages": [], "max_tokens": 0})
    assert got["error"]["param"] in ("messages", "max_tokens") and "detail" not in got  # not FastAPI's shape

    # 413 from Content-Length, before the body is read (only 100 bytes are ever sent)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {over}\r\n\r\n").encode()
    response = server.raw(head + b"{" * 100)
    assert _status(response) == 413 and b'"request_too_large"' in response
    # 413 while reading a chunked body (no Content-Length to check)
    response = _send_chunked(server.port, over + 50_000)
    assert _status(response) == 413 and b'"error"' in response

    for method, path, expected in (("GET", "/v1/nowhere", 404), ("POST", "/v2/chat/completions", 404),
                                   ("GET", "/v1/chat/completions", 405)):
        status, _, got = server.request(method, path)
        assert_openai_error(status, got, expected)

    r = chat(server.client(), max_tokens=3)  # still serving
    assert r.usage.completion_tokens == 3
    assert "Traceback" not in server.log()


def _send_chunked(port: int, total: int, chunk: int = 65536) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" % port)
        sent = 0
        try:
            while sent < total:
                n = min(chunk, total - sent)
                s.sendall(b"%x\r\n" % n + b" " * n + b"\r\n")
                sent += n
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _read_response(s)


# --------------------------------------------------------------------------- sharing safely


def test_bearer_token(policy_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, _, body = policy_server.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2},
                                                headers)
        assert_openai_error(status, body, 401)
    status, _, body = policy_server.request("GET", "/v1/models")
    assert_openai_error(status, body, 401)
    with pytest.raises(openai.AuthenticationError):
        policy_server.client(api_key="wrong").models.list()
    r = chat(policy_server.client(api_key=KEY), max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert policy_server.request("GET", "/health")[0] == 200, "health checks need no token"
    assert KEY not in policy_server.log()


def test_refuses_to_start_exposed_without_a_token(tiny_path):
    for extra, env, says in ((["--host", "0.0.0.0"], {}, "--api-key-env"),
                             (["--api-key-env", "RLHF_TEST_UNSET_VAR"], {"RLHF_TEST_UNSET_VAR": ""}, "not set"),
                             (["--api-key-env", KEY_ENV], {KEY_ENV: KEY + "\r\n"}, "carriage return")):
        srv = Server(["judge", "--model", "tiny", "--port", "0", *extra], env=env, wait=False)
        try:
            assert srv.proc.wait(60) == 2
        finally:
            srv.stop()
        time.sleep(0.2)
        assert says in srv.log() and "Traceback" not in srv.log() and KEY not in srv.log()


def test_busy_server_answers_503_with_retry_after(policy_server):
    client = policy_server.client(api_key=KEY)
    stream = chat(client, messages=LONG, max_tokens=400, stream=True)
    next(iter(stream))  # the only generation slot is now taken (concurrency 1, queue 0)
    status, headers, body = policy_server.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2},
                                                  {"Authorization": f"Bearer {KEY}"})
    assert_openai_error(status, body, 503)
    assert int(headers["retry-after"]) >= 1
    # tokenizing is work admission counts: a prompt over the token cap (but not over the byte bound) is not
    # tokenized outside it (it was: a 400 while every slot was taken, and a lock every request shared)
    status, _, body = policy_server.request("POST", "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "river " * 600}]}, {"Authorization": f"Bearer {KEY}"})
    assert_openai_error(status, body, 503)
    stream.close()  # hanging up stops the generation and frees the slot
    deadline = time.time() + 10
    while True:
        status, _, body = policy_server.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2},
                                                {"Authorization": f"Bearer {KEY}"})
        if status == 200 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, body


def _streamed(client, started: threading.Event, out: dict, name: str, **kw) -> None:
    """Stream one chat request: `started` is set at its first chunk; out[name] = (finish reason, when it ended)."""
    finish = None
    for chunk in chat(client, stream=True, **kw):
        started.set()
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    out[name] = (finish, time.monotonic())


def test_short_request_is_not_stuck_behind_a_long_one(server):
    """Once a long streamed request is generating (its first token seen: no guess at how long that takes on this
    machine), a short request is answered before the long one ends."""
    client = server.client()
    started, out = threading.Event(), {}
    t = threading.Thread(target=_streamed, args=(client, started, out, "long"),
                         kwargs=dict(messages=LONG, max_tokens=400))
    t.start()
    assert started.wait(120), "the long request never started"
    short = chat(client, max_tokens=4)
    short_at = time.monotonic()
    t.join(300)
    assert short.usage.completion_tokens == 4
    assert out["long"][0] == "length", "precondition: the long request ran its 400 steps"
    assert short_at < out["long"][1], "the short request finished while the long one was still generating"


def test_flood_of_slow_and_oversized_requests(server):
    rss_before = server.rss_mb()
    slow = []
    for i in range(30):  # headers and part of a body, then silence
        s = socket.create_connection(("127.0.0.1", server.port), timeout=15)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n" % server.port + b'{"messages": [' + b" " * 200)
        slow.append(s)
    for i in range(5):  # half the headers, then silence
        s = socket.create_connection(("127.0.0.1", server.port), timeout=15)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Le" % server.port)
        slow.append(s)
    over = 1024 * 1024 + 1
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {over}\r\n\r\n").encode()
    with ThreadPoolExecutor(8) as pool:
        big = [pool.submit(server.raw, head + b" " * 65536) for _ in range(10)]
        big += [pool.submit(_send_chunked, server.port, over + 10_000) for _ in range(10)]
        r = chat(server.client(), max_tokens=4)  # answered while all of that is going on
        assert r.usage.completion_tokens == 4
        assert [_status(f.result()) for f in big] == [413] * 20
    assert server.rss_mb() < rss_before + 300
    # the stalled clients are dropped after --timeout (3 s): a 408 or a closed connection (each waited for as long
    # as a slow machine may need: the test fails only if the server never drops them)
    for s in slow:
        s.settimeout(120)
        answer = _read_response(s)
        assert answer == b"" or _status(answer) == 408, answer[:200]
        s.close()
    assert chat(server.client(), max_tokens=2).usage.completion_tokens == 2
    assert "Traceback" not in server.log()


def test_control_characters_are_escaped_in_the_log(server):
    from pipeline.serve.schema import escape as _escape

    assert _escape(b"/a\r\nFAKE 200\x1b[31m\x7f") == "/a\\r\\nFAKE 200\\x1b[31m\\x7f"
    response = server.raw(b"GET /v1/\x1b[31mred\rFAKE LINE HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % server.port)
    assert _status(response) == 400
    status, _, body = server.request("GET", "/v1/models%0d%0aFAKE%20LINE%1b[0m", headers={"X-Secret": "hdr-7731"})
    assert status == 404
    assert chat(server.client(), max_tokens=1).usage.completion_tokens == 1
    time.sleep(0.2)
    log = server.log()
    assert "\x1b" not in log and "\r" not in log
    assert not any(line.startswith("FAKE") for line in log.splitlines())
    assert "/v1/models%0d%0aFAKE%20LINE%1b[0m" in log
    assert "hdr-7731" not in log and "content-type" not in log.lower(), "headers are never logged"
    assert_openai_error(status, body, 404)


# --------------------------------------------------------------------------- round three of the security review


def test_huge_prompts_are_refused_by_size_before_tokenizing(server):
    """Ten concurrent 1 MiB prompts were each tokenized in full, under a lock every request shared, before the
    prompt cap answered 400: the server grew by more than 1 GB and kept it. Now a prompt with more bytes than any
    prompt of --max-prompt-tokens tokens can have is refused untokenized, and memory stays where it was."""
    chat(server.client(), max_tokens=2)  # warm
    rss_before = server.rss_mb()
    body = json.dumps({"messages": [{"role": "user", "content": "river " * 170_000}], "max_tokens": 4}).encode()
    assert len(body) < 1024 * 1024, "under --max-body-bytes: it is the prompt cap that must refuse it"
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: server.request("POST", "/v1/chat/completions", body), range(10)))
    for status, _, got in answers:
        assert_openai_error(status, got, 400)
        assert got["error"]["code"] == "context_length_exceeded" and "bytes" in got["error"]["message"], got
    assert server.rss_mb() < rss_before + 100, (rss_before, server.rss_mb())
    assert chat(server.client(), max_tokens=4).usage.completion_tokens == 4


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """True when the server closes `s` (EOF or reset) within `seconds`, reading and dropping anything it sends."""
    s.settimeout(seconds)
    deadline = time.time() + seconds
    try:
        while time.time() < deadline:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


def test_idle_connections_cannot_lock_clients_out(policy_server):
    """266 idle TCP connections locked every client out, before the key was even checked (uvicorn's
    limit_concurrency counts sockets). Now requests are what admission counts: of 300 idle connections from this
    address (bounded, loopback) at most --max-connections-per-client (64) stay open, and an authorised request
    still gets 200, the longest-idle connection closed to make room for it. A connection that sends half a
    request head is closed after --header-timeout (5 s), not --timeout (30 s)."""
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", policy_server.port), timeout=10))
        time.sleep(1)  # idle for a while (a connection idle under 0.5 s is not closed for another: its head may come)
        status, _, body = policy_server.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2},
                                                {"Authorization": f"Bearer {KEY}"})
        assert status == 200, body
        assert _closed_within(idle[0], 5), "the longest-idle connection was closed to make room"
        still_open = [s for s in idle if not _closed_within(s, 0.01)]
        assert len(still_open) < 64, len(still_open)  # the cap per address, less the one closed for the request
    finally:
        for s in idle:
            s.close()
    half = socket.create_connection(("127.0.0.1", policy_server.port), timeout=10)
    half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    assert _closed_within(half, 25), "dropped after --header-timeout (5 s), before --timeout (30 s) could"
    half.close()
    assert "Traceback" not in policy_server.log()


def test_a_seeded_request_makes_no_one_wait(server):
    """Seeded requests held a generation worker while they waited for exclusive use of torch's random generator,
    so with one seeded request generating, a second seeded one took the other worker and a greedy request waited
    behind both (0.04 s alone, 1.54 s behind). Each request now samples with a generator of its own: the second
    seeded request and the greedy one both finish while the first is still generating."""
    client = server.client()
    done: dict = {}
    long_started, seeded_started = threading.Event(), threading.Event()
    # top_p 0.01 keeps only the top token, so it samples the greedy answer, which runs all 400 steps (no EOS)
    first = threading.Thread(target=_streamed, args=(client, long_started, done, "long"),
                             kwargs=dict(messages=LONG, max_tokens=400, temperature=1.0, top_p=0.01, seed=7))
    first.start()
    assert long_started.wait(120), "the long seeded request never started"
    second = threading.Thread(target=_streamed, args=(client, seeded_started, done, "seeded"),
                              kwargs=dict(max_tokens=4, temperature=1.0, seed=8))
    second.start()
    _streamed(client, threading.Event(), done, "greedy", max_tokens=4)
    second.join(300)
    first.join(300)
    assert done["long"][0] == "length", "precondition: the seeded request ran its 400 steps"
    assert done["seeded"][1] < done["long"][1] and done["greedy"][1] < done["long"][1], done
    # the seed still decides the sample
    a, b = (chat(client, max_tokens=12, temperature=1.0, seed=5).choices[0].message.content for _ in range(2))
    assert a == b


def test_cross_site_requests_are_refused_without_a_key(server, policy_server):
    """Without a key the server answered any web page: a text/plain POST needs no CORS preflight, and a DNS name
    rebound to 127.0.0.1 makes the page same-origin. Now a chat request must be application/json, and a server
    without a key answers only requests whose Host names its loopback address and whose Origin (if any) is it."""
    port = server.port
    cases = [({"Content-Type": "text/plain"}, 415), ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
             ({"Host": f"evil.example:{port}"}, 403), ({"Host": "127.0.0.1.evil.example"}, 403),
             ({"Origin": "http://evil.example"}, 403), ({"Origin": "null"}, 403),
             ({"Origin": f"http://127.0.0.1:{port}.evil.example"}, 403)]
    for headers, expected in cases:
        status, _, body = server.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2}, headers)
        assert_openai_error(status, body, expected)
    status, _, body = server.request("GET", "/v1/models", headers={"Host": f"evil.example:{port}"})
    assert_openai_error(status, body, 403)
    for headers in ({}, {"Host": f"localhost:{port}"}, {"Host": "localhost:9000"},  # (an SSH tunnel's port)
                    {"Host": f"[::1]:{port}"}, {"Origin": f"http://127.0.0.1:{port}"},
                    {"Content-Type": "application/json; charset=utf-8"}):
        status, _, body = server.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2}, headers)
        assert status == 200, (headers, body)
    # with a key, the key is the guard (a server on 0.0.0.0 is reached under names it cannot know)
    status, _, body = policy_server.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2},
                                            {"Authorization": f"Bearer {KEY}", "Host": "judge.internal:8000"})
    assert status == 200, body


def test_invalid_unicode_gets_an_openai_error(server):
    """A lone surrogate in message content (JSON "\\ud800") reached the tokenizer and came back as a plain-text 500.
    Requests that are not HTTP at all get a JSON 400 too."""
    for content in ('"a \\ud800 b"', '[{"type": "text", "text": "\\udfff"}]'):
        body = b'{"messages": [{"role": "user", "content": ' + content.encode() + b"}]}"
        status, _, got = server.request("POST", "/v1/chat/completions", body)
        assert_openai_error(status, got, 422)
        assert "lone surrogate" in got["error"]["message"] and got["error"]["param"].startswith("messages.0.content")
    response = server.raw(b"NOT HTTP AT ALL\r\n\r\n")
    assert _status(response) == 400 and b"application/json" in response.lower() and b'"error"' in response
    assert chat(server.client(), max_tokens=1).usage.completion_tokens == 1
    assert "Traceback" not in server.log()
