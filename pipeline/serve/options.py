"""The settings of one server (`ServeOptions`, one field per `rlhf serve` option) and the checks they pass before
anything is loaded: limits in range, and a bearer token (read from the environment) whenever the address is
reachable from other machines.

Cheap to import on purpose (no FastAPI, no torch): `rlhf` builds its `serve` options from these fields' defaults.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from feedback.judges.http import read_api_key
from rlhf.errors import UsageError

MIB = 1024 * 1024


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
    monitor: str | None = None  # the traffic log (SQLite file) every answered completion is recorded in
    monitor_max_rows: int | None = None  # keep at most this many completions there (the oldest are deleted)

    @classmethod
    def from_args(cls, args) -> "ServeOptions":
        """From the parsed `rlhf serve ...` arguments (one attribute per field)."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(opts: ServeOptions) -> str | None:
    """Refuse unsafe or impossible settings before loading anything; return the API key (or None)."""
    for flag, value, low in (("--max-body-bytes", opts.max_body_bytes, 1), ("--max-tokens", opts.max_tokens, 1),
                             ("--concurrency", opts.concurrency, 1), ("--queue", opts.queue, 0),
                             ("--max-prompt-tokens", opts.max_prompt_tokens, 1),
                             ("--max-connections", opts.max_connections, 1),
                             ("--max-connections-per-client", opts.max_connections_per_client, 1),
                             ("--monitor-max-rows", opts.monitor_max_rows, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if opts.monitor_max_rows is not None and opts.monitor is None:
        raise UsageError("--monitor-max-rows bounds the traffic log: give it with --monitor DB")
    for flag, value in (("--timeout", opts.timeout), ("--header-timeout", opts.header_timeout)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    api_key = read_api_key(opts.api_key_env, f"--api-key-env {opts.api_key_env}") if opts.api_key_env else None
    if api_key is None and not is_loopback(opts.host):
        raise UsageError(f"--host {opts.host} is reachable from other machines: set a token in an environment "
                         "variable and pass its name with --api-key-env (clients send 'Authorization: Bearer "
                         "<token>'), or bind to 127.0.0.1")
    return api_key
