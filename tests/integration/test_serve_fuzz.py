"""A bounded storm against `rlhf serve` (loopback only): oversized, malformed, slow, idle and cross-site traffic at
once, while an authorised client keeps asking short questions.

    pytest -q tests/integration/test_serve_fuzz.py      # about 30 s on 2 cores

What must hold: every authorised short request is answered (200) within 1 s of what the same request takes on
the quiet server, every refusal is an OpenAI-shaped error (never a 5xx, plain text or a traceback), and the
server's memory comes back within 20% of where it started. The traffic is seeded (random.Random(0)) and bounded:
a fixed number of each kind of request, all sent within the first seconds, every thread joined with a timeout.
"""

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.test_serve import HI, KEY, KEY_ENV, Server, _read_response, _status, openai

pytestmark = pytest.mark.skipif(openai is None, reason="needs the openai client: pip install -e '.[dev]'")

AUTH = f"Authorization: Bearer {KEY}\r\n"


@pytest.fixture(scope="module")
def target(tiny_path):
    srv = Server(["judge", "--model", "tiny", "--port", "0", "--api-key-env", KEY_ENV, "--timeout", "3",
                  "--header-timeout", "1", "--max-prompt-tokens", "300", "--concurrency", "2", "--queue", "4",
                  "--max-connections", "96", "--max-connections-per-client", "64"], env={KEY_ENV: KEY})
    yield srv
    srv.stop()


def _post(port: int, body: bytes, headers: str = AUTH + "Content-Type: application/json\r\n",
          host: str | None = None) -> bytes:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n{headers}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was sent: the answer is still there to read
        return _read_response(s)


def _short(port: int) -> tuple[int, float]:
    """One authorised short request on a new connection: (status, seconds)."""
    t0 = time.monotonic()
    response = _post(port, json.dumps({"messages": HI, "max_tokens": 2, "temperature": 0}).encode())
    return _status(response), time.monotonic() - t0


def _malformed(rng: random.Random, port: int) -> list[bytes]:
    """Requests that are broken at every layer: not HTTP, HTTP with bodies that are not JSON, JSON of every wrong
    shape, text that is not Unicode."""
    junk = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(12)]
    bodies = [b"{not json", b"\xff\xfe\x00{", b"[" * 100_000, b'{"messages": "hi"}', b'{"messages": [{}]}',
              b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"messages": [], "max_tokens": 1e999}',
              b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
              b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
              b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', b'"' + b"a" * 5000,
              json.dumps({"messages": HI, "seed": 2**70}).encode()]
    bodies += [bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 2000))) for _ in range(8)]
    http = [b"GET / HTTP/1.1\r\n\r\n", b"POST /v1/chat/completions HTTP/9.9\r\nHost: x\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n"]
    host = f"127.0.0.1:{port}".encode()
    return junk + http + [b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\n" + AUTH.encode()
                          + b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: "
                          + str(len(b)).encode() + b"\r\n\r\n" + b for b in bodies]


def _raw(port: int, data: bytes) -> bytes:
    """Send `data` and read the answer; b"" when the server closes without one (a head that never completes is
    closed after --header-timeout). The sending side stays open: a half-closed connection counts as gone."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        return _read_response(s)


def _slow_body(port: int) -> bytes:
    """Headers, then a few bytes of a 5000-byte body every half second: answered 408 after --timeout."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AUTH}Content-Type: application/json"
            f"\r\nContent-Length: 5000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(head)
        try:
            for _ in range(12):
                s.sendall(b" " * 10)
                time.sleep(0.5)
        except OSError:
            pass
        return _read_response(s)


