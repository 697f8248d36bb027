"""The HTTP application: FastAPI routes (`POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, each also
without /v1), inside the Guard layer (pipeline/serve/guard.py). `build_app` is the one place routes are added.

- A request is read by hand (`_read_body`): it must be `application/json`, Content-Length is checked before
  reading, a chunked body is counted while it arrives, and the whole body must arrive within `--timeout`, so a
  slow or oversized client costs a bounded amount of memory and time. The body is then parsed and validated by
  pydantic (schema.py); every failure is an OpenAI-shaped error, never FastAPI's default shape, plain text, a
  traceback or a dropped connection.
- A prompt with more bytes than any prompt of `--max-prompt-tokens` tokens can have is refused here, before it is
  tokenized; the others become a Job for the engine (engine.py), answered as one JSON body or as server-sent
  events (`_sse`), and cancelled when the client hangs up.

With `--monitor DB` (a Recorder, traffic.py), each completion is committed to the traffic log before its answer is
sent: the JSON body, or a stream's last chunk and [DONE]. A request whose client hangs up before that (a 499, or a
stream left part way) is not recorded: its client never got an answer to rate. `POST /v1/feedback` (and
`/feedback`) takes a thumb or a preference on a recorded answer; without --monitor it answers 404, naming the flag.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from pipeline.serve.engine import Engine, Job
from pipeline.serve.guard import Guard
from pipeline.serve.options import ServeOptions
from pipeline.serve.schema import (APIError, error_body, escape, parse_chat_request, parse_feedback_request,
                                   validation_error)
from pipeline.serve.traffic import Recorder

log = logging.getLogger("rlhf.serve")


def _error(exc: APIError) -> Response:
    return Response(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)


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


def _require_json(request) -> None:
    """A chat request is JSON. A web page can send a "simple" cross-site POST (text/plain, a form) without asking
    the server first; it cannot send application/json without a CORS preflight, which this server never grants."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {escape(media or 'none')[:60]!r}",
                       code="unsupported_media_type")


def build_app(engine: Engine, opts: ServeOptions, api_key: str | None, recorder: Recorder | None = None):
    """The ASGI application: FastAPI routes inside the Guard layer (which, when there is no key, checks that the
    Host and Origin headers name the bound loopback address). With a recorder, answers go to the traffic log."""
    app = FastAPI(title="rlhf serve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        # anything unforeseen: an OpenAI-shaped 500 instead of Starlette's plain text; Starlette then raises the
        # exception on, and Guard writes its one log line
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
    async def request_validation_error(request, exc: RequestValidationError):
        return _error(validation_error(exc))

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": started, "owned_by": "rlhf"}

    started = int(time.time())

    async def health():
        return {"status": "ok"}

    async def models():
        return {"object": "list", "data": [model_card()]}

    async def chat_completions(request: Request):
        received, started = time.time(), time.monotonic()  # the traffic log's `created` and latency start here
        _require_json(request)  # before the body is read: a form or text/plain post from a web page gets 415
        try:
            req = parse_chat_request(await _read_body(request, opts.max_body_bytes, opts.timeout))
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

        async def record() -> None:  # committed before the client has the whole answer (see the docstring)
            if recorder is None:
                return
            try:
                await recorder.completion(cid, job, req, received, started)
            except Exception as exc:  # noqa: BLE001 - an answer the log lacks is not given (a 500 instead)
                log.error("traffic log %s: %s: %s", recorder.log.path, type(exc).__name__, escape(str(exc))[:300])
                raise APIError(500, "could not record the answer in the traffic log", code="monitor_failed") from None

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _sse(job, cid, created, engine.name, usage, include_usage, record)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(job.cancel))
        await record()
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": engine.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                         "logprobs": {"content": job.logprobs} if req.logprobs else None,
                         "finish_reason": job.finish_reason}],
            "usage": usage(),
        })

    async def feedback(request: Request):
        if recorder is None:  # before the body is read: there is nothing to check it against
            raise APIError(404, "this server keeps no traffic log, so it takes no feedback: start it with "
                           "`rlhf serve policy RUN_DIR/STAGE --monitor DB`", code="monitor_off")
        _require_json(request)
        try:
            req = parse_feedback_request(await _read_body(request, opts.max_body_bytes, opts.timeout))
        except _ClientGone:
            return Response(status_code=499)
        seq = await recorder.feedback(req.id, req.rating, req.preferred_over, req.comment)
        return {"id": req.id, "object": "feedback", "recorded": True, "feedback_seq": seq}

    # every route is added here
    for prefix in ("/v1", ""):  # OpenAI clients use /v1; some tools call the bare paths
        app.add_api_route(prefix + "/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(prefix + "/feedback", feedback, methods=["POST"])
        app.add_api_route(prefix + "/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return Guard(app, api_key, check_host=api_key is None, bound=opts.host)


async def _sse(job: Job, cid: str, created: int, name: str, usage, include_usage: bool, record):
    """Server-sent events: a role chunk, one chunk per token, a finish_reason chunk, [DONE]. `record()` is awaited
    once the generation has ended, before the last chunks: a client that has [DONE] has an answer in the log."""

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
                try:
                    await record()
                except APIError as exc:  # not in the log: no finish_reason and no [DONE] either
                    yield f"data: {error_body(exc.status, exc.message, code=exc.code).decode()}\n\n"
                    return
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
                yield f"data: {error_body(500, event[1], code='generation_failed').decode()}\n\n"
                return
    finally:
        job.cancel()  # the client left early (or we are done): stop generating
