"""What stands between the network and the routes (pipeline/serve/app.py):

- `protocol`: uvicorn's h11 protocol with caps on open connections, in all (`--max-connections`) and per client
  address (`--max-connections-per-client`; see `Connections`), a deadline for each request head
  (`--header-timeout`), and OpenAI-shaped errors for requests that are not even HTTP. At a cap the connection idle
  longest (no request in progress) is closed to make room, so idle or half-sent sockets never lock anyone out.
- `Guard`, the outermost ASGI layer: the bearer token, or without one the Host and Origin headers (only requests
  addressed to the loopback address, from no other site); the access log (one line a request, control characters
  escaped, no headers); and a last line of defence that turns any escaped exception into a one-line log and a 500.
"""

from __future__ import annotations

import hmac
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.serve.options import ServeOptions, is_loopback
from pipeline.serve.schema import APIError, error_body, escape

log = logging.getLogger("rlhf.serve")


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


class Guard:
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
            return APIError(403, f"Host {escape(host)[:80]!r} does not name this server: without --api-key-env it "
                            "answers only requests to its loopback address (e.g. 127.0.0.1:PORT), so that a web page "
                            "cannot reach it through a DNS name", code="forbidden_host")
        origin = headers.get(b"origin")
        scheme, sep, authority = (origin or b"").partition(b"://")
        if origin is not None and not (sep and scheme.lower() in (b"http", b"https")
                                       and _names_loopback(authority, self.bound)):
            return APIError(403, f"Origin {escape(origin)[:80]!r} is another site: without --api-key-env this "
                            "server does not answer requests made by web pages", code="forbidden_origin")
        return None

    async def _refuse(self, send, exc: APIError, extra: list | None = None) -> None:
        body = error_body(exc.status, exc.message, exc.param, exc.code)
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
            log.error("%s %s: %s: %s", escape(scope["method"]), escape(scope.get("raw_path") or b""),
                      type(exc).__name__, escape(str(exc))[:300])
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
            log.info('%s:%s "%s %s" %s %.0fms', client[0], client[1], escape(scope["method"]), escape(target),
                     status[0] or "-", 1000 * (time.monotonic() - start))


class Connections:
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


def protocol(opts: ServeOptions):
    """uvicorn's h11 protocol with what it lacks here: caps on connections (in all and per client address, see
    Connections), a deadline for each request head (`--header-timeout`: uvicorn only times out idle keep-alive
    connections, so a client sending half its headers would hold its connection forever; bodies are timed in
    app.py's `_read_body`), and OpenAI-shaped errors for requests that are not even HTTP."""
    seconds = min(opts.header_timeout, opts.timeout)
    connections = Connections(opts.max_connections, opts.max_connections_per_client, grace=min(0.5, seconds / 2))

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
                body = error_body(503, "too many connections, all of them busy; retry later", code="overloaded")
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
            body = error_body(400, f"invalid HTTP request: {msg}", code="invalid_request")
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            connections.forget(self)
            super().connection_lost(exc)

    return GuardedH11
