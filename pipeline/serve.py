"""One OpenAI-compatible chat-completions server for judges and policies (FastAPI + uvicorn).

    rlhf serve judge --model smollm2-135m-instruct            # a judge for `type: http` judge configs
    rlhf serve policy runs/quickstart/sft --port 8001         # a trained policy artifact
    RLHF_SERVE_KEY=... rlhf serve judge --model tiny --host 0.0.0.0 --api-key-env RLHF_SERVE_KEY

Endpoints: `POST /v1/chat/completions` (and `/chat/completions`), `GET /v1/models` (and `/models`),
`GET /health`. Any OpenAI client works against `http://HOST:PORT/v1`; the `openai` package is what
the tests use. Honoured request fields: model (ignored: one model is served), messages,
max_tokens / max_completion_tokens, temperature (0 = greedy), top_p, stream (+ stream_options
include_usage), logprobs, top_logprobs, seed, n (1 only), stop (refused unless empty); unknown
fields are ignored as OpenAI does.

How the pieces fit, and why:
- Connections (`_protocol`, `_Connections`): at most `--max-connections` open, and
  `--max-connections-per-client` per client address; at a cap the connection idle longest (no
  request in progress) is closed to make room, so idle or half-sent sockets never lock anyone out.
  A request head must arrive within `--header-timeout`.
- A request is read by hand (`_read_body`): it must be `application/json`, Content-Length is
  checked before reading, a chunked body is counted while it arrives, and the whole body must
  arrive within `--timeout`, so a slow or oversized client costs a bounded amount of memory and
  time. Bodies are then parsed and validated by pydantic; every failure is an OpenAI-shaped error
  (`_error`), never FastAPI's default shape, plain text, a traceback or a dropped connection.
- A prompt with more bytes than any prompt of `--max-prompt-tokens` tokens can have is refused
  before it is tokenized; the others are tokenized in the generation worker, with a tokenizer of
  the worker's own, so tokenizing counts against admission and no lock is shared by all requests.
- Generation runs in a thread pool of `--concurrency` workers (torch releases the GIL), so a short
  request never waits behind a long one; at most `--concurrency + --queue` requests are admitted,
  the rest get 503 with Retry-After. Each sampling request draws its tokens with a random
  generator of its own (seeded by its `seed`), so no request waits for another's. Each request
  builds a fresh `GenerationConfig`, and the model's own generation_config.json is replaced by a
  neutral one at load, because transformers fills every field a request leaves unset from the
  model's file (a repetition_penalty there would silently change what is sampled).
- `_Guard` (outermost ASGI layer) checks the bearer token, or without one the Host and Origin
  headers (only requests addressed to the loopback address, from no other site), writes the
  access log (control characters escaped, no headers) and turns any escaped exception into a
  one-line log and a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from pipeline.errors import UsageError

log = logging.getLogger("rlhf.serve")

MIB = 1024 * 1024


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (character -> byte), to recover a token's exact bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()
NEG_INF_LOGPROB = -9999.0  # JSON has no -Infinity: tokens that top_p removed get this (as vLLM does)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    max_body_bytes: int = MIB
    max_prompt_tokens: int | None = None  # None: the model's context length minus one
    max_tokens: int = 512  # cap on max_tokens, and the default when a request gives none
    concurrency: int = 2
    queue: int = 8
    timeout: float = 30.0  # seconds a client has to send its request (headers and body)
    header_timeout: float = 5.0  # seconds a connection may wait without a complete request head (idle, or slow)
    max_connections: int = 256  # open connections in all; beyond, the longest-idle one is closed
    max_connections_per_client: int = 64  # the same per client address
    served_model_name: str | None = None
    trust_remote_code: bool = False  # only from the command line: never from the served artifact

    @classmethod
    def from_args(cls, args) -> "ServeOptions":
        """From the parsed `rlhf serve ...` arguments (one attribute per field)."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- request schema


