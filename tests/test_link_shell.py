"""The API link's shell (engine/link/shell.py) in this test's own loop: against a small recording
WebSocket server (what arrived, in order, per socket), against nothing (a closed port, a name
that does not resolve), and in the phone bridge (a call's link)."""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Coroutine

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from engine.config import load_config, session_payload
from engine.link.backends import REALTIME
from engine.link.policy import LinkRules
from engine.link.shell import ApiLink
from engine.phone.bridge import PhoneBridge
from engine.phone.simulator import FakePhone
from engine.realtime.core import RealtimeCore
from engine.realtime.records import Command, EndOfAudio, Flush, Input, MicAudio, Play, Publish
from tests.helpers import RecordingPublisher, bridge_spec, set_twilio_token

pytestmark = pytest.mark.timeout(30)

#: a predecessor's conversation as the core publishes it (client items with their ids)
HISTORY = [{"id": f"item_note{i}", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": f"note {i}"}]} for i in range(30)]


class RecordingServer:
    """A WebSocket server that keeps every text message of each connection, in order, answers
    nothing but a ``session.created``, and can drop a connection (no close frame)."""

    def __init__(self, status: int | None = None) -> None:
        self.sockets: list[list[dict[str, Any]]] = []
        self.conns: list[ServerConnection] = []
        self.status = status
        self.url = ""
        self.new_message = asyncio.Event()

    async def __aenter__(self) -> "RecordingServer":
        def refuse(conn: ServerConnection, request: Request) -> Response | None:
            return conn.respond(self.status, "refused\n") if self.status else None
        self.server = await serve(self.handle, "127.0.0.1", 0, process_request=refuse, max_size=None)
        port = list(self.server.sockets)[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/realtime"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, ws: ServerConnection) -> None:
        got: list[dict[str, Any]] = []
        self.sockets.append(got)
        self.conns.append(ws)
        await ws.send(json.dumps({"type": "session.created", "event_id": "e0",
                                  "session": {"id": f"sess_{len(self.sockets)}", "model": "gpt-realtime"}}))
        async for text in ws:
            got.append(json.loads(text))
            self.new_message.set()

    def drop(self, n: int = -1) -> None:
        self.conns[n].transport.abort()

    async def until(self, check: Callable[[], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline, f"not within {timeout_s} s: {[[m['type'] for m in s] for s in self.sockets]}"
            await asyncio.sleep(0.005)


class Host:
    """The link's host: keeps what it publishes; ``on_publish`` may react to a topic."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.on_publish: dict[str, Callable[[dict[str, Any]], None]] = {}

    def heard_index(self, now_s: float) -> int:
        return 0

    def received(self, event: Any, in_s: float) -> None:
        pass

    def perform(self, act: Play | Flush | EndOfAudio | Publish, now_s: float) -> Input | None:
        if isinstance(act, Publish):
            self.published.append((act.topic, act.payload))
            react = self.on_publish.get(act.topic)
            if react is not None:
                react(act.payload)
        return None

    def topics(self, topic: str) -> list[dict[str, Any]]:
        return [b for t, b in self.published if t == topic]

    async def wait(self, topic: str, check: Callable[[dict[str, Any]], bool] = lambda b: True,
                   timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [b for b in self.topics(topic) if check(b)]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no {topic} within {timeout_s} s: {[t for t, _ in self.published]}"
            await asyncio.sleep(0.005)


def make_link(url: str, host: Host, **rules: Any) -> tuple[ApiLink, RealtimeCore]:
    cfg = load_config(None, {})
    core = RealtimeCore(cfg["model"], session_payload(cfg))
    return ApiLink(REALTIME, core, host, url, {"Authorization": "Bearer test"}, LinkRules(url, **rules)), core


@asynccontextmanager
async def running_link(server: RecordingServer, history: list[dict[str, Any]] | None = None,
                       **rules: Any) -> AsyncIterator[tuple[Host, ApiLink, RealtimeCore, asyncio.Task[Any]]]:
    """A link to ``server`` running in this loop (its core given ``history`` first), once it has
    reported connected: (host, link, core, the link's task). Stopped, and its task awaited, at the end."""
    host = Host()
    link, core = make_link(server.url, host, **rules)
    if history is not None:
        core.restore_history({"items": history})
    task = asyncio.get_running_loop().create_task(link.run())
    try:
        await host.wait("engine.status", lambda b: b.get("state") == "connected")
        yield host, link, core, task
    finally:
        link.stop()
        await asyncio.wait_for(task, 5)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def says(got: list[dict[str, Any]]) -> list[str]:
    """The texts of the conversation items a socket received, in order."""
    return [m["item"]["content"][0]["text"] for m in got if m["type"] == "conversation.item.create"
            and m["item"].get("type") == "message"]


# ---------------------------------------------------------------- order
def test_after_a_drop_the_replay_goes_out_before_every_say_made_during_the_outage_or_right_after() -> None:
    """Issue 23 part 5 at its cause: the core decides and the link sends in one callback, so a say
    handed in at any moment around a reconnect follows the whole replay on the new socket."""
    async def main() -> None:
        async with RecordingServer() as server, running_link(server, HISTORY) as (host, link, _, task):
            await server.until(lambda: len(server.sockets) == 1 and len(says(server.sockets[0])) == 0
                               and any(m["type"] == "session.update" for m in server.sockets[0]))
            n = iter(range(1000))

            def say(_: dict[str, Any]) -> None:
                link.step(Command("cmd.say", {"text": f"outage {next(n)}", "role": "system", "respond": False}))
            # says handed in as the drop is seen, and in the very callback that reports the reconnect
            host.on_publish["engine.status"] = say
            server.drop()
            await server.until(lambda: len(server.sockets) == 2 and len(says(server.sockets[1])) >= len(HISTORY) + 2)
            host.on_publish.clear()
            second = says(server.sockets[1])
            assert second[:len(HISTORY)] == [f"note {i}" for i in range(len(HISTORY))], second
            assert second[len(HISTORY):] == [f"outage {i}" for i in range(len(second) - len(HISTORY))]
            assert server.sockets[1][0]["type"] == "session.update"   # the config first
            link.stop()
            assert await asyncio.wait_for(task, 5) is None   # stopped: no end of its own
    run(main)


def test_mic_audio_goes_out_as_the_backends_append_and_its_latency_is_counted() -> None:
    async def main() -> None:
        async with RecordingServer() as server, running_link(server) as (_, link, _, _):
            pcm = bytes(range(256)) * 4
            link.step(MicAudio(pcm, time.monotonic() - 0.002))
            await server.until(lambda: any(m["type"] == "input_audio_buffer.append" for m in server.sockets[0]))
            (append,) = [m for m in server.sockets[0] if m["type"] == "input_audio_buffer.append"]
            assert base64.b64decode(append["audio"]) == pcm and set(append) == {"type", "audio"}
            assert link.audio_latency.count == 1 and 2000 <= link.audio_latency.samples_us[0] < 1_000_000
    run(main)


# ---------------------------------------------------------------- recycling
def test_an_old_session_is_recycled_at_a_quiet_moment_and_the_new_one_gets_the_conversation() -> None:
    async def main() -> None:
        async with RecordingServer() as server, running_link(server, HISTORY[:3], recycle_after_s=0.3) as (host, *_):
            back = await host.wait("engine.status", lambda b: b.get("state") == "reconnected" and b.get("reason") == "recycle")
            assert back["history_items"] == 3 and len(server.sockets) == 2
            assert not host.topics("engine.error") and not [b for b in host.topics("engine.status")
                                                            if b.get("state") == "reconnecting"]
            # the status is published as the replay is sent: the server reads it a moment later
            await server.until(lambda: len(says(server.sockets[1])) >= 3)
            assert says(server.sockets[1]) == ["note 0", "note 1", "note 2"]
    run(main)


def test_a_busy_session_is_not_recycled_until_it_is_quiet() -> None:
    async def main() -> None:
        async with RecordingServer() as server, running_link(server, recycle_after_s=0.1) as (_, link, core, _):
            link.step(Command("cmd.say", {"text": "hello", "id": "s1"}))   # a response is asked for: busy
            await asyncio.sleep(0.8)
            assert len(server.sockets) == 1 and not core.at_turn_boundary()
    run(main)


# ---------------------------------------------------------------- the first socket
def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"ws://127.0.0.1:{port}/v1/realtime"


@pytest.mark.parametrize("url, code, words", [
    ("closed-port", "unreachable", "connection refused"),   # a port closed when the test runs
    ("ws://no-such-host.invalid/v1/realtime", "unreachable", "cannot resolve the host name"),
    ("http://127.0.0.1:9/v1/realtime", "unreachable", "not a valid ws:// or wss:// URL"),
])
def test_a_first_socket_that_cannot_be_opened_ends_the_link_at_once_naming_url_and_cause(url: str, code: str,
                                                                                       words: str) -> None:
    url = closed_port_url() if url == "closed-port" else url

    async def main() -> None:
        host = Host()
        link, _ = make_link(url, host)
        t0 = time.monotonic()
        end = await asyncio.wait_for(link.run(), 5)
        assert end is not None and end.code == code and url in end.message and words in end.message, end
        assert time.monotonic() - t0 < 3.0
        assert not host.topics("engine.error")    # one error: the fatal one, the host's to report
    run(main)


def test_a_host_that_does_not_answer_at_the_first_socket_is_fatal_after_the_reach_timeout() -> None:
    """A wss:// port whose listener never accepts: TCP connects (the kernel's backlog), TLS gets no
    answer. Bounded by FIRST_REACH_TIMEOUT_S, not by the whole opening's 10 s."""
    from engine.link.policy import FIRST_REACH_TIMEOUT_S
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"wss://127.0.0.1:{silent.getsockname()[1]}/v1/realtime"

    async def main() -> None:
        host = Host()
        link, _ = make_link(url, host)
        t0 = time.monotonic()
        end = await asyncio.wait_for(link.run(), 8)
        took = time.monotonic() - t0
        assert end is not None and end.code == "unreachable" and "timed out" in end.message, end
        assert FIRST_REACH_TIMEOUT_S - 0.1 < took < FIRST_REACH_TIMEOUT_S + 1.0, took
    try:
        run(main)
    finally:
        silent.close()


@pytest.mark.parametrize("status, code", [(401, "auth_refused"), (403, "auth_refused"), (404, "unreachable")])
def test_an_http_status_at_the_first_socket_is_fatal_and_a_refused_key_names_its_variable(status: int,
                                                                                          code: str) -> None:
    async def main() -> None:
        async with RecordingServer(status=status) as server:
            host = Host()
            link, _ = make_link(server.url, host, key_env="MY_KEY")
            end = await asyncio.wait_for(link.run(), 5)
            assert end is not None and end.code == code and f"HTTP {status}" in end.message, end
            assert ("$MY_KEY" in end.message) is (code == "auth_refused")
    run(main)


def test_a_refused_key_after_a_drop_is_fatal_at_once() -> None:
    async def main() -> None:
        async with RecordingServer() as server, running_link(server) as (host, _, _, task):
            server.status = 401
            server.drop()
            end = await asyncio.wait_for(task, 5)
            assert end is not None and end.code == "auth_refused"
            assert [b["state"] for b in host.topics("engine.status")][-2:] == ["disconnected", "reconnecting"]
    run(main)


def test_a_stop_during_the_backoff_ends_the_link_at_once() -> None:
    async def main() -> None:
        async with RecordingServer() as server, running_link(server) as (host, link, _, task):
            server.server.close()               # nothing listens any more: the retries back off
            server.drop()
            await host.wait("engine.error", lambda b: b.get("code") == "connect_failed")
            t0 = time.monotonic()
            link.stop()
            assert await asyncio.wait_for(task, 2) is None
            assert time.monotonic() - t0 < 0.5
    run(main)


def test_a_link_stopped_before_it_ran_ends_quietly() -> None:
    """A call that ends as it starts stops its link before the link's task has run."""
    async def main() -> None:
        host = Host()
        link, _ = make_link(closed_port_url(), host)
        link.stop()
        assert await asyncio.wait_for(link.run(), 2) is None and not host.published
    run(main)


# ---------------------------------------------------------------- a phone call's link
@pytest.mark.parametrize("status", [None, 401])
def test_a_call_whose_api_cannot_be_opened_at_its_start_ends_at_once(status: int | None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The phone bridge retried its API 4 times (a refused key too) while the caller heard nothing."""
    set_twilio_token(monkeypatch)   # the fake phone signs its upgrade with it
    pub = RecordingPublisher()

    async def main() -> None:
        async with RecordingServer(status=status) as server:
            url = closed_port_url() if status is None else server.url
            bridge = PhoneBridge(bridge_spec(url), publisher=pub)  # type: ignore[arg-type]
            await bridge.listen()
            phone = await FakePhone(bridge.url).dial()
            t0 = time.monotonic()
            ended = await pub.wait("phone.call.ended", phone_call_id=phone.call_sid, timeout_s=5)
            assert ended["reason"] == "api_failed" and time.monotonic() - t0 < 3.0
            (err,) = pub.all("engine.error", phone_call_id=phone.call_sid)
            assert err["call_fatal"] and url.split("?")[0] in err["message"]
            assert err["code"] == ("unreachable" if status is None else "auth_refused"), err
            await asyncio.wait_for(phone.closed.wait(), 5)
            await bridge.close()
    run(main)
