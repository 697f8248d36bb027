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
- A request is read by hand (`_read_body`): Content-Length is checked before reading, a chunked
  body is counted while it arrives, and the whole body must arrive within `--timeout`, so a slow
  or oversized client costs a bounded amount of memory and time. Bodies are then parsed and
  validated by pydantic; every failure is an OpenAI-shaped error (`_error`), never FastAPI's
  default shape, a traceback or a dropped connection.
- Generation runs in a thread pool of `--concurrency` workers (torch releases the GIL), so a short
  request never waits behind a long one; at most `--concurrency + --queue` requests are admitted,
  the rest get 503 with Retry-After. Each request builds a fresh `GenerationConfig`, and the
  model's own generation_config.json is replaced by a neutral one at load, because transformers
  fills every field a request leaves unset from the model's file (a repetition_penalty there
  would silently change what is sampled).
- `_Guard` (outermost ASGI layer) checks the bearer token, writes the access log (control
  characters escaped, no headers) and turns any escaped exception into a one-line log and a 500.
- `_header_timeout_protocol` adds the one timeout uvicorn lacks: a client that sends half its
  request headers and stalls is dropped after `--timeout` seconds.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
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
    served_model_name: str | None = None

    @classmethod
    def from_args(cls, args) -> "ServeOptions":
        """From the parsed `rlhf serve ...` arguments (one attribute per field)."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- request schema


class _Strict(BaseModel):
    # Unknown fields are ignored (OpenAI clients send many); known ones are strict: "5" is not 5,
    # true is not 1, NaN is not a temperature.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

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
    first = errors[0]
    loc = ".".join(str(x) for x in first["loc"] if x != "body")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(422, f"{loc or 'body'}: {first['msg']}{more}", param=loc or None, code=first["type"])


# --------------------------------------------------------------------------- the model


class _RNGGate:
    """Who may use torch's process-wide RNG: greedy requests draw nothing and pass freely; seeded
    sampling needs the RNG to itself (manual_seed, then every draw), so it is exclusive; unseeded
    sampling shares. A waiting seeded request stops new unseeded ones from jumping ahead of it.
    Cost: an unseeded sampling request may wait behind a long seeded one (documented in the README)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._sharing = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def hold(self, sampling: bool, seed: int | None):
        if not sampling:
            yield
            return
        exclusive = seed is not None
        with self._cond:
            if exclusive:
                self._waiting += 1
                self._cond.wait_for(lambda: not self._exclusive and self._sharing == 0)
                self._waiting -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and self._waiting == 0)
                self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._sharing -= 1
                self._cond.notify_all()


class Job:
    """One admitted request: its inputs, the tokens produced so far, and a channel to the event loop."""

    def __init__(self, loop, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int | None, logprobs: bool, top_logprobs: int, stream: bool):
        self.loop, self.prompt_ids, self.max_new_tokens = loop, prompt_ids, max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.want_logprobs, self.top_logprobs, self.stream = logprobs, top_logprobs, stream
        self.events: asyncio.Queue = asyncio.Queue()  # ("delta", text, logprob entry | None) ... ("end",)
        self.cancelled = threading.Event()  # set when the client goes away: generation stops at the next token
        self.tokens: list[int] = []
        self.logprobs: list[dict] = []
        self.text = ""
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, *event) -> None:
        if not self.stream:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            self.cancelled.set()