class _Strict(BaseModel):
    # Unknown fields are ignored (OpenAI clients send many); known ones are strict: "5" is not 5,
    # true is not 1, NaN is not a temperature.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _unicode(text: str) -> str:
    """Text a tokenizer can take: JSON's \\ud800 escapes decode to lone surrogates, which are not Unicode text
    (the tokenizer raised, and the client got a plain-text 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}: not "
                         "valid Unicode text") from None
    return text


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid(cls, v: str) -> str:
        return _unicode(v)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _valid(cls, v):
        return _unicode(v) if isinstance(v, str) else v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # the range torch.manual_seed accepts
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _error(exc: APIError) -> Response:
    return Response(_error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)


def _validation_error(exc: ValidationError | Exception) -> APIError:
    """pydantic's list of errors -> one OpenAI-style message; `param` names the first bad field."""
    errors = exc.errors()
    # a union (content: text or parts) fails in every branch; a failed check of ours says most
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    loc = ".".join(str(x) for x in first["loc"] if x != "body")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    return APIError(422, f"{loc or 'body'}: {msg}{more}", param=loc or None, code=first["type"])


# --------------------------------------------------------------------------- the model


class Job:
    """One admitted request: its messages, then (in the worker) its prompt ids, the tokens produced so far, and a
    channel to the event loop. `ready` resolves once the prompt is tokenized and accepted (None) or refused (the
    APIError), so a stream's status line is sent only for a prompt that fits."""

    def __init__(self, loop, messages: list[Message], max_tokens: int, temperature: float, top_p: float,
                 seed: int | None, logprobs: bool, top_logprobs: int, stream: bool):
        self.loop, self.messages, self.max_tokens = loop, messages, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.want_logprobs, self.top_logprobs, self.stream = logprobs, top_logprobs, stream
        self.prompt_ids: list[int] = []
        self.max_new_tokens = 0
        self.ready: asyncio.Future = loop.create_future()
        self.error: APIError | None = None
        self.events: asyncio.Queue = asyncio.Queue()  # ("delta", text, logprob entry | None) ... ("end",)
        self.cancelled = threading.Event()  # set when the client goes away: generation stops at the next token
        self.tokens: list[int] = []
        self.logprobs: list[dict] = []
        self.text = ""
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            self.cancelled.set()

    def resolve(self, error: APIError | None = None) -> None:
        """From the worker: the prompt is accepted (error None) or refused."""
        self.error = error
        self._call(lambda: self.ready.done() or self.ready.set_result(error))

    def emit(self, *event) -> None:
        if self.stream:
            self._call(self.events.put_nowait, event)


