"""The server's side of the traffic log (`rlhf serve policy RUN_DIR/STAGE --monitor DB`): `Recorder` turns an
answered chat completion into a row of feedback/traffic.py's TrafficLog, and a feedback request into a feedback row.

Every write runs on one thread of its own (`_writer`), never on the event loop: a row is committed with
synchronous=FULL (an fsync), which would stall every other request for its duration. One thread also keeps the
writes in the order they were asked for, and `close` waits for the ones still queued, so a server stopped with
Ctrl-C loses none. app.py awaits each write before it answers, so a row exists for every answer a client got, even
if the server is killed the next moment.

What is recorded (and what never is) is written down in feedback/traffic.py and docs/serving.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from feedback.traffic import Completion, TrafficLog, UnknownCompletion
from pipeline.serve.schema import APIError, escape
from rlhf.errors import InvalidInput, UsageError


def open_log(path: str, max_rows: int | None) -> TrafficLog:
    """The traffic log at `path` (created if missing), or a UsageError naming it."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"--monitor {path}: is a directory; give a file name (e.g. {p / 'traffic.db'})")
    if not p.parent.is_dir():
        raise UsageError(f"--monitor {path}: the directory {p.parent} does not exist")
    try:  # users' prompts and answers: a new log is its owner's alone (SQLite gives -wal and -shm the same mode)
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"--monitor {path}: cannot create it ({exc.strerror})") from None
    return TrafficLog(p, max_rows=max_rows)


class Recorder:
    """Writes one served policy's completions and feedback to its traffic log, off the event loop."""

    def __init__(self, log: TrafficLog, model: str, stage: str):
        self.log, self.model, self.stage = log, model, stage
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="traffic-log")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def completion(self, cid: str, job, req, received: float, started: float) -> None:
        """Commit the answer `cid` of a finished Job (engine.py) to the ChatRequest `req` (schema.py). `received`
        is the wall-clock time the request arrived (the row's `created`), `started` the same moment on the
        monotonic clock (for the latency: request received to answer complete)."""
        row = Completion(
            id=cid, model=self.model, stage=self.stage, created=received,
            messages=[{"role": m.role, "content": m.text()} for m in req.messages],  # the text the model read
            response=job.text, finish_reason=job.finish_reason,
            prompt_tokens=len(job.prompt_ids), completion_tokens=len(job.tokens),
            latency_ms=round(1000 * (time.monotonic() - started), 3),
            sampling={"temperature": req.temperature, "top_p": req.top_p, "max_tokens": job.max_tokens,
                      "seed": req.seed})
        await self._run(self.log.record, row)

    async def feedback(self, id: str, rating: str | None, preferred_over: str | None, comment: str | None) -> int:
        """Commit one feedback row; its seq. An APIError for an id not in the log (404) or a preference between
        answers to different messages (400)."""
        return await self._run(self._feedback, id, rating, preferred_over, comment)

    def _feedback(self, id: str, rating: str | None, preferred_over: str | None, comment: str | None) -> int:
        """In the writer thread (the one that uses the log's connection), so the look-up below reads no half-written
        row: the feedback row's seq, or the APIError to answer."""
        try:
            return self.log.add_feedback(id, rating, preferred_over, comment)
        except UnknownCompletion as exc:
            field = exc.param
            unknown = id if field == "id" else preferred_over
            raise APIError(404, f"no completion with id {escape(unknown)[:200]!r} in the traffic log (not answered by "
                           "this server with --monitor, or deleted by --monitor-max-rows)", param=field,
                           code="unknown_completion") from None
        except InvalidInput as exc:  # a preference between answers to different messages
            raise APIError(400, escape(str(exc))[:300], param="preferred_over", code="invalid_feedback") from None

    def close(self) -> None:
        self._writer.shutdown(wait=True)  # the writes already asked for are committed first
        self.log.close()
