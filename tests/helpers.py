"""Small helpers for the tests: talking to the local server and to the bus, test signals."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import websocket

if TYPE_CHECKING:
    from bus import Subscriber


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def write_wav(path: Path, pcm: np.ndarray, rate_hz: int = 24000) -> Path:
    """``pcm`` (int16 mono) as a 16-bit PCM WAV file at ``path``; returns ``path``."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate_hz)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


def voiced(n: int, period_frames: int = 150) -> np.ndarray:
    """A periodic, speech-like tone (160 Hz with a harmonic by default) of ``n`` frames."""
    t = np.arange(n)
    return (8000 * np.sin(2 * np.pi * t / period_frames)
            + 3000 * np.sin(4 * np.pi * t / period_frames + 1)).astype(np.int16)


def steepest(pcm: np.ndarray) -> int:
    """The largest sample-to-sample step: a splice that clicks makes a steeper one."""
    return int(np.abs(np.diff(pcm.astype(np.int32))).max())


def chunks_b64(pcm: np.ndarray, chunk_ms: int = 20) -> list[str]:
    step = 24 * chunk_ms
    return [base64.b64encode(pcm[i:i + step].tobytes()).decode() for i in range(0, len(pcm), step)]


class RawClient:
    """A plain websocket-client connection that validates every server event it reads."""

    def __init__(self, url: str, validator: Any = None, headers: list[str] | None = None) -> None:
        self.ws = websocket.create_connection(url, header=headers or ["Authorization: Bearer test"], timeout=10)
        self.validator = validator
        self.events: list[dict[str, Any]] = []

    def send(self, event: dict[str, Any] | str) -> None:
        self.ws.send(event if isinstance(event, str) else json.dumps(event))

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        self.ws.settimeout(timeout)
        ev = json.loads(self.ws.recv())
        if self.validator is not None:
            self.validator.check(ev)
        self.events.append(ev)
        return ev

    def until(self, etype: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {etype} within {timeout}s; got {[e['type'] for e in self.events[-10:]]}"
            ev = self.recv(left)
            if ev["type"] == etype:
                return ev

    def close(self) -> None:
        self.ws.close()


def structural(types: list[str]) -> list[str]:
    """Event types without deltas, rate limits and input transcription (which interleave freely)."""
    return [t for t in types if not t.endswith(".delta") and t != "rate_limits.updated"
            and not t.startswith("conversation.item.input_audio_transcription")]


@contextlib.contextmanager
def thread_broker(tmp_path: Path, name: str = "broker", **options: Any) -> Iterator[tuple[str, str]]:
    """The engine's broker on a thread of this process, on ipc sockets in ``tmp_path``: yields
    (publish endpoint, subscribe endpoint); stopped through its stop endpoint on exit.
    ``options`` go to ``run_broker`` (``signing_key``, ``intake``)."""
    import zmq
    from bus.broker import run_broker
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pub_ep, sub_ep = f"ipc://{tmp_path}/p.sock", f"ipc://{tmp_path}/s.sock"
    stop_ep = f"inproc://stop-{name}-{id(tmp_path)}"
    t = threading.Thread(target=run_broker, args=(pub_ep, sub_ep), daemon=True,
                         kwargs={"context": ctx, "stop_endpoint": stop_ep, **options})
    t.start()
    try:
        yield pub_ep, sub_ep
    finally:
        s = ctx.socket(zmq.PUSH)
        s.connect(stop_ep)
        s.send(b"stop")
        t.join(5)
        s.close()


class RecordingPublisher:
    """Stands in for the bus Publisher: keeps what the bridge publishes."""

    def __init__(self) -> None:
        self.msgs: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: Mapping[str, Any] | None = None) -> None:
        self.msgs.append((topic, dict(payload or {})))

    def all(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        return [b for t, b in self.msgs if t == topic and all(b.get(k) == v for k, v in match.items())]

    async def wait(self, topic: str, timeout_s: float = 15, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.all(topic, **match)
            if found:
                return found[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {topic} {match} in {timeout_s} s; saw {[t for t, _ in self.msgs][-30:]}")

    def close(self) -> None:
        pass


def bridge_spec(api_url: str, **phone: Any) -> dict[str, Any]:
    """A phone bridge's spec for a bridge in the test's own loop (a recording publisher, no bus):
    ``phone`` keys over the defaults (``phone.auth`` twilio: set the token with
    :func:`set_twilio_token`)."""
    from engine.config import load_config, session_payload
    cfg = load_config(None, {})
    return {"config": cfg, "session": session_payload(cfg), "url": api_url + "?model=" + cfg["model"],
            "headers": ["Authorization: Bearer local"], "phone": {"host": "127.0.0.1", "port": 0, **phone},
            "bus": {"publish": "inproc://unused", "subscribe": "inproc://unused"}}


def set_twilio_token(monkeypatch: Any) -> str:
    """A fresh Twilio auth token in ``$TWILIO_AUTH_TOKEN`` for this test: `engine phone` (its
    default ``phone.auth: twilio``) checks signatures with it, the fake phones sign with it."""
    import secrets
    token = secrets.token_hex(16)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", token)
    return token


def wait_topic(sub: "Subscriber", topic: str, timeout: float = 20, where: Any = None,
               seen: list[tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The next message on ``topic``; everything read on the way is appended to ``seen``."""
    deadline = time.monotonic() + timeout
    seen = [] if seen is None else seen
    while time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=100)
        if msg is None:
            continue
        seen.append(msg)
        if msg[0] == topic and (where is None or where(msg[1])):
            return msg[1]
    raise AssertionError(f"no {topic} within {timeout}s; saw {[t for t, _ in seen[-15:]]}")


def say(conn: dict[str, Any], text: str, timeout_s: float = 30.0, **payload: Any) -> dict[str, Any]:
    """Send ``cmd.say`` through the bus's one ``call`` and return its outcome (``cmd.done``: ``ok``,
    ``item_id``), or its ``cmd.ack`` if the engine refused it."""
    from bus.aio import call_sync
    from bus.client import endpoints_from
    return call_sync(endpoints_from(conn), "cmd.say", {"text": text, **payload}, name="test", outcome=True,
                     outcome_timeout_s=timeout_s)


# ---------------------------------------------------------------- SIP (engine.server.sip, engine.sip)
class WebhookSink:
    """An HTTP endpoint on 127.0.0.1 that keeps every delivery it gets (``deliveries``, an asyncio
    queue of :class:`engine.httpio.HttpRequest`) and answers ``status``. Use inside a running loop."""

    def __init__(self, status: int = 200) -> None:
        import asyncio
        self.status = status
        self.deliveries: "asyncio.Queue[Any]" = asyncio.Queue()
        self.server: Any = None
        self.url = ""

    async def start(self) -> str:
        from engine.httpio import HttpResponse, serve_http

        async def handler(req: Any) -> Any:
            await self.deliveries.put(req)
            return HttpResponse(self.status)
        self.server = await serve_http(handler, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/webhook"
        return self.url

    async def take(self, n: int, timeout_s: float = 10.0) -> list[Any]:
        import asyncio
        return [await asyncio.wait_for(self.deliveries.get(), timeout_s) for _ in range(n)]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def place_call(base_http: str, **body: Any) -> dict[str, Any]:
    """Ring the application through the local server's stand-in (``POST /v1/x/sip/calls``)."""
    from engine.httpio import request
    resp = await request("POST", f"{base_http}/x/sip/calls", json_body=body, headers={"authorization": "Bearer x"})
    assert resp.status == 201, resp.body
    return dict(resp.parsed())


async def call_report(base_http: str, call_id: str, wait_ended: bool = False, timeout_s: float = 30.0) -> dict[str, Any]:
    """A stand-in call's report; with ``wait_ended``, once it has ended (or ``timeout_s`` passed)."""
    import time as _time
    from engine.httpio import request
    deadline = _time.monotonic() + timeout_s
    while True:
        resp = await request("GET", f"{base_http}/x/sip/calls/{call_id}" + ("?wait=ended" if wait_ended else ""),
                             headers={"authorization": "Bearer x"}, timeout_s=timeout_s)
        rep = dict(resp.parsed())
        if not wait_ended or rep["phase"] not in ("ringing", "answered") or _time.monotonic() > deadline:
            return rep