class Engine:
    """A causal LM in eval mode, a bounded pool of generation threads, and admission control."""

    def __init__(self, path: str, name: str, opts: ServeOptions):
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
        self.tok = load_tokenizer(path)
        model = load_causal_lm(path, "fp32")  # an adapter directory loads merged into its base
        model.eval().requires_grad_(False)
        # generate() fills every field a request's GenerationConfig leaves unset from the model's own
        # generation_config.json; a neutral one here means only the request decides what is sampled.
        model.generation_config = GenerationConfig(eos_token_id=self.tok.eos_token_id,
                                                   pad_token_id=self.tok.pad_token_id)
        self.model = model
        limits = [getattr(model.config, "max_position_embeddings", None), self.tok.model_max_length]
        self.context = min([x for x in limits if isinstance(x, int) and 0 < x < 10**7] or [10**7])
        self.max_prompt_tokens = min(opts.max_prompt_tokens or self.context - 1, self.context - 1)
        self.opts = opts
        self.rng = _RNGGate()
        self.pool = ThreadPoolExecutor(opts.concurrency, thread_name_prefix="generate")
        self._lock = threading.Lock()
        self._admitted: set[Job] = set()
        self._token_text: dict[int, tuple[str, list[int]]] = {}
        # A fast tokenizer may re-borrow its Rust state mutably (e.g. to switch truncation off);
        # used from several threads at once that raises "Already borrowed". Held for microseconds.
        self.tok_lock = threading.Lock()
        backend = getattr(self.tok, "backend_tokenizer", None)
        self._byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    # -- admission: at most concurrency + queue requests are generating or waiting for a worker
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

    def encode(self, messages: list[Message]) -> list[int]:
        from pipeline.generation import chat_ids

        with self.tok_lock:
            return chat_ids(self.tok, [{"role": m.role, "content": m.text()} for m in messages])

    def decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> tuple[str, list[int]]:
        """A token as OpenAI's logprobs show it: its text and its exact UTF-8 bytes. A byte-level BPE
        token may hold part of a character, which decoding alone would turn into U+FFFD."""
        cached = self._token_text.get(token_id)
        if cached is None:
            with self.tok_lock:
                cached = self._describe_token(token_id)
            self._token_text[token_id] = cached
        return cached

    def _describe_token(self, token_id: int) -> tuple[str, list[int]]:
        added = self.tok.added_tokens_decoder.get(token_id)
        piece = self.tok.convert_ids_to_tokens(token_id)
        if added is None and self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
        else:
            raw = (added.content if added is not None else self.tok.decode([token_id])).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)

    def generation_config(self, job: Job):
        """The request, and only the request, as a complete GenerationConfig (pipeline.generation)."""
        from pipeline.generation import generation_config, prompt_learning

        # a prompt-tuned policy samples without a KV cache, which loses its prompt (pipeline/generation.py)
        extra = {"use_cache": False} if prompt_learning(self.model) else {}
        return generation_config(self.tok, job.max_new_tokens, job.temperature, job.top_p, **extra)

    def _run(self, job: Job) -> None:
        """In a worker thread: generate, streaming each token to the job as it is sampled."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if job.cancelled.is_set():  # the client left while the request was queued
            job.emit("end")
            return
        try:
            recorder = _LogprobRecorder(job) if job.want_logprobs else None
            with self.rng.hold(job.temperature > 0, job.seed), torch.inference_mode():
                if job.seed is not None and job.temperature > 0:
                    torch.manual_seed(job.seed)
                ids = torch.tensor([job.prompt_ids], dtype=torch.long)
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    generation_config=self.generation_config(job),
                                    logits_processor=LogitsProcessorList([recorder] if recorder else []),
                                    stopping_criteria=StoppingCriteriaList([_StopWhenCancelled(job)]),
                                    streamer=_JobStreamer(self, job, recorder))
            job.text = self.decode(job.tokens)
            eos = self.tok.eos_token_id
            job.finish_reason = "stop" if job.tokens and job.tokens[-1] == eos else "length"
            job.emit("end")
        except Exception as exc:  # noqa: BLE001 - reported to the client and logged in one line
            log.error("generation failed: %s: %s", type(exc).__name__, exc)
            job.finish_reason = "error"
            job.emit("error", f"generation failed: {type(exc).__name__}")
            raise


class _LogprobRecorder:
    """A logits processor that keeps each step's log-probabilities of the *sampling* distribution.

    generate() places custom processors before its temperature/top-p warpers, so the recorder
    applies the same warpers to its copy (top_k is 0, i.e. off, in every request we build)."""

    def __init__(self, job: Job):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        warpers = []
        if job.temperature > 0 and job.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(job.temperature))
        if job.temperature > 0 and job.top_p < 1.0:
            warpers.append(TopPLogitsWarper(job.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.steps: list = []  # one log-softmax row per step, consumed by the streamer

    def __call__(self, input_ids, scores):
        import torch

        self.steps.append(torch.log_softmax(self.warpers(input_ids, scores.float()), dim=-1)[0])
        return scores


class _StopWhenCancelled:
    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.job.cancelled.is_set(), dtype=torch.bool)


class _JobStreamer:
    """generate()'s streamer: the first put() is the prompt, then one token per step."""

    def __init__(self, engine: Engine, job: Job, recorder: _LogprobRecorder | None):
        self.engine, self.job, self.recorder = engine, job, recorder
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
        if self.recorder is not None:
            row = self.recorder.steps.pop(0)
            entry = _logprob_entry(engine, token, row, job.top_logprobs)
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


