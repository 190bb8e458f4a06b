"""Plain HTTP requests on the local server's WebSocket port: OpenAI's REST endpoints (the SIP
call endpoints, :mod:`engine.server.sip`) sit on the same host and port as its sockets, so one
``OPENAI_BASE_URL`` points a client at both.

websockets' server speaks only the GET upgrade. :class:`HttpOrWebSocket` (passed as its
``create_connection``, the documented way to customise connections) looks at a connection's
first bytes: a ``GET`` (but ``GET /v1/x/``, the stand-in's reports) goes on as a WebSocket;
anything else is handed, transport and bytes, to :class:`engine.httpio.HttpProtocol`, which
answers one request and closes. The WebSocket side then just waits for that to finish.
"""
from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.server import ServerConnection

from engine.httpio import MAX_CONNECTIONS, READ_TIMEOUT_S, Handler, HttpProtocol, OpenConnections

#: GETs that are the stand-in's own reports, not upgrades (Azure's dialect: under /openai)
PLAIN_HTTP_GETS = (b"GET /v1/x/", b"GET /openai/v1/x/")
_LONGEST = max(len(p) for p in PLAIN_HTTP_GETS)


def rest_connection(handler: Handler) -> type[ServerConnection]:
    """A :class:`ServerConnection` class that hands plain HTTP requests to ``handler``, counted
    against one server's MAX_CONNECTIONS (engine.httpio's rules)."""
    return type("RestOrWebSocket", (HttpOrWebSocket,), {"http_handler": staticmethod(handler),
                                                        "http_open": OpenConnections(MAX_CONNECTIONS)})


class HttpOrWebSocket(ServerConnection):
    http_handler: Handler
    http_open: OpenConnections      #: the server's plain HTTP connections, counted

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = b""
        self._http: asyncio.Future[asyncio.Future[None]] = self.loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self._http.done() or self.request is not None:
            super().data_received(data)
            return
        head = self._head + data
        if len(head) < _LONGEST and b"\r\n" not in head and any(p.startswith(head) for p in PLAIN_HTTP_GETS):
            self._head = head          # too short to tell yet
            return
        self._head = b""
        if head.startswith(b"GET ") and not head.startswith(PLAIN_HTTP_GETS):
            super().data_received(head)
            return
        proto = HttpProtocol(self.http_handler, READ_TIMEOUT_S, self.http_open)
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        self._http.set_result(proto.done)
        proto.data_received(head)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        waiters: list[asyncio.Future[Any]] = [self.request_rcvd, self.connection_lost_waiter, self._http]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if self._http.done():
            await self._http.result()   # the HTTP exchange is over and its socket closed
            return                      # not OPEN: websockets drops the connection quietly
        await super().handshake(*args, **kwargs)
