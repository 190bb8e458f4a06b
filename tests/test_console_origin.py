"""The console refuses requests whose Host or Origin is not its own (DNS rebinding, cross-site
WebSocket hijacking), whatever token they carry: 403 and one log line naming what was refused."""
from __future__ import annotations

import asyncio
import http.client
import io
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from bus import Endpoints
from engine.console.server import ConsoleServer, host_allowed, origin_allowed
from tests.helpers import thread_broker

pytestmark = pytest.mark.timeout(30)


def test_host_rule() -> None:
    local = ("127.0.0.1", "localhost", "::1")
    assert host_allowed("127.0.0.1:8080", ())
    assert host_allowed("localhost:39033", ()) and host_allowed("LOCALHOST", ())
    assert host_allowed("[::1]:39033", ()) and host_allowed("192.168.1.20:39033", ())
    assert host_allowed("console.example:80", ("console.example",))
    for bad in ("evil.example:39033", "127.0.0.1.evil.example", "", "localhost.evil.example:1", "[::1"):
        assert not host_allowed(bad, ()), bad
    assert local  # (the names a loopback console is reached by)


def test_origin_rule() -> None:
    assert origin_allowed(None, "127.0.0.1:5000")           # no Origin: not a browser's cross-site request
    assert origin_allowed("http://127.0.0.1:5000", "127.0.0.1:5000")
    assert origin_allowed("https://localhost:8443", "localhost:8443")   # behind a TLS proxy
    for bad in ("http://evil.example", "null", "http://127.0.0.1:5001", "file://", "http://127.0.0.1:5000.evil"):
        assert not origin_allowed(bad, "127.0.0.1:5000"), bad


@pytest.fixture
def console(tmp_path: Path, runtime_dir: Path) -> Iterator[tuple[ConsoleServer, io.StringIO]]:
    out = io.StringIO()
    with thread_broker(tmp_path) as (pub_ep, sub_ep):
        server = ConsoleServer(Endpoints(pub_ep, sub_ep), out=out, token="tok")
        stop: asyncio.Event | None = None
        loop: asyncio.AbstractEventLoop | None = None
        started = threading.Event()

        def run() -> None:
            nonlocal stop, loop

            async def main() -> None:
                nonlocal stop, loop
                stop, loop = asyncio.Event(), asyncio.get_running_loop()
                started.set()
                await server.serve(stop)
            asyncio.run(main())
        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert started.wait(10)
        for _ in range(200):
            if server.url:
                break
            threading.Event().wait(0.05)
        assert server.url, out.getvalue()
        yield server, out
        assert loop is not None and stop is not None
        loop.call_soon_threadsafe(stop.set)
        t.join(10)


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.putrequest("GET", path, skip_host=True)
    for k, v in headers.items():
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    return r.status, body


def test_a_foreign_host_or_origin_is_refused_with_403_and_logged(console: Any) -> None:
    """Issue 23 point 5: the console checked its token, but neither Origin nor Host."""
    server, out = console
    port = server.port
    own = f"127.0.0.1:{port}"
    assert _get(port, "/?token=tok", {"Host": own})[0] == 200
    assert _get(port, "/?token=tok", {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})[0] == 200
    # DNS rebinding: the attacker's name resolves to 127.0.0.1; the browser sends it as Host
    status, body = _get(port, "/api/sessions?token=tok", {"Host": f"rebind.evil.example:{port}"})
    assert status == 403 and "Host" in body and "rebind.evil.example" in body
    # cross-site: another site's page, with a token it learnt, opens the console's socket
    ws_headers = {"Host": own, "Origin": "http://evil.example", "Upgrade": "websocket", "Connection": "Upgrade",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    for path in ("/ws?token=tok", "/listen?token=tok", "/talk?token=tok"):
        status, body = _get(port, path, ws_headers)
        assert status == 403 and "Origin" in body and "evil.example" in body, (path, status, body)
    assert _get(port, "/ws?token=tok", {**ws_headers, "Origin": f"http://{own}"})[0] == 101
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)   # two Host headers: neither is trusted
    c.putrequest("GET", "/?token=tok", skip_host=True)
    c.putheader("Host", own)
    c.putheader("Host", "evil.example")
    c.endheaders()
    assert c.getresponse().status == 403
    c.close()
    log = out.getvalue()
    assert "refused" in log and "rebind.evil.example" in log and "http://evil.example" in log
    assert log.count("http://evil.example") == 1   # the same refusal is logged once, not per request
