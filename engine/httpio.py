"""Plain HTTP/1.1 on asyncio, with h11 (a sans-I/O HTTP library): a server protocol for webhooks
and REST endpoints, and a one-shot client for JSON requests. Shared by ``engine sip`` (webhooks
in, accept/reject/refer/hangup out) and the local server's SIP stand-in (REST in, webhooks out).

Rules:
- A server connection takes one request, answers it and closes (``Connection: close``): no
  keep-alive to time out, so a socket shared with WebSockets (the local server) is handed back
  whole or not at all.
- A body over MAX_BODY_BYTES is refused with 413 before it is read; a request that h11 cannot
  parse gets 400. Nothing here logs a body or a header's value (they can hold keys).
- The handler is called with the raw body bytes as received (a webhook's signature covers them).
- Strangers cannot hold the server: a request must arrive whole within READ_TIMEOUT_S of its
  connection (else 408 and close), and past MAX_CONNECTIONS open connections a new one gets 503
  at once (idle sockets would otherwise take every file descriptor, and with them the REST calls
  and control sockets of the calls in progress).
"""
from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import h11

MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 10.0
#: a server connection's request must arrive whole within this (a slow sender is a 408)
READ_TIMEOUT_S = 10.0
#: open server connections at most; past it a new one gets 503 (a file descriptor each)
MAX_CONNECTIONS = 256


