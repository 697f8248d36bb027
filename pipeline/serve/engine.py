"""The model behind the server: `Engine` (a causal LM in eval mode, admission control, a bounded pool of
generation threads) and `Job` (one admitted request, travelling from the event loop to a worker and back).

- At most `--concurrency + --queue` requests are admitted (tokenizing, generating or waiting for a worker); the
  rest get 503 with Retry-After. A prompt is tokenized in its worker, with a tokenizer of the worker's own.
- Generation runs in a thread pool of `--concurrency` workers (torch releases the GIL), so a short request never
  waits behind a long one. A sampling request draws its tokens with a random generator of its own
  (`_TokenChooser`, seeded by its `seed`), so no request waits for another's. Each request builds a fresh
  `GenerationConfig`, and the model's own generation_config.json is replaced by a neutral one at load, because
  transformers fills every field a request leaves unset from the model's file (a repetition_penalty there would
  silently change what is sampled).
- Tokens reach the event loop as they are sampled (`_JobStreamer` -> `Job.emit`); a client that leaves sets
  `Job.cancelled`, and generation stops at the next token.

A finished Job holds what the traffic log (`--monitor`, traffic.py) records: prompt ids, tokens, text and finish
reason.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import (GenerationConfig, LogitsProcessorList, StoppingCriteriaList, TemperatureLogitsWarper,
                          TopPLogitsWarper)
from transformers.utils import logging as hf_logging

from pipeline.generation import chat_ids, generation_config, prompt_learning
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.serve.options import ServeOptions
from pipeline.serve.schema import APIError, Message, escape

log = logging.getLogger("rlhf.serve")

NEG_INF_LOGPROB = -9999.0  # JSON has no -Infinity: tokens that top_p removed get this (as vLLM does)


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
        extra = {"use_cache": False} if prompt_learning(self.model) else {}
        return generation_config(self.worker_tok, job.max_new_tokens, 0.0, **extra)

    def _run(self, job: Job) -> None:
        """In a worker thread: tokenize, then generate, streaming each token to the job as it is sampled."""
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
            log.error("generation failed: %s: %s", type(exc).__name__, escape(str(exc))[:300])
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
    def item(tid: int, lp: float) -> dict:
        text, raw = engine.token_bytes(tid)
        return {"token": text, "logprob": max(lp, NEG_INF_LOGPROB), "bytes": raw}

    top = []
    if k:
        values, indices = torch.topk(row, k)
        top = [item(int(i), float(v)) for v, i in zip(values, indices)]
    return {**item(token, float(row[token])), "top_logprobs": top}

