"""The plain HTTP server (engine sip's webhooks; the local server's REST shares its protocol) against strangers: a
connection that never finishes its request is dropped, and idle connections cannot take every
file descriptor (the trust review: 1,000 silent connections stopped webhooks from being taken)."""
from __future__ import annotations

import asyncio

import pytest

from engine.httpio import HttpRequest, HttpResponse, request, serve_http

pytestmark = pytest.mark.timeout(30)


async def _ok(req: HttpRequest) -> HttpResponse:
    return HttpResponse(200, b"ok\n")


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 5)


def test_a_request_that_never_finishes_is_answered_408_and_closed() -> None:
    async def main() -> None:
        server = await serve_http(_ok, "127.0.0.1", 0, read_timeout_s=0.3)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")   # and then nothing
        t0 = asyncio.get_running_loop().time()
        answer = await _read_all(reader)
        assert answer.startswith(b"HTTP/1.1 408") and asyncio.get_running_loop().time() - t0 < 2
        writer.close()
        server.close()
    asyncio.run(main())


def test_idle_connections_past_the_cap_are_refused_and_a_real_request_still_answered() -> None:
    async def main() -> None:
        server = await serve_http(_ok, "127.0.0.1", 0, read_timeout_s=5, max_connections=3)
        port = server.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _read_all(reader)).startswith(b"HTTP/1.1 503")
        writer.close()
        for _, w in idle:
            w.close()
            await w.wait_closed()
        await asyncio.sleep(0)
        for _ in range(50):                        # the server sees the idle ones go
            resp = await request("GET", f"http://127.0.0.1:{port}/x", timeout_s=5)
            if resp.status == 200:
                break
            await asyncio.sleep(0.02)
        assert resp.status == 200
        server.close()
    asyncio.run(main())