@dataclass
class HttpRequest:
    method: str
    target: str                                   #: path and query, as sent
    headers: dict[str, str]                       #: lower-case names; repeats joined with ", "
    body: bytes
    peer: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def json(self) -> Any:
        """The body as JSON (ValueError if it is not)."""
        return json.loads(self.body) if self.body else None


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: Any) -> "HttpResponse":
        return cls(status, json.dumps(value).encode(), {"content-type": "application/json"})

    def parsed(self) -> Any:
        return json.loads(self.body) if self.body else None


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def _headers(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in items:
        name, value = bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


class OpenConnections:
    """A server's open connections, counted (module rules)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0


class HttpProtocol(asyncio.Protocol):
    """One server connection (module rules). ``done`` resolves when the connection is closed."""

    def __init__(self, handler: Handler, read_timeout_s: float = READ_TIMEOUT_S, open_: OpenConnections | None = None) -> None:
        self.handler = handler
        self.read_timeout_s = read_timeout_s
        self.conns = open_ if open_ is not None else OpenConnections(MAX_CONNECTIONS)   #: the server's, counted
        self.counted = False
        self.timer: asyncio.TimerHandle | None = None
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.conns.count >= self.conns.limit:
            self._answer_now(HttpResponse(503, b"too many connections; try again\n"))
            return
        self.conns.count += 1
        self.counted = True
        self.timer = asyncio.get_running_loop().call_later(self.read_timeout_s, self._too_slow)

    def _too_slow(self) -> None:
        self.timer = None
        if self.task is None:
            self._answer_now(HttpResponse(408, b"the request did not arrive in time\n"))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.counted:
            self.counted = False
            self.conns.count -= 1
        if not self.done.done():
            self.done.set_result(None)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            return                    # one request a connection: anything after it is ignored
        try:
            self.conn.receive_data(data)
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    return
                if isinstance(event, h11.Request):
                    self.request = event
                    length = _headers(event.headers).get("content-length")
                    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                        self._answer_now(HttpResponse(413, b"request body too large\n"))
                        return
                elif isinstance(event, h11.Data):
                    self.body += event.data
                    if len(self.body) > MAX_BODY_BYTES:
                        self._answer_now(HttpResponse(413, b"request body too large\n"))
                        return
                elif isinstance(event, h11.EndOfMessage):
                    self._stop_timer()
                    self.task = asyncio.get_running_loop().create_task(self._run())
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self._close()
                    return
        except h11.RemoteProtocolError as exc:
            self._answer_now(HttpResponse(exc.error_status_hint or 400, b"bad HTTP request\n"))

    def eof_received(self) -> bool | None:
        return None

    async def _run(self) -> None:
        req = self.request
        assert req is not None and self.transport is not None
        peer = self.transport.get_extra_info("peername")
        request = HttpRequest(req.method.decode("ascii", "replace"), req.target.decode("latin-1"),
                              _headers(req.headers), bytes(self.body), f"{peer[0]}:{peer[1]}" if peer else "")
        try:
            response = await self.handler(request)
        except Exception:  # noqa: BLE001 - a handler's bug is a 500, never a dead connection
            import logging
            logging.getLogger("realtalk.http").exception("HTTP handler failed for %s %s", request.method,
                                                         request.path)
            response = HttpResponse(500, b"internal error\n")
        self._send(response)

    def _answer_now(self, response: HttpResponse) -> None:
        self.task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        self._send(response)

    def _send(self, response: HttpResponse) -> None:
        if self.transport is None or self.transport.is_closing():
            self._close()
            return
        headers = [("content-length", str(len(response.body))), ("connection", "close")]
        headers += [(k, v) for k, v in response.headers.items() if k.lower() not in ("content-length", "connection")]
        try:
            if self.conn.our_state is h11.SEND_RESPONSE or self.conn.our_state is h11.IDLE:
                out = self.conn.send(h11.Response(status_code=response.status, headers=headers))
                out += self.conn.send(h11.Data(data=response.body)) if response.body else b""
                out += self.conn.send(h11.EndOfMessage())
            else:
                out = b""
        except h11.LocalProtocolError:
            out = (f"HTTP/1.1 {response.status} x\r\ncontent-length: {len(response.body)}\r\nconnection: close\r\n\r\n"
                   .encode() + response.body)
        self.transport.write(out or b"")
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def serve_http(handler: Handler, host: str, port: int, *, sock: Any = None,
                     read_timeout_s: float = READ_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> asyncio.Server:
    """Listen for HTTP requests (``sock``: an already bound socket instead of host and port)."""
    loop = asyncio.get_running_loop()
    open_ = OpenConnections(max_connections)

    def protocol() -> HttpProtocol:
        return HttpProtocol(handler, read_timeout_s, open_)
    if sock is not None:
        return await loop.create_server(protocol, sock=sock)
    return await loop.create_server(protocol, host, port, reuse_address=True)


class HttpClientError(ConnectionError):
    """The request got no HTTP answer (refused, reset, timed out, not HTTP)."""


async def request(method: str, url: str, *, headers: Mapping[str, str] | None = None, body: bytes | None = None,
                  json_body: Any = None, timeout_s: float = REQUEST_TIMEOUT_S) -> HttpResponse:
    """One request on a fresh connection (http or https); the whole answer or :class:`HttpClientError`."""
    try:
        return await asyncio.wait_for(_request(method, url, headers or {}, body, json_body), timeout_s)
    except asyncio.TimeoutError:
        raise HttpClientError(f"{method} {_where(url)}: no answer within {timeout_s:g} s") from None
    except (OSError, h11.ProtocolError) as exc:
        raise HttpClientError(f"{method} {_where(url)}: {type(exc).__name__}: {exc}") from None


def _where(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}{u.path}"   # never the query (it may hold a key)


async def _request(method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                   json_body: Any) -> HttpResponse:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise HttpClientError(f"not an http(s) URL: {_where(url)}")
    port = u.port or (443 if u.scheme == "https" else 80)
    ctx = ssl.create_default_context() if u.scheme == "https" else None
    reader, writer = await asyncio.open_connection(u.hostname, port, ssl=ctx)
    try:
        if json_body is not None:
            body = json.dumps(json_body).encode()
        data = body or b""
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        hs = [("host", u.netloc), ("content-length", str(len(data))), ("connection", "close")]
        if json_body is not None:
            hs.append(("content-type", "application/json"))
        hs += [(k, v) for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")]
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method=method, target=target, headers=hs))
                     + (conn.send(h11.Data(data=data)) if data else b"") + conn.send(h11.EndOfMessage()))
        await writer.drain()
        status, rheaders, rbody = 0, {}, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await reader.read(65536)
                conn.receive_data(chunk)
                continue
            if isinstance(event, h11.Response):
                status, rheaders = event.status_code, _headers(event.headers)
            elif isinstance(event, h11.Data):
                rbody += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return HttpResponse(status, bytes(rbody), rheaders)
    finally:
        writer.close()
