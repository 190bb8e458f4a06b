"""Shared helpers for the tests (test modules import them from here, never from another test
module or from conftest.py): paths, test signals, the local server in a thread and clients of it,
processes read line by line, the bus (brokers in a thread, waiting for a topic, for a
subscription, recordings of what was published), the debug console's page.

Waiting for a bus topic is written once for each kind of reader: :func:`wait_topic` for a threaded
:class:`bus.Subscriber`, :meth:`TopicLog.wait` for an asyncio test over messages recorded as they
come (:class:`BusRecorder` records a subscriber on a thread, :class:`RecordingPublisher` what a
bridge in the test's own loop publishes). :func:`subscribed` waits, on an event, until the broker
holds a subscriber's subscriptions (no sleep)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import socket
import secrets
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

import numpy as np
import websocket

if TYPE_CHECKING:
    from bus import Endpoints, Publisher, Subscriber
    from engine.audio.ring import Ring

REPO = Path(__file__).resolve().parent.parent
#: captured server-event traces of the real service (tests/data/traces/README.md says where each came from)
TRACES = REPO / "tests" / "data" / "traces"
VAUDIO = REPO / "tools" / "vaudio.sh"
#: Debian's chromium, which Playwright drives in the console tests
CHROMIUM = "/usr/bin/chromium"
#: where the console tests leave their screenshots
SHOTS = REPO / "runs" / "console-screenshots"


# ---------------------------------------------------------------- test signals
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


def found_in(recorded: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """Where ``reference`` best matches inside ``recorded``: (normalised cross-correlation, lag in
    frames), over the lags where all of ``reference`` lies inside ``recorded``. Each lag is scored
    against the energy of the part of ``recorded`` it covers, so a loud stretch elsewhere cannot
    outscore the true place of a short reference."""
    a = recorded.astype(np.float64)
    b = reference.astype(np.float64)
    if len(b) > len(a) or not np.any(b):
        return 0.0, 0
    size = 1 << (len(a) + len(b) - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)[:len(a) - len(b) + 1]
    energy = np.concatenate([[0.0], np.cumsum(a * a)])
    window = np.sqrt(np.maximum(energy[len(b):] - energy[:len(a) - len(b) + 1], 1e-3 * float(np.dot(b, b))))
    score = np.abs(corr) / (window * np.linalg.norm(b))
    lag = int(np.argmax(score))
    return float(min(score[lag], 1.0)), lag


def unplayed_pieces(recorded: np.ndarray, sent: np.ndarray, gaps: int, piece_frames: int = 6000,
                    least_part_frames: int = 600, max_gap_frames: int = 48000) -> list[tuple[int, float]]:
    """The pieces of ``sent`` (each ``piece_frames`` long, silent ones skipped) that ``recorded``
    does not hold, as (first frame, correlation); empty when every piece was played.

    A piece is played when it is found whole (correlation above 0.8). Where the device ran dry
    (``gaps`` times) a piece may hold a gap: it is played when it splits in two parts, each at least
    ``least_part_frames`` long, that are each found, the second later than the first by what a gap
    adds (0 to ``max_gap_frames``). At most ``gaps`` pieces are let through that way."""
    missing: list[tuple[int, float]] = []
    for first in range(0, len(sent) - piece_frames, piece_frames):
        piece = sent[first:first + piece_frames]
        if np.abs(piece).max() <= 1000:
            continue
        corr, _ = found_in(recorded, piece)
        if corr > 0.8:
            continue
        split = gaps > 0 and any(
            c1 > 0.8 and c2 > 0.8 and 0 <= lag2 - lag1 <= max_gap_frames
            for cut in range(least_part_frames, piece_frames - least_part_frames + 1, 200)
            for (c1, lag1), (c2, lag2) in [(found_in(recorded, piece[:cut]), found_in(recorded, piece[cut:]))])
        if split:
            gaps -= 1
        else:
            missing.append((first, corr))
    return missing


def voiced(n: int, period_frames: int = 150) -> np.ndarray:
    """A periodic, speech-like tone (160 Hz with a harmonic by default) of ``n`` frames."""
    t = np.arange(n)
    return (8000 * np.sin(2 * np.pi * t / period_frames)
            + 3000 * np.sin(4 * np.pi * t / period_frames + 1)).astype(np.int16)


def bunched_callback_s(k: int) -> float:
    """When a PulseAudio speaker asks for its ``k``-th 10 ms block: 13.3 and 6.7 ms apart in turn
    (ALSA's pulse plugin and libpulse at the sink's steps), from t = 100 s; 10 ms a block on average."""
    return 100.0 + (k // 2) * 0.02 + (0.0133 if k % 2 else 0.0)


def speaker_ring_schedule(seed: int) -> list[tuple[str, int]]:
    """A random mix of what the realtime process does to the speaker ring between callbacks."""
    rng = np.random.default_rng(seed)
    acts: list[tuple[str, int]] = []
    for _ in range(400):
        x = rng.random()
        if x < 0.45:
            acts.append(("write", int(rng.integers(60, 900))))
        elif x < 0.5:
            acts.append(("end", 0))
        elif x < 0.53:
            acts.append(("flush", 0))
        elif x < 0.58:
            acts.append(("start", 0))
        elif x < 0.62:   # the jitter buffer's target (ring.py's target_frames): none, small, large
            acts.append(("target", int(rng.choice([0, 312, 480, 1440, 2400]))))
        acts.append(("render", int(rng.choice([240, 480, 441]))))
    return acts


def steepest(pcm: np.ndarray) -> int:
    """The largest sample-to-sample step: a splice that clicks makes a steeper one."""
    return int(np.abs(np.diff(pcm.astype(np.int32))).max())


@contextlib.contextmanager
def made_ring(capacity_frames: int = 1 << 14, eventfd: bool = False) -> Iterator["Ring"]:
    """A new shared-memory ring of this test's own (a unique name), closed and unlinked after."""
    from engine.audio.ring import Ring
    ring = Ring.create(f"realtalk-test-{os.getpid()}-{secrets.token_hex(4)}", capacity_frames, with_eventfd=eventfd)
    try:
        yield ring
    finally:
        ring.close()
        ring.unlink()