class Engine:
    """A causal LM in eval mode, a bounded pool of generation threads, and admission control.

    Admission counts requests from the moment their body is parsed: tokenizing the prompt happens in the
    generation worker, so it is bounded by --concurrency like generation, and each worker has a tokenizer of its
    own (no lock shared by every request; a fast tokenizer cannot be used by two threads at once). A prompt whose
    text has more bytes than any prompt of --max-prompt-tokens tokens can have is refused before it is tokenized."""

    def __init__(self, path: str, name: str, opts: ServeOptions):
        import copy

        import torch
        from transformers import GenerationConfig
        from transformers.utils import logging as hf_logging

        from pipeline.models import load_causal_lm, load_tokenizer

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # Two generations on two cores with two OpenMP threads each oversubscribe the CPU and run
        # tens of times slower; split the cores between the workers unless the user chose.
        if not os.environ.get("OMP_NUM_THREADS"):
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // opts.concurrency))
        self.name = name
        self.tok = load_tokenizer(path, opts.trust_remote_code)
        model = load_causal_lm(path, "fp32", opts.trust_remote_code)  # an adapter directory loads merged into its base
        model.eval().requires_grad_(False)
        # generate() fills every field a request's GenerationConfig leaves unset from the model's own
        # generation_config.json; a neutral one here means only the request decides what is sampled.
        model.generation_config = GenerationConfig(eos_token_id=self.tok.eos_token_id,
                                                   pad_token_id=self.tok.pad_token_id)
        self.model = model
        limits = [getattr(model.config, "max_position_embeddings", None), self.tok.model_max_length]
        self.context = min([x for x in limits if isinstance(x, int) and 0 < x < 10**7] or [10**7])
        self.max_prompt_tokens = min(opts.max_prompt_tokens or self.context - 1, self.context - 1)
        # No token stands for more text than the longest entry of the vocabulary (in UTF-8 bytes; at least one
        # character), so a prompt with more bytes than this has more tokens than the cap, whatever they are.
        longest = max((len(t.encode("utf-8", "surrogatepass")) for t in self.tok.get_vocab()), default=4)
        self.max_prompt_bytes = self.max_prompt_tokens * max(4, longest)
        self.opts = opts
        self._local = threading.local()
        spares = [copy.deepcopy(self.tok) for _ in range(opts.concurrency)]
        self.pool = ThreadPoolExecutor(opts.concurrency, thread_name_prefix="generate",
                                       initializer=lambda: setattr(self._local, "tok", spares.pop()))
        self._lock = threading.Lock()
        self._admitted: set[Job] = set()
        self._token_text: dict[int, tuple[str, list[int]]] = {}
        backend = getattr(self.tok, "backend_tokenizer", None)
        self._byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    # -- admission: at most concurrency + queue requests are tokenizing, generating or waiting for a worker
    def submit(self, job: Job):
        with self._lock:
            if len(self._admitted) >= self.opts.concurrency + self.opts.queue:
                raise APIError(503, f"the server is busy ({self.opts.concurrency} generating, {self.opts.queue} "
                               "queued); retry later", code="overloaded", headers={"Retry-After": "1"})
            self._admitted.add(job)
        future = self.pool.submit(self._run, job)
        # The slot is freed when the work is done, not when the client leaves: a cancelled job
        # still holds its worker until the next token.
        future.add_done_callback(lambda _: self._release(job))
        return future

    def _release(self, job: Job) -> None:
        with self._lock:
            self._admitted.discard(job)

    def close(self) -> None:
        with self._lock:
            for job in self._admitted:
                job.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def prompt_bytes(self, messages: list[Message]) -> int:
        return sum(len(m.text().encode("utf-8")) for m in messages)

    @property
    def worker_tok(self):
        """The tokenizer of the calling generation worker (each has its own); the engine's own for any other caller."""
        return getattr(self._local, "tok", None) or self.tok

    def decode(self, ids: list[int]) -> str:
        return self.worker_tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> tuple[str, list[int]]:
        """A token as OpenAI's logprobs show it: its text and its exact UTF-8 bytes. A byte-level BPE
        token may hold part of a character, which decoding alone would turn into U+FFFD."""
        cached = self._token_text.get(token_id)
        if cached is None:
            cached = self._token_text[token_id] = self._describe_token(self.worker_tok, token_id)
        return cached

    def _describe_token(self, tok, token_id: int) -> tuple[str, list[int]]:
        added = tok.added_tokens_decoder.get(token_id)
        piece = tok.convert_ids_to_tokens(token_id)
        if added is None and self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
        else:
            raw = (added.content if added is not None else tok.decode([token_id])).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _tokenize(self, job: Job) -> bool:
        """In the worker: the job's prompt ids and token budget, or the job refused (False)."""
        from pipeline.generation import chat_ids

        ids = chat_ids(self.worker_tok, [{"role": m.role, "content": m.text()} for m in job.messages])
        if len(ids) > self.max_prompt_tokens:
            job.resolve(APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most "
                                 f"{self.max_prompt_tokens}", param="messages", code="context_length_exceeded"))
            return False
        job.prompt_ids = ids
        job.max_new_tokens = min(job.max_tokens, self.context - len(ids))
        job.resolve()
        return True

    def generation_config(self, job: Job):
        """Greedy as far as generate() knows (a sampling request's tokens are drawn by _TokenChooser); a prompt-tuned
        policy generates without a KV cache, which loses its prompt (pipeline/generation.py)."""
        from pipeline.generation import generation_config, prompt_learning

        extra = {"use_cache": False} if prompt_learning(self.model) else {}
        return generation_config(self.worker_tok, job.max_new_tokens, 0.0, **extra)

    def _run(self, job: Job) -> None:
        """In a worker thread: tokenize, then generate, streaming each token to the job as it is sampled."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if job.cancelled.is_set():  # the client left while the request was queued
            job.resolve(APIError(499, "client closed the request"))
            job.emit("end")
            return
        try:
            if not self._tokenize(job):
                return
            chooser = _TokenChooser(job) if job.temperature > 0 or job.want_logprobs else None
            with torch.inference_mode():
                ids = torch.tensor([job.prompt_ids], dtype=torch.long)
                # greedy as far as generate() knows: a sampling request's token is drawn by the chooser, with the
                # request's own random generator (no request waits for another's seed)
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    generation_config=self.generation_config(job),
                                    logits_processor=LogitsProcessorList([chooser] if chooser else []),
                                    stopping_criteria=StoppingCriteriaList([_StopWhenCancelled(job)]),
                                    streamer=_JobStreamer(self, job, chooser))
            job.text = self.decode(job.tokens)
            eos = self.tok.eos_token_id
            job.finish_reason = "stop" if job.tokens and job.tokens[-1] == eos else "length"
            job.emit("end")
        except Exception as exc:  # noqa: BLE001 - reported to the client and logged in one line
            log.error("generation failed: %s: %s", type(exc).__name__, _escape(str(exc))[:300])
            job.finish_reason = "error"
            job.resolve(APIError(500, f"generation failed: {type(exc).__name__}", code="generation_failed"))
            job.emit("error", f"generation failed: {type(exc).__name__}")
            raise


class _TokenChooser:
    """A logits processor that picks each token itself: for a sampling request, from the distribution temperature
    and top_p leave, with a torch.Generator of the request's own (seeded by its `seed`, else at random), so that
    no request shares torch's global generator and none waits for another; generate() runs greedy and takes the
    one token left. With logprobs it keeps each step's log-probabilities of that distribution (for a greedy
    request, of the model's)."""

    def __init__(self, job: Job):
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        warpers = []
        self.sampling = job.temperature > 0
        if self.sampling and job.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(job.temperature))
        if self.sampling and job.top_p < 1.0:
            warpers.append(TopPLogitsWarper(job.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = torch.Generator()
        if job.seed is not None:
            self.generator.manual_seed(job.seed)
        else:
            self.generator.seed()
        self.steps: list | None = [] if job.want_logprobs else None  # one log-softmax row per step (the streamer's)

    def __call__(self, input_ids, scores):
        import torch

        logp = torch.log_softmax(self.warpers(input_ids, scores.float()), dim=-1)
        if self.steps is not None:
            self.steps.append(logp[0])
        if not self.sampling:
            return scores
        token = torch.multinomial(logp.exp(), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


class _StopWhenCancelled:
    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.job.cancelled.is_set(), dtype=torch.bool)


class _JobStreamer:
    """generate()'s streamer: the first put() is the prompt, then one token per step."""

    def __init__(self, engine: Engine, job: Job, chooser: _TokenChooser | None):
        self.engine, self.job = engine, job
        self.steps = chooser.steps if chooser is not None else None
        self.prompt_seen = False
        self.sent = ""  # text already streamed to the client

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        job, engine = self.job, self.engine
        token = int(value.reshape(-1)[0])
        job.tokens.append(token)
        entry = None
        if self.steps is not None:
            entry = _logprob_entry(engine, token, self.steps.pop(0), job.top_logprobs)
            job.logprobs.append(entry)
        if job.stream:
            # Decode the whole completion each step and send what is new, holding back a trailing
            # partial UTF-8 character (U+FFFD) until the next token completes it.
            text = engine.decode(job.tokens)
            delta = ""
            if not text.endswith("\ufffd") and text.startswith(self.sent):
                delta, self.sent = text[len(self.sent):], text
            job.emit("delta", delta, entry)

    def end(self) -> None:
        pass


def _logprob_entry(engine: Engine, token: int, row, k: int) -> dict:
    import torch

    def item(tid: int, lp: float) -> dict:
        text, raw = engine.token_bytes(tid)
        return {"token": text, "logprob": max(lp, NEG_INF_LOGPROB), "bytes": raw}

    top = []
    if k:
        values, indices = torch.topk(row, k)
        top = [item(int(i), float(v)) for v, i in zip(values, indices)]
    return {**item(token, float(row[token])), "top_logprobs": top}


# --------------------------------------------------------------------------- HTTP


async def _read_body(request, limit: int, timeout: float) -> bytes:
    """The request body, refusing more than `limit` bytes (413) or a body slower than `timeout` (408)."""
    too_large = APIError(413, f"request body over the limit of {limit} bytes", code="request_too_large",
                         headers={"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before a byte of the body is read
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
        except (asyncio.TimeoutError, TimeoutError):
            raise APIError(408, f"request body not received within {timeout:g} s", code="timeout",
                           headers={"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            if more:
                # Read (and drop) a little more so the client is reading our answer, not being reset
                # mid-upload; a client that keeps sending is cut off when this budget runs out.
                await _drain(request, 4 * limit, min(2.0, max(0.0, deadline - loop.time())))
            raise too_large
        if not more:
            return bytes(body)


async def _drain(request, budget: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while budget > 0 and loop.time() < deadline:
        try:
            message = await asyncio.wait_for(request.receive(), deadline - loop.time())
        except (asyncio.TimeoutError, TimeoutError):
            return
        budget -= len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


class _ClientGone(Exception):
    """The client disconnected; there is nobody to answer."""


async def _wait_for_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _parse(body: bytes) -> ChatRequest:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(obj).__name__}", code="invalid_json")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _require_json(request) -> None:
    """A chat request is JSON. A web page can send a "simple" cross-site POST (text/plain, a form) without asking
    the server first; it cannot send application/json without a CORS preflight, which this server never grants."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {_escape(media or 'none')[:60]!r}",
                       code="unsupported_media_type")


def build_app(engine: Engine, opts: ServeOptions, api_key: str | None):
    """The ASGI application: FastAPI routes inside the `_Guard` layer (which, when there is no key, checks that the
    Host and Origin headers name the bound loopback address)."""
    app = FastAPI(title="rlhf serve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        # anything unforeseen: an OpenAI-shaped 500 instead of Starlette's plain text; Starlette then raises the
        # exception on, and _Guard writes its one log line
        return _error(APIError(500, "internal error"))

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown routes (404) and wrong methods (405)
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return _error(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                               headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return _error(_validation_error(exc))

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": started, "owned_by": "rlhf"}

    started = int(time.time())

    async def health():
        return {"status": "ok"}

    async def models():
        return {"object": "list", "data": [model_card()]}

    async def chat_completions(request: Request):
        _require_json(request)  # before the body is read: a form or text/plain post from a web page gets 415
        try:
            req = _parse(await _read_body(request, opts.max_body_bytes, opts.timeout))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; keeps the access log honest
        if req.n != 1:
            raise APIError(400, "n: only n=1 is supported", param="n", code="unsupported_value")
        if req.stop:
            raise APIError(400, "stop: stop sequences are not supported by this server", param="stop",
                           code="unsupported_value")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        size = engine.prompt_bytes(req.messages)
        if size > engine.max_prompt_bytes:  # more tokens than the cap, whatever they are: refused untokenized
            raise APIError(400, f"the prompt is {size} bytes, more than any prompt of {engine.max_prompt_tokens} "
                           f"tokens (this server's limit) can be", param="messages", code="context_length_exceeded")
        wanted = req.max_tokens or req.max_completion_tokens or opts.max_tokens
        job = Job(asyncio.get_running_loop(), req.messages, min(wanted, opts.max_tokens), req.temperature, req.top_p,
                  req.seed, req.logprobs, req.top_logprobs or 0, req.stream)
        future = engine.submit(job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.tokens),  # noqa: E731
                         "total_tokens": len(job.prompt_ids) + len(job.tokens)}

        # Wait for the prompt to be accepted (a stream) or the whole generation, but stop if the client hangs up.
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        done = job.ready if req.stream else asyncio.wrap_future(future)
        try:
            await asyncio.wait({watcher, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not done.done():
            job.cancel()
            return Response(status_code=499)
        if job.error is not None:
            raise job.error
        if not req.stream and done.exception() is not None:
            raise APIError(500, f"generation failed: {type(done.exception()).__name__}", code="generation_failed")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _sse(job, cid, created, engine.name, usage, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(job.cancel))
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": engine.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                         "logprobs": {"content": job.logprobs} if req.logprobs else None,
                         "finish_reason": job.finish_reason}],
            "usage": usage(),
        })

    for prefix in ("/v1", ""):  # OpenAI clients use /v1; some tools call the bare paths
        app.add_api_route(prefix + "/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(prefix + "/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return _Guard(app, api_key, check_host=api_key is None, bound=opts.host)


async def _sse(job: Job, cid: str, created: int, name: str, usage, include_usage: bool):
    """Server-sent events: a role chunk, one chunk per token, a finish_reason chunk, [DONE]."""

    def chunk(delta: dict, entry: dict | None = None, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": [entry]} if entry else None,
                  "finish_reason": finish}
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
        return f"data: {json.dumps(obj)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                _, delta, entry = event
                sent += delta
                if delta or entry:
                    yield chunk({"content": delta}, entry)
            elif event[0] == "end":
                if job.text.startswith(sent) and len(job.text) > len(sent):  # a held-back partial character
                    yield chunk({"content": job.text[len(sent):]})
                yield chunk({}, finish=job.finish_reason)
                if include_usage:
                    obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:  # ("error", message): the status line is already sent, so the error travels as an event
                yield f"data: {_error_body(500, event[1], code='generation_failed').decode()}\n\n"
                return
    finally:
        job.cancel()  # the client left early (or we are done): stop generating


def _escape(raw: bytes | str) -> str:
    """Printable ASCII only: control characters (\\r, \\n, \\x1b ...) become escapes, so a request
    cannot forge log lines or send terminal escape codes to whoever reads the log."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")  # one character per byte, so every byte is shown
    return raw.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def _names_loopback(authority: bytes, bound: str) -> bool:
    """Whether a Host header (or an Origin's host) `authority`, `name[:port]`, names this machine's loopback: the
    bound host, `localhost`, or a loopback address. Any other name (evil.example resolved to 127.0.0.1: DNS
    rebinding) means a web page made the request for a site of its own. The port is not compared: through an SSH
    tunnel the client's port is another, and a page on another local port is another origin, which the browser
    already keeps from reading the answer or sending JSON."""
    try:
        text = authority.decode("ascii").lower()
    except UnicodeDecodeError:
        return False
    if text.startswith("[") and "]" in text:  # [::1]:8000
        host, rest = text[1:text.index("]")], text[text.index("]") + 1:]
    else:
        host, colon, port = text.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and rest[1:].isdigit()):  # 127.0.0.1:80.evil.example is not a port
        return False
    return host in ("localhost", bound.lower()) or is_loopback(host)


class _Guard:
    """Outermost ASGI layer: bearer token (or, without one, the Host and Origin of the request), access log, and a
    last line of defence for exceptions."""

    def __init__(self, app, api_key: str | None, check_host: bool = False, bound: str = "127.0.0.1"):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.check_host, self.bound = check_host, bound  # without a key: Host and Origin must be this machine

    def _authorised(self, scope) -> bool:
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
        scheme, _, token = header.partition(b" ")
        # compare_digest takes time independent of where the strings differ
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def _cross_site(self, scope) -> APIError | None:
        """Without a key, only requests addressed to this server's loopback address, from no web page or from a
        page served by this same address, are answered."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").lower()
        if not _names_loopback(host, self.bound):
            return APIError(403, f"Host {_escape(host)[:80]!r} does not name this server: without --api-key-env it "
                            "answers only requests to its loopback address (e.g. 127.0.0.1:PORT), so that a web page "
                            "cannot reach it through a DNS name", code="forbidden_host")
        origin = headers.get(b"origin")
        scheme, sep, authority = (origin or b"").partition(b"://")
        if origin is not None and not (sep and scheme.lower() in (b"http", b"https")
                                       and _names_loopback(authority, self.bound)):
            return APIError(403, f"Origin {_escape(origin)[:80]!r} is another site: without --api-key-env this "
                            "server does not answer requests made by web pages", code="forbidden_origin")
        return None

    async def _refuse(self, send, exc: APIError, extra: list | None = None) -> None:
        body = _error_body(exc.status, exc.message, exc.param, exc.code)
        await send({"type": "http.response.start", "status": exc.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [None]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refused = self._cross_site(scope) if self.check_host else None
            if refused is not None:
                await self._refuse(send_and_note, refused)
            elif self.api_key is not None and scope["path"] != "/health" and not self._authorised(scope):
                await self._refuse(send_and_note, APIError(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as exc:  # noqa: BLE001 - one line in the log, a 500 in OpenAI's shape
            log.error("%s %s: %s: %s", _escape(scope["method"]), _escape(scope.get("raw_path") or b""),
                      type(exc).__name__, _escape(str(exc))[:300])
            if status[0] is None:
                try:
                    await self._refuse(send_and_note, APIError(500, "internal error"))
                except Exception:  # noqa: BLE001 - the client is gone
                    pass
        finally:
            client = scope.get("client") or ("-", 0)
            target = scope.get("raw_path") or b""
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            log.info('%s:%s "%s %s" %s %.0fms', client[0], client[1], _escape(scope["method"]), _escape(target),
                     status[0] or "-", 1000 * (time.monotonic() - start))


class _Connections:
    """The open connections, per client address, for the caps on them (in the event loop's thread only).

    Admission counts requests (Engine.submit), not sockets: a connection that has no request in progress (idle
    keep-alive, or a head still arriving) holds nothing but a socket, so when a cap is reached the connection idle
    longest, among the new client's own address first, is closed to make room. A connection idle for less than
    `grace` seconds is not taken (its head may be on the way); when none can be, the new one is refused (503,
    Retry-After). So idle sockets cannot lock anyone out, and one address cannot take every slot."""

    def __init__(self, total: int, per_client: int, grace: float):
        self.total, self.per_client, self.grace = total, per_client, grace
        self.open: dict = {}  # protocol -> client address, in connection order

    def admit(self, conn) -> bool:
        address = conn.client[0] if conn.client else "-"
        for crowd, cap in ((lambda: [c for c, a in self.open.items() if a == address], self.per_client),
                           (lambda: list(self.open), self.total)):
            if len(crowd()) >= cap:
                before = time.monotonic() - self.grace
                idle = [c for c in crowd() if c.idle_since is not None and c.idle_since <= before]
                if not idle:
                    return False
                min(idle, key=lambda c: c.idle_since).drop()
        self.open[conn] = address
        return True

    def forget(self, conn) -> None:
        self.open.pop(conn, None)


def _protocol(opts: ServeOptions):
    """uvicorn's h11 protocol with what it lacks here: caps on connections (in all and per client address, see
    _Connections), a deadline for each request head (`--header-timeout`: uvicorn only times out idle keep-alive
    connections, so a client sending half its headers would hold its connection forever; bodies are timed in
    `_read_body`), and OpenAI-shaped errors for requests that are not even HTTP."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    seconds = min(opts.header_timeout, opts.timeout)
    connections = _Connections(opts.max_connections, opts.max_connections_per_client, grace=min(0.5, seconds / 2))

    class GuardedH11(H11Protocol):
        _head_timer = None
        idle_since: float | None = None  # when it last had no request in progress; None while it has one

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            if self.cycle is None or self.cycle.response_complete:  # (a pipelined request may have started)
                self.idle_since = time.monotonic()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.idle_since is not None:
                self.drop()

        def drop(self) -> None:
            """Close a connection with no request in progress (a timeout, or room for another)."""
            if not self.transport.is_closing():
                self.transport.close()
            connections.forget(self)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if not connections.admit(self):
                body = _error_body(503, "too many connections, all of them busy; retry later", code="overloaded")
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1"
                                b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                transport.close()
                return
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self.idle_since = None  # a request is in progress: never dropped to make room

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection gets the same deadline

        def send_400_response(self, msg: str) -> None:  # not HTTP at all: still an OpenAI-shaped answer
            body = _error_body(400, f"invalid HTTP request: {msg}", code="invalid_request")
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            connections.forget(self)
            super().connection_lost(exc)

    return GuardedH11


# --------------------------------------------------------------------------- running


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_options(opts: ServeOptions) -> str | None:
    """Refuse unsafe or impossible settings before loading anything; return the API key (or None)."""
    for flag, value, low in (("--max-body-bytes", opts.max_body_bytes, 1), ("--max-tokens", opts.max_tokens, 1),
                             ("--concurrency", opts.concurrency, 1), ("--queue", opts.queue, 0),
                             ("--max-prompt-tokens", opts.max_prompt_tokens, 1),
                             ("--max-connections", opts.max_connections, 1),
                             ("--max-connections-per-client", opts.max_connections_per_client, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--timeout", opts.timeout), ("--header-timeout", opts.header_timeout)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    api_key = None
    if opts.api_key_env:
        from feedback.judges.http import read_api_key

        api_key = read_api_key(opts.api_key_env, f"--api-key-env {opts.api_key_env}")
    if api_key is None and not is_loopback(opts.host):
        raise UsageError(f"--host {opts.host} is reachable from other machines: set a token in an environment "
                         "variable and pass its name with --api-key-env (clients send 'Authorization: Bearer "
                         "<token>'), or bind to 127.0.0.1")
    return api_key


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for name in ("rlhf.serve", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO if name == "rlhf.serve" else logging.WARNING)


def serve_judge(ref: str, opts: ServeOptions) -> int:
    """`rlhf serve judge --model REF`: tiny, smollm2-135m-instruct, a saved model directory or a hub id."""
    api_key = _check_options(opts)  # before loading: a refused start should be quick
    path, name = judge_model(ref)
    return serve(path, name, opts, api_key)


def serve_policy(ref: str, opts: ServeOptions) -> int:
    """`rlhf serve policy RUN_DIR/STAGE`: a policy artifact, or its model/ directory."""
    api_key = _check_options(opts)
    path, name = policy_model(ref)
    return serve(path, name, opts, api_key)


def serve(model_path: str, name: str, opts: ServeOptions, api_key: str | None) -> int:
    """Load the model, bind, print `serving NAME at http://HOST:PORT/v1 ...` and serve until Ctrl-C."""
    import uvicorn

    _configure_logging()
    engine = Engine(model_path, opts.served_model_name or name, opts)
    sock = _bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    app = build_app(engine, opts, api_key)
    # No limit_concurrency: uvicorn counts open connections there, so idle sockets locked everyone out with a
    # plain-text 503; requests are admitted by Engine.submit and connections capped by _protocol instead.
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                            http=_protocol(opts), timeout_keep_alive=min(opts.header_timeout, opts.timeout),
                            timeout_graceful_shutdown=5, limit_concurrency=None)
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            shown = f"[{host}]" if ":" in host else host
            print(f"serving {engine.name} at http://{shown}:{port}/v1 (chat completions; concurrency "
                  f"{opts.concurrency}, queue {opts.queue}, max_tokens {opts.max_tokens}, max prompt tokens "
                  f"{engine.max_prompt_tokens}, auth {'on' if api_key else 'off'}, connections "
                  f"{opts.max_connections} ({opts.max_connections_per_client} per client)); Ctrl-C stops", flush=True)
        await task

    try:
        asyncio.run(run())
    finally:
        engine.close()
        sock.close()
    return 0


def judge_model(ref: str) -> tuple[str, str]:
    """A model reference -> (resolved path, the name shown to clients: never a local path)."""
    from pipeline.models import BUILTIN, resolve

    path = resolve(ref)
    if ref in BUILTIN or not Path(path).exists():  # a built-in name or a hub id
        return path, ref
    return path, Path(path).name


def policy_model(ref: str) -> tuple[str, str]:
    """A policy artifact (RUN_DIR/STAGE) or its model/ directory -> (model path, the stage's name)."""
    from pipeline.artifacts import MANIFEST, load_artifact

    p = Path(ref).expanduser()
    if (p / MANIFEST).exists():
        art = load_artifact(p, "policy", role="serve policy")
        return str(art.output("model").resolve()), p.resolve().name
    if (p.parent / MANIFEST).exists():
        art = load_artifact(p.parent, "policy", role="serve policy")
        if art.output("model").resolve() == p.resolve():
            return str(p.resolve()), p.resolve().parent.name
    raise UsageError(f"{ref}: not a policy artifact (a RUN_DIR/STAGE directory with {MANIFEST}) or its model/ "
                     "directory; `rlhf serve judge --model DIR` serves any saved model")