def build_app(engine: Engine, opts: ServeOptions, api_key: str | None):
    """The ASGI application: FastAPI routes inside the `_Guard` layer."""
    app = FastAPI(title="rlhf serve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

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
        prompt_ids = await run_in_threadpool(engine.encode, req.messages)
        if len(prompt_ids) > engine.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this server accepts at most "
                           f"{engine.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        wanted = req.max_tokens or req.max_completion_tokens or opts.max_tokens
        max_new = min(wanted, opts.max_tokens, engine.context - len(prompt_ids))
        job = Job(asyncio.get_running_loop(), prompt_ids, max_new, req.temperature, req.top_p, req.seed,
                  req.logprobs, req.top_logprobs or 0, req.stream)
        future = engine.submit(job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": len(prompt_ids), "completion_tokens": len(job.tokens),  # noqa: E731
                         "total_tokens": len(prompt_ids) + len(job.tokens)}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _sse(job, cid, created, engine.name, usage, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(job.cancel))

        # Wait for the generation, but stop it if the client hangs up first.
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        done = asyncio.wrap_future(future)
        try:
            await asyncio.wait({watcher, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not done.done():
            job.cancel()
            return Response(status_code=499)
        if done.exception() is not None:
            raise APIError(500, f"generation failed: {type(done.exception()).__name__}", code="generation_failed")
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
    return _Guard(app, api_key)


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


class _Guard:
    """Outermost ASGI layer: bearer token, access log, and a last line of defence for exceptions."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    def _authorised(self, scope) -> bool:
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
        scheme, _, token = header.partition(b" ")
        # compare_digest takes time independent of where the strings differ
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [None]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"] != "/health" and not self._authorised(scope):
                body = _error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
                await send_and_note({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as exc:  # noqa: BLE001 - one line in the log, a 500 in OpenAI's shape
            log.error("%s %s: %s: %s", _escape(scope["method"]), _escape(scope.get("raw_path") or b""),
                      type(exc).__name__, _escape(str(exc))[:300])
            if status[0] is None:
                try:
                    await send_and_note({"type": "http.response.start", "status": 500,
                                         "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": _error_body(500, "internal error")})
                except Exception:  # noqa: BLE001 - the client is gone
                    pass
        finally:
            client = scope.get("client") or ("-", 0)
            target = scope.get("raw_path") or b""
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            log.info('%s:%s "%s %s" %s %.0fms', client[0], client[1], _escape(scope["method"]), _escape(target),
                     status[0] or "-", 1000 * (time.monotonic() - start))


def _header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol plus a deadline for the request head. uvicorn only times out idle
    keep-alive connections, so a client that sends half its headers and stalls would hold its
    connection forever; here it is closed after `seconds`. (Bodies are timed in `_read_body`.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_timeout(self) -> None:
            self._head_timer = None
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection gets the same deadline

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11


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
                             ("--max-prompt-tokens", opts.max_prompt_tokens, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if opts.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {opts.timeout}")
    api_key = None
    if opts.api_key_env:
        api_key = os.environ.get(opts.api_key_env, "")
        if not api_key:
            raise UsageError(f"--api-key-env {opts.api_key_env}: that environment variable is not set or empty")
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
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                            http=_header_timeout_protocol(opts.timeout), timeout_keep_alive=min(5, opts.timeout),
                            timeout_graceful_shutdown=5,
                            # every open connection costs at most ~64 KiB of buffered body in uvicorn
                            limit_concurrency=256 + opts.concurrency + opts.queue)
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            shown = f"[{host}]" if ":" in host else host
            print(f"serving {engine.name} at http://{shown}:{port}/v1 (chat completions; concurrency "
                  f"{opts.concurrency}, queue {opts.queue}, max_tokens {opts.max_tokens}, max prompt tokens "
                  f"{engine.max_prompt_tokens}, auth {'on' if api_key else 'off'}); Ctrl-C stops", flush=True)
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
