"""Starting a server: which model (`judge_model`: a model reference; `policy_model`: a policy artifact), the
checks that run before anything loads (options.check_options: limits, and the API key whenever the address is
reachable from other machines), the listening socket, the log on stderr, and uvicorn until Ctrl-C.

    rlhf serve judge --model smollm2-135m-instruct            # serve_judge
    rlhf serve policy runs/quickstart/sft --port 8001         # serve_policy

With `--monitor DB` the traffic log is opened here before the model loads (a bad path fails fast), handed to
build_app in a Recorder (traffic.py), and closed after the server stops, once every queued write is committed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from pathlib import Path

import uvicorn

from pipeline.artifacts import MANIFEST, load_artifact
from rlhf.errors import UsageError
from pipeline.models import BUILTIN, resolve
from pipeline.serve.app import build_app
from pipeline.serve.engine import Engine
from pipeline.serve.guard import protocol
from pipeline.serve.options import ServeOptions, check_options
from pipeline.serve.traffic import Recorder, open_log


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
    api_key = check_options(opts)  # before loading: a refused start should be quick
    path, name = judge_model(ref)
    return serve(path, name, opts, api_key)


def serve_policy(ref: str, opts: ServeOptions) -> int:
    """`rlhf serve policy RUN_DIR/STAGE`: a policy artifact, or its model/ directory."""
    api_key = check_options(opts)
    path, name = policy_model(ref)
    p = Path(ref).expanduser().resolve()
    return serve(path, name, opts, api_key, stage=str(p if (p / MANIFEST).exists() else p.parent))


def serve(model_path: str, name: str, opts: ServeOptions, api_key: str | None, stage: str | None = None) -> int:
    """Load the model, bind, print `serving NAME at http://HOST:PORT/v1 ...` and serve until Ctrl-C. `stage` (the
    policy's RUN_DIR/STAGE) is what the traffic log records as the served stage."""
    _configure_logging()
    traffic = open_log(opts.monitor, opts.monitor_max_rows) if opts.monitor else None  # before the slow load
    engine = Engine(model_path, opts.served_model_name or name, opts)
    recorder = Recorder(traffic, engine.name, stage or name) if traffic else None
    sock = _bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    app = build_app(engine, opts, api_key, recorder)
    # No limit_concurrency: uvicorn counts open connections there, so idle sockets locked everyone out with a
    # plain-text 503; requests are admitted by Engine.submit and connections capped by guard.protocol instead.
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                            http=protocol(opts), timeout_keep_alive=min(opts.header_timeout, opts.timeout),
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
                  f"{opts.max_connections} ({opts.max_connections_per_client} per client)"
                  f"{f', traffic log {opts.monitor}' if recorder else ''}); Ctrl-C stops", flush=True)
        await task

    try:
        asyncio.run(run())
    finally:
        engine.close()
        sock.close()
        if recorder:
            recorder.close()
    return 0


def judge_model(ref: str) -> tuple[str, str]:
    """A model reference -> (resolved path, the name shown to clients: never a local path)."""
    path = resolve(ref)
    if ref in BUILTIN or not Path(path).exists():  # a built-in name or a hub id
        return path, ref
    return path, Path(path).name


def policy_model(ref: str) -> tuple[str, str]:
    """A policy artifact (RUN_DIR/STAGE) or its model/ directory -> (model path, the stage's name)."""
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