def _slow_head(port: int) -> bytes:
    """A request head one line every 0.3 s (slowloris): closed after --header-timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            for i in range(20):
                s.sendall(b"X-Slow-%d: x\r\n" % i)
                time.sleep(0.3)
        except OSError:
            pass
        return _read_response(s)


def _oversized(port: int, kind: int) -> bytes:
    if kind == 0:  # declared too large: refused from Content-Length
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AUTH}Content-Type: "
                f"application/json\r\nContent-Length: {4 * 1024 * 1024}\r\n\r\n").encode()
        return _raw(port, head + b" " * 65536)
    if kind == 1:  # chunked, counted while it arrives
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AUTH}Content-Type: "
                      "application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            try:
                for _ in range(18):
                    s.sendall(b"10000\r\n" + b" " * 65536 + b"\r\n")
            except OSError:
                pass
            return _read_response(s)
    # under the body limit, over any prompt the token cap allows: refused by size, never tokenized
    return _post(port, json.dumps({"messages": [{"role": "user", "content": "river " * 150_000}]}).encode())


def _cross_site(port: int, kind: int) -> bytes:
    """What a web page can make a browser send: no key, text/plain or a form, foreign Origin and Host."""
    body = json.dumps({"messages": HI, "max_tokens": 2}).encode()
    return [
        lambda: _post(port, body, "Content-Type: text/plain\r\nOrigin: http://evil.example\r\n"),
        lambda: _post(port, b"messages=hi", "Content-Type: application/x-www-form-urlencoded\r\n"),
        lambda: _post(port, body, "Content-Type: application/json\r\nOrigin: http://evil.example\r\n",
                      host=f"evil.example:{port}"),
        lambda: _post(port, body, AUTH + "Content-Type: text/plain\r\n"),  # even with the key: JSON only
    ][kind % 4]()


def _openai_error(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return b"content-type: application/json" in head.lower() and set(err) == {"message", "type", "param", "code"}


def test_a_storm_of_bad_traffic_leaves_authorised_requests_answered_and_memory_where_it_was(target):
    """The latency bound is relative: 1 s on top of three times the slowest of five short requests the same
    server answered just before the storm. The issue asks for "within 1 s"; on a quiet machine the baseline is a
    few tens of milliseconds and the bound is about 1.1 s, while on a busy 2-core CI box (other jobs, the storm's
    own threads in this process) the baseline grows with the machine's slowness and the bound with it, so the
    test measures what the storm costs, not how loaded the machine is. Memory is compared with the server's own
    RSS after warm-up, polled for a while after the storm (freed memory can take a moment to return)."""
    port = target.port
    for _ in range(3):  # warm: first requests allocate caches
        assert _short(port)[0] == 200
    start_rss = target.rss_mb()
    baseline = max(_short(port)[1] for _ in range(5))
    limit = 1.0 + 3 * baseline

    rng = random.Random(0)
    idle = []  # more idle sockets than --max-connections, opened first and held through the storm
    for _ in range(300):
        idle.append(socket.create_connection(("127.0.0.1", port), timeout=15))
    time.sleep(0.6)  # idle longer than the grace a fresh connection gets, so room can be made for new ones

    jobs = [lambda d=d: _raw(port, d) for d in _malformed(rng, port)]
    jobs += [lambda k=k: _oversized(port, k) for k in [0, 0, 1, 1] + [2] * 10]  # ten 0.9 MB prompts, as reported
    jobs += [lambda: _slow_body(port) for _ in range(8)] + [lambda: _slow_head(port) for _ in range(8)]
    jobs += [lambda k=k: _cross_site(port, k) for k in range(12)]
    rng.shuffle(jobs)
    probes: list[tuple[int, float]] = []
    storm_over = threading.Event()

    def probe():
        while not storm_over.is_set() or len(probes) < 10:
            probes.append(_short(port))
            time.sleep(0.2)

    prober = threading.Thread(target=probe, daemon=True)
    with ThreadPoolExecutor(24) as pool:
        prober.start()
        answers = list(pool.map(lambda job: job(), jobs, timeout=60))
    storm_over.set()
    prober.join(60)
    for s in idle:
        s.close()

    assert len(probes) >= 10 and all(status == 200 for status, _ in probes), probes
    worst = max(seconds for _, seconds in probes)
    assert worst <= limit, f"an authorised request took {worst:.2f} s (quiet: {baseline:.3f} s, bound {limit:.2f} s)"
    statuses = [_status(a) for a in answers if a]
    assert statuses and all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert all(_openai_error(a) for a in answers if a), [a[:300] for a in answers if a and not _openai_error(a)]
    # every kind of refusal was met (a server with a key checks no Host, so no 403)
    assert {400, 401, 408, 413, 415, 422} <= set(statuses), sorted(set(statuses))

    deadline = time.monotonic() + 20
    while target.rss_mb() > 1.2 * start_rss and time.monotonic() < deadline:
        time.sleep(0.5)
    assert target.rss_mb() <= 1.2 * start_rss, (start_rss, target.rss_mb())
    assert _short(port)[0] == 200
    log = target.log()
    assert "Traceback" not in log and " 500 " not in log and KEY not in log