def chunks_b64(pcm: np.ndarray, chunk_ms: int = 20) -> list[str]:
    step = 24 * chunk_ms
    return [base64.b64encode(pcm[i:i + step].tobytes()).decode() for i in range(0, len(pcm), step)]


# ---------------------------------------------------------------- the local server in a thread, its clients
class LocalServer:
    def __init__(self, **kwargs: Any) -> None:
        from engine.server.app import ServerConfig, serve_forever
        self.cfg = ServerConfig(port=0, **kwargs)
        self._ready = threading.Event()
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                ready = self._loop.create_future()
                task = self._loop.create_task(serve_forever(self.cfg, ready, self._stop))
                self.url = await ready
                self._ready.set()
                await task
            asyncio.run(main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "local server did not start"
        self.port = int(self.url.split(":")[2].split("/")[0])
        self.base = f"ws://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


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


# ---------------------------------------------------------------- processes
class ProcessLines:
    """A process's stdout read by a thread, line by line (newlines kept); ``wait_for`` blocks
    until a line matches."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def on_line(self, line: str) -> None:
        """Called on the reader thread with each line, as it comes."""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self.on_line(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[str], bool], timeout: float) -> str:
        """The first line (without its newline) ``pred`` accepts; AssertionError, with what the
        process printed, if none comes within ``timeout`` s or the process ends first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((line for line in (s.rstrip("\n") for s in self.lines) if pred(line)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._t.is_alive()):
                    raise AssertionError("no such line within the time; got:\n" + "".join(self.lines))
                self._cond.wait(min(left, 0.5))

    def stop(self) -> int:
        """Ctrl-C (SIGINT), then SIGKILL after 15 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._t.join(2)
        return self.proc.returncode


class RunningEngine(ProcessLines):
    def __init__(self, proc: subprocess.Popen[str], runtime: Path, sessions: Path) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.ready = threading.Event()
        super().__init__(proc)

    def on_line(self, line: str) -> None:
        if "ready in" in line:
            self.ready.set()

    @property
    def conn(self) -> dict[str, Any]:
        return json.loads((self.runtime / "engine.json").read_text())

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "engine.api.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy())


E = TypeVar("E", bound=RunningEngine)


@contextlib.contextmanager
def engine_workers(tmp_path: Path, kind: type[E], args: list[str], n: int = 2,
                   env: Mapping[str, str] | None = None) -> Iterator[list[E]]:
    """``n`` engines (``engine ARGS``, each with its own runtime folder ``w<i>/run`` and sessions
    ``w<i>/data`` under ``tmp_path``, and ``env`` over this process's), once each is ready; stopped
    at the end."""
    started: list[E] = []
    try:
        for i in range(n):
            run = tmp_path / f"w{i}" / "run"
            run.mkdir(parents=True, mode=0o700)
            proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path),
                                    env={**os.environ, "REALTALK_RUNTIME_DIR": str(run),
                                         "XDG_DATA_HOME": str(tmp_path / f"w{i}" / "data"), **(env or {})})
            started.append(kind(proc, run, tmp_path / f"w{i}" / "data"))
        for w in started:
            assert w.ready.wait(30), "a worker did not become ready:\n" + "".join(w.lines)
        yield started
    finally:
        for w in started:
            w.stop()


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout_s: float = 10, name: str = "haproxy") -> None:
    """Until ``proc`` (``name``: haproxy gives no readiness signal but its listening socket) listens
    on ``port``; AssertionError if it exits or does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"{name} did not listen on {port} in {timeout_s} s")


def failed_start(openai_url: str, key: str, tmp_path: Path) -> tuple[str, float]:
    """`engine start --backend openai --text-only` against ``openai_url`` with ``$OPENAI_API_KEY``
    ``key``, which must fail: (what it printed, stdout and stderr, and the seconds it took)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"openai_url: {openai_url}\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "engine.api.cli", "start", "--backend", "openai", "--text-only",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "OPENAI_API_KEY": key}, cwd=str(tmp_path))
    elapsed = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    return text, elapsed


@contextlib.contextmanager
def car_rental_office() -> Iterator[subprocess.Popen[str]]:
    """examples/car_rental.py, the back office serving every call of the running engine, once it
    says it serves calls; terminated at the end."""
    office = subprocess.Popen([sys.executable, str(REPO / "examples" / "car_rental.py")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        assert office.stdout is not None
        line = office.stdout.readline()
        assert "serving calls" in line, line
        yield office
    finally:
        office.terminate()
        office.wait(5)


def caller_speech(text: str, voice: str = "marin") -> bytes:
    """``text`` spoken by espeak-ng (the local server's own voice), 300 ms of silence each side, as
    a phone caller's µ-law at 8 kHz."""
    from engine.codec import encode_audio
    from engine.server.voice import synthesize
    pad = np.zeros(7200, dtype=np.int16)
    return encode_audio(np.concatenate([pad, synthesize(text, voice), pad]), "audio/pcmu")


class PhoneEngine(RunningEngine):
    """`engine phone`: ready on the line that also names its URL ("ready in ...; phone calls at ws://...")."""

    @property
    def url(self) -> str:
        m = re.search(r"phone calls at (ws://\S+)", "".join(self.lines))
        return m.group(1) if m else ""


# ---------------------------------------------------------------- the bus
class Broker:
    """The engine's broker on a thread of this process, with its own ZeroMQ context; the constructor
    returns once both sockets are bound (its ready fd); :meth:`stop` stops it through its stop
    endpoint. ``kwargs`` go to ``run_broker`` (``signing_key``, ``intake``, ``curve_server``, ...)."""

    def __init__(self, pub_ep: str, sub_ep: str, **kwargs: Any) -> None:
        import zmq
        from bus.broker import run_broker
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.stop_ep = f"inproc://stop-{id(self)}"
        self.pub_ep, self.sub_ep = pub_ep, sub_ep
        ready_r, ready_w = os.pipe()
        self.thread = threading.Thread(target=run_broker, args=(pub_ep, sub_ep), daemon=True,
                                       kwargs={"context": self.ctx, "stop_endpoint": self.stop_ep,
                                               "ready_fd": ready_w, **kwargs})
        self.thread.start()
        try:
            assert os.read(ready_r, 1) == b"1", "the broker did not bind its sockets"
        finally:
            os.close(ready_r)

    def stop(self) -> None:
        import zmq
        s = self.ctx.socket(zmq.PUSH)
        s.connect(self.stop_ep)
        s.send(b"stop")
        self.thread.join(5)
        s.close(0)
        self.ctx.term()


@contextlib.contextmanager
def thread_broker(tmp_path: Path, name: str = "broker", **options: Any) -> Iterator[tuple[str, str]]:
    """A :class:`Broker` on ipc sockets in ``tmp_path`` (``name`` tells two apart): yields
    (publish endpoint, subscribe endpoint) once it is bound; stopped on exit. ``options`` go to
    ``run_broker`` (``signing_key``, ``intake``)."""
    broker = Broker(f"ipc://{tmp_path}/{name}-p.sock", f"ipc://{tmp_path}/{name}-s.sock", **options)
    try:
        yield broker.pub_ep, broker.sub_ep
    finally:
        broker.stop()


def _matches(body: Mapping[str, Any], where: Callable[[dict[str, Any]], bool] | None, match: Mapping[str, Any]) -> bool:
    return all(body.get(k) == v for k, v in match.items()) and (where is None or bool(where(dict(body))))


def wait_topic(sub: "Subscriber", topic: str, timeout: float = 20, where: Callable[[dict[str, Any]], bool] | None = None,
               seen: list[tuple[str, dict[str, Any]]] | None = None, *, send: Callable[[], object] | None = None,
               **match: Any) -> dict[str, Any]:
    """The next message on ``topic`` read from a threaded subscriber whose body has the ``match``
    values and satisfies ``where``; everything read on the way is appended to ``seen``.
    ``send`` is called before each try (every 50 ms): a message to publish until it comes (the
    slow joiner). AssertionError naming what came instead if nothing does within ``timeout`` s."""
    if "timeout_s" in match:
        raise TypeError("wait_topic takes timeout=, not timeout_s= (it would be a body value to match)")
    deadline = time.monotonic() + timeout
    seen = [] if seen is None else seen
    while time.monotonic() < deadline:
        if send is not None:
            send()
        msg = sub.recv(timeout_ms=50 if send is not None else 100)
        if msg is None:
            continue
        seen.append(msg)
        if msg[0] == topic and _matches(msg[1], where, match):
            return msg[1]
    which = f"{topic}{f' {match}' if match else ''}{' passing where' if where is not None else ''}"
    raise AssertionError(f"no {which} within {timeout} s; saw {[t for t, _ in seen[-15:]]}")


_probes = itertools.count()


def subscribed(sub: "Subscriber", publish: "str | Endpoints | Publisher",
               timeout_s: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
    """Return once the broker holds every subscription ``sub`` has made, and has passed them on to
    the publishers and its keeper (which acts on them: last-value replays, presence): an event, not
    a sleep. ``sub`` subscribes to a private probe topic after its own, and a probe is published
    (through ``publish``: an endpoint, or a Publisher to reuse) until it comes back; a
    subscriber's subscriptions travel in order on its connection, so the others got there first.
    Returns what else ``sub`` read meanwhile. Probes carry seq 0 (no drop is counted)."""
    import zmq
    from bus import Publisher
    from bus.wire import encode
    topic = f"_probe.{os.getpid()}.{next(_probes)}"
    sub.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
    pub = publish if isinstance(publish, Publisher) else Publisher(publish, "probe", signing_key=None)
    other: list[tuple[str, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pub.send_raw(encode(topic, {}, pub.name, 0))
            msg = sub.recv(timeout_ms=10)
            while msg is not None:
                if msg[0] == topic:
                    return other
                other.append(msg)
                msg = sub.recv(timeout_ms=0)
        raise AssertionError(f"the probe did not come back through the broker within {timeout_s} s")
    finally:
        sub.socket.setsockopt(zmq.UNSUBSCRIBE, topic.encode())
        if pub is not publish:
            pub.close()


class TopicLog:
    """Bus messages ``(topic, body)`` as they come (:meth:`add`, from any thread), for a test that
    waits on them in asyncio: :meth:`wait` wakes on each message, no polling."""

    def __init__(self) -> None:
        self.msgs: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def add(self, topic: str, body: Mapping[str, Any]) -> None:
        with self._lock:
            self.msgs.append((topic, dict(body)))
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):   # that loop has closed: nobody waits there any more
                loop.call_soon_threadsafe(event.set)

    def all(self, topic: str, /, where: Callable[[dict[str, Any]], bool] | None = None,
            **match: Any) -> list[dict[str, Any]]:
        """Every body on ``topic`` so far with the ``match`` values that satisfies ``where``, in order."""
        with self._lock:
            msgs = list(self.msgs)
        return [b for t, b in msgs if t == topic and _matches(b, where, match)]

    async def wait(self, topic: str, /, timeout_s: float = 20, where: Callable[[dict[str, Any]], bool] | None = None,
                   **match: Any) -> dict[str, Any]:
        """The first body on ``topic`` (already here or still to come) that :meth:`all` would give;
        AssertionError naming the latest topics if none comes within ``timeout_s``."""
        return (await self.wait_many(topic, 1, timeout_s, where, **match))[0]

    async def wait_many(self, topic: str, count: int, /, timeout_s: float = 20,
                        where: Callable[[dict[str, Any]], bool] | None = None, **match: Any) -> list[dict[str, Any]]:
        """What :meth:`all` gives once it gives at least ``count`` bodies (it wakes on each message)."""
        if "timeout" in match:
            raise TypeError("TopicLog waits take timeout_s=, not timeout= (it would be a body value to match)")
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event())
        deadline = loop.time() + timeout_s
        with self._lock:
            self._waiters.append(waiter)
        try:
            while True:
                waiter[1].clear()
                found = self.all(topic, where, **match)
                if len(found) >= count:
                    return found
                left = deadline - loop.time()
                if left <= 0:
                    raise AssertionError(f"{len(found)} of {count} {topic} {match or ''}in {timeout_s} s; "
                                         f"saw {[t for t, _ in self.msgs][-30:]}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(waiter[1].wait(), left)
        finally:
            with self._lock:
                self._waiters.remove(waiter)


class BusRecorder(TopicLog):
    """Every message on an engine's bus, recorded by a thread as it comes, and a publisher: made
    from the connection file's data, returns once its subscription is in the broker."""

    def __init__(self, conn: Mapping[str, Any], name: str = "test") -> None:
        super().__init__()
        from bus import Publisher, Subscriber
        self.sub = Subscriber(conn["subscribe"], [""])
        self.pub = Publisher(conn["publish"], name)
        assert self.pub.join(conn["subscribe"]), "the test's publisher did not join the bus"
        for msg in subscribed(self.sub, self.pub):
            self.add(*msg)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            m = self.sub.recv(timeout_ms=100)
            if m is not None:
                self.add(*m)

    def close(self) -> None:
        self.stop.set()
        self.t.join(1)
        self.sub.close()
        self.pub.close()

    def __enter__(self) -> "BusRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingPublisher(TopicLog):
    """Stands in for the bus Publisher: keeps what the bridge publishes."""

    name = "recording"

    def publish(self, topic: str, payload: Mapping[str, Any] | None = None) -> None:
        self.add(topic, payload or {})

    def close(self) -> None:
        pass


def bridge_spec(api_url: str, model: str | None = None, **phone: Any) -> Any:
    """A phone bridge's spec (engine.specs.PhoneSpec) for a bridge in the test's own loop (a
    recording publisher, no bus): ``phone`` keys over the config's phone section (``phone.auth``
    twilio: set the token with :func:`set_twilio_token`); ``model`` over the config's (a
    ``gpt-live-*`` one with ``api_url`` ending ``/live/sessions``: GPT-Live)."""
    from engine.config import load_config, session_payload
    from engine.specs import ApiAccess, BusSpec, PhoneSpec
    cfg = load_config(None, {"model": model} if model else {})
    return PhoneSpec(config=cfg, session=session_payload(cfg), url=api_url + "?model=" + cfg["model"],
                     api=ApiAccess(headers=("Authorization: Bearer local",)),
                     phone={**cfg["phone"], "host": "127.0.0.1", "port": 0, **phone},  # type: ignore[typeddict-item]
                     bus=BusSpec(publish="inproc://unused", subscribe="inproc://unused"))


def set_twilio_token(monkeypatch: Any) -> str:
    """A fresh Twilio auth token in ``$TWILIO_AUTH_TOKEN`` for this test: `engine phone` (its
    default ``phone.auth: twilio``) checks signatures with it, the fake phones sign with it."""
    import secrets
    token = secrets.token_hex(16)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", token)
    return token


def say(conn: dict[str, Any], text: str, timeout_s: float = 30.0, **payload: Any) -> dict[str, Any]:
    """Send ``cmd.say`` through the bus's one ``call`` and return its outcome (``cmd.done``: ``ok``,
    ``item_id``), or its ``cmd.ack`` if the engine refused it."""
    from bus.aio import call_sync
    from bus.client import endpoints_from
    return call_sync(endpoints_from(conn), "cmd.say", {"text": text, **payload}, name="test", outcome=True,
                     outcome_timeout_s=timeout_s)


# ---------------------------------------------------------------- the debug console
def console_url(eng: ProcessLines, timeout: float = 20) -> str:
    """The URL `engine console` (or `engine start --console`) printed."""
    line = eng.wait_for(lambda line: re.search(r"realtalk: console http://\S+", line) is not None, timeout)
    m = re.search(r"realtalk: console (http://\S+)", line)
    assert m is not None
    return m.group(1)


def shot(page: Any, name: str) -> Path:
    """A full-page screenshot of ``page`` as ``name`` under :data:`SHOTS`."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"console screenshot: {path}")
    return path


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


async def place_call(base_http: str, key: str = "x", **body: Any) -> dict[str, Any]:
    """Ring the application through the local server's stand-in (``POST /v1/x/sip/calls``)."""
    from engine.httpio import request
    resp = await request("POST", f"{base_http}/x/sip/calls", json_body=body, headers={"authorization": f"Bearer {key}"})
    assert resp.status == 201, resp.body
    return dict(resp.parsed())


async def call_report(base_http: str, call_id: str, wait_ended: bool = False, timeout_s: float = 30.0,
                      key: str = "x") -> dict[str, Any]:
    """A stand-in call's report; with ``wait_ended``, once it has ended (or ``timeout_s`` passed)."""
    import time as _time
    from engine.httpio import request
    deadline = _time.monotonic() + timeout_s
    while True:
        resp = await request("GET", f"{base_http}/x/sip/calls/{call_id}" + ("?wait=ended" if wait_ended else ""),
                             headers={"authorization": f"Bearer {key}"}, timeout_s=timeout_s)
        rep = dict(resp.parsed())
        if not wait_ended or rep["phase"] not in ("ringing", "answered") or _time.monotonic() > deadline:
            return rep


# ---------------------------------------------------------------- SIP calls (engine.sip.calls)
SIP_DEFAULTS = {"model": "gpt-realtime", "instructions": "Be brief.", "voice": "marin"}


def sip_offer(api: str, call_id: str = "abc", to: str = "<sip:+15550100@x>", **headers: str) -> Any:
    """An incoming call's webhook (engine.webhooks.Incoming) on ``api``, keyed by its Call-ID."""
    from engine.webhooks import Incoming
    hs = (("Call-ID", call_id), ("To", to)) + tuple(headers.items())
    return Incoming(api, ("rtc_" if api == "realtime" else "live_") + call_id, "evt_" + call_id,
                    "realtime.call.incoming" if api == "realtime" else "live.transport.incoming", 0, hs, "srtp")


def sip_table(routes: list[dict[str, Any]], max_calls: int = 10, no_route: int = 404) -> Any:
    """A call table (engine.sip.calls.CallTable) over ``routes`` with SIP_DEFAULTS."""
    from engine.sip.calls import CallTable, parse_routes
    return CallTable(parse_routes({"routes": routes}, SIP_DEFAULTS), max_calls, no_route)
