"""OpenAI-compatible HTTP judge (chat completions): vLLM, TGI, Ollama, OpenAI, or `rlhf serve judge`.

The API key is read from the environment variable named in the config (`api_key_env`), at
request time; it is never stored in the judge's identity, the cache, logs or manifests.
Transport failures (timeouts, connection errors, 429, 5xx, a body that is not JSON) are retried
with exponential backoff and jitter, honouring Retry-After, up to `max_retries` times; then the
item is `abstain` with the reason, and it is not cached, so a rerun tries again. An answer that
arrives but cannot be parsed into a choice is `abstain` as well, never a winner.

Verdicts from token probabilities (Lee et al. 2023, RLAIF): with `top_logprobs` > 0 (default 20, OpenAI's
maximum) each request asks for `logprobs` and the first answer token's `top_logprobs` (OpenAI chat-completions
format, as vLLM and `rlhf serve` return them). P(A) = p(A) / (p(A) + p(B)) over the entries whose token, stripped of
spaces, is a choice letter; a choice outside the top k is given the probability of the k-th entry, an upper bound
on its own, so the estimate errs towards 0.5. The per-order probabilities are then averaged over both orders by the
`average` position policy. Where the endpoint gives no logprobs, or neither letter is among them, the answer text
is parsed instead. Each verdict records how it was read (`read: logprobs | text`).

Up to `concurrency` requests are in flight at once (threads); results come back in input order, and tokens and
cost are summed over the run (`stats()`).
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

from feedback.judges import Judge, JudgeItem, Verdict
from feedback.judges.prompting import Template, build_messages, parse_choice, select_principles
from rlhf.errors import UsageError

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: urllib's default handler re-sends the Authorization header to whatever host or
    scheme a 301/302/303/307/308 names, which would hand the API key to a third party."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect)


class _Malformed(ValueError):
    """A response that arrived but is not a chat completion we can read (retried, then abstain)."""


def _read_answer(payload: bytes) -> tuple[str, int, int, dict]:
    """(content, prompt_tokens, completion_tokens, the first choice) of a chat-completions body, or _Malformed."""
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Malformed(f"malformed response body: {payload[:80]!r}") from None
    if not isinstance(content, str):
        raise _Malformed(f"malformed response: content is {type(content).__name__}, not text")
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        raise _Malformed(f"malformed response: usage is {type(usage).__name__}")
    counts = []
    for key in ("prompt_tokens", "completion_tokens"):
        v = usage.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _Malformed(f"malformed response: usage.{key} is {v!r}")
        counts.append(v)
    return content, counts[0], counts[1], choice


def _logprob(entry) -> tuple[str, float] | None:
    if not isinstance(entry, dict):
        return None
    token, value = entry.get("token"), entry.get("logprob")
    if not isinstance(token, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return (token, float(value)) if math.isfinite(value) and value <= 1e-6 else None


def read_logprobs(choice: dict, letters: tuple[str, str]) -> tuple[float, str] | None:
    """(P(A), how it was read) from the first answer token's top_logprobs, or None where the endpoint gave none
    (or neither letter is among them): then the text is parsed instead."""
    block = choice.get("logprobs") if isinstance(choice, dict) else None
    content = block.get("content") if isinstance(block, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return None
    first = content[0]
    listed = {}
    tops = first.get("top_logprobs")
    for entry in [first, *(tops if isinstance(tops, list) else [])]:  # the sampled token may lie outside the top k
        got = _logprob(entry)
        if got is not None:
            listed.setdefault(got[0], got[1])
    if len(listed) < 2:  # only the sampled token: nothing to weigh it against
        return None
    mass = [sum(math.exp(v) for t, v in listed.items() if t.strip() == letter) for letter in letters]
    if not any(mass):
        return None
    floor = math.exp(min(listed.values()))  # an unlisted token is no likelier than the least likely listed one
    note = ""
    for i, letter in enumerate(letters):
        if not mass[i]:
            mass[i] = floor
            note = f"; {letter!r} not among the {len(listed)} listed: bounded by the least likely of them"
    pa, pb = mass
    return pa / (pa + pb), f"p({letters[0]})={pa:.4g} p({letters[1]})={pb:.4g}{note}"


def read_api_key(env: str, who: str) -> str:
    """The key held by the environment variable `env`, checked before it is used: a bearer token is printable
    ASCII without spaces. A key read with `$(cat key.txt)` from a Windows file ends in \\r; sent as it is, it made
    http.client raise deep inside a request, with the header (and so the key) in the traceback. The message here
    names the variable and the problem, never the key."""
    value = os.environ.get(env, "")
    if not value:
        raise UsageError(f"{who} reads its API key from ${env}, which is not set or empty")
    names = {"\r": "a carriage return (\\r)", "\n": "a line break (\\n)", " ": "a space", "\t": "a tab"}
    for i, c in enumerate(value):
        if not "\x21" <= c <= "\x7e":
            what = names.get(c, f"the character U+{ord(c):04X}")
            where = "at its end" if not value[i:].strip() else "inside it"
            raise UsageError(f"${env} (the API key of {who}) holds {what} {where}: a key is printable ASCII with no "
                             "spaces or line breaks. A key file from Windows ends lines with \\r\\n: read it with "
                             f"{env}=$(tr -d '\\r\\n' < key.txt). (The key is not shown.)")
    return value


class HTTPJudge(Judge):
    name = "http"
    streams_results = True  # CachedJudge stores each verdict as it arrives

    def __init__(self, base_url: str, model: str, template: Template, principles: list[str],
                 principle_mode: str = "all", n_principles: int = 2, api_key_env: str | None = None,
                 timeout: float = 30.0, max_retries: int = 4, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 concurrency: int = 4, max_tokens: int = 8, temperature: float = 0.0, top_logprobs: int = 20,
                 price_per_1k_prompt: float = 0.0, price_per_1k_completion: float = 0.0,
                 max_response_bytes: int = 1 << 20, sleep=time.sleep):
        if api_key_env:
            read_api_key(api_key_env, "the HTTP judge")  # at start-up: a bad key stops the run before any call
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model, self.template, self.principles = base_url, model, template, principles
        self.mode, self.n, self.api_key_env = principle_mode, n_principles, api_key_env
        self.timeout, self.max_retries, self.backoff_base, self.backoff_max = timeout, max_retries, backoff_base, backoff_max
        self.concurrency, self.max_tokens, self.temperature = concurrency, max_tokens, temperature
        self.top_logprobs = top_logprobs
        self.prices = (price_per_1k_prompt, price_per_1k_completion)
        self.max_response_bytes = max_response_bytes
        self._sleep = sleep
        self._lock = threading.Lock()
        self.counters = {"requests": 0, "retries": 0, "gave_up": 0, "unparseable": 0, "read_logprobs": 0,
                         "read_text": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def identity(self) -> dict:
        return {"type": "http", "base_url": self.base_url, "model": self.model, "principles": self.mode,
                "n_principles": self.n, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_logprobs": self.top_logprobs}

    def stats(self) -> dict:
        c = dict(self.counters)
        c["cost"] = round(c["prompt_tokens"] / 1000 * self.prices[0] + c["completion_tokens"] / 1000 * self.prices[1], 6)
        return c

    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                self.counters[k] += v

    def request_body(self, it: JudgeItem) -> dict:
        principles = select_principles(self.principles, self.mode, self.n, str(it.prompt) + str(it.id))
        return {"model": self.model, "messages": build_messages(self.template, it.prompt, it.response_a,
                                                                it.response_b, principles),
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                **({"logprobs": True, "top_logprobs": self.top_logprobs} if self.top_logprobs else {})}

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.backoff_max, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to backoff
        return min(self.backoff_max, self.backoff_base * 2 ** attempt) * (0.5 + random.random())

    def _one(self, it: JudgeItem) -> Verdict:
        body = json.dumps(self.request_body(it)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {read_api_key(self.api_key_env, 'the HTTP judge')}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            self._count(requests=1)
            retry_after = None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    payload = resp.read(self.max_response_bytes + 1)
                if len(payload) > self.max_response_bytes:
                    raise _Malformed(f"response body over {self.max_response_bytes} bytes")
                content, pt, ct, first = _read_answer(payload)
                self._count(prompt_tokens=pt, completion_tokens=ct)
                usage = {"prompt_tokens": pt, "completion_tokens": ct}
                read = read_logprobs(first, self.template.choices[:2]) if self.top_logprobs else None
                if read is not None:
                    p, how = read
                    self._count(read_logprobs=1)
                    return Verdict("a" if p > 0.5 else "b" if p < 0.5 else "tie", p, raw=content,
                                   reason=f"answer-token probabilities: {how}", attempts=attempt + 1, usage=usage,
                                   read="logprobs")
                choice = parse_choice(content, self.template.choices)
                self._count(read_text=1, unparseable=int(choice == "abstain"))
                return Verdict(choice, {"a": 1.0, "b": 0.0, "tie": 0.5}.get(choice), raw=content,
                               reason="unparseable answer" if choice == "abstain" else "parsed answer",
                               attempts=attempt + 1, usage=usage, read="text")
            except _Malformed as exc:
                last = str(exc)
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if 300 <= exc.code < 400:
                    self._count(gave_up=1)
                    target = exc.headers.get("Location", "?") if exc.headers else "?"
                    return Verdict("abstain", reason=f"transport: HTTP {exc.code} redirect to {target} refused "
                                   "(the key is never sent on; not retried)", attempts=attempt + 1)
                if exc.code not in RETRYABLE_STATUS:
                    self._count(gave_up=1)
                    hint = (" (an endpoint without logprobs may refuse them: set http.top_logprobs: 0)"
                            if exc.code in (400, 422) and self.top_logprobs else "")
                    return Verdict("abstain", reason=f"transport: {last} (not retried){hint}", attempts=attempt + 1)
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt < self.max_retries:
                self._sleep(self._delay(attempt, retry_after))
        self._count(gave_up=1)
        return Verdict("abstain", reason=f"transport: gave up after {self.max_retries + 1} attempts ({last})",
                       attempts=self.max_retries + 1)

    def judge(self, items: list[JudgeItem], on_result=None) -> list[Verdict]:
        from tqdm.auto import tqdm

        out: list[Verdict | None] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._one, it): j for j, it in enumerate(items)}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=f"judging ({self.model})",
                            unit="call", disable=len(items) <= self.concurrency):
                j = futures[fut]
                out[j] = fut.result()
                if on_result is not None:
                    on_result(j, out[j])
        return out  # type: ignore[return-value]
