"""Bench: phone calls at once through `engine phone` with the fake Twilio phone, in three process
layouts and against the openai-SDK baseline, side by side. Prints JSON (``--json``: one line).

    python bench/phone.py [--calls 1,5,10,20,40] [--seconds 8] [--runs 2] [--layouts one_process,...]
                          [--speed 4] [--control-speed 1] [--truncations 10] [--first-delta-turns 10] [--json]
    python bench/run.py phone [--json]        (the defaults, from the benchmark runner)

The local server stands in for OpenAI at ``--speed`` (default 4, its ``local_server.speed``): it
streams each reply's audio deltas that many times faster than real time, as the Realtime API sends
audio ahead of playback. ``speed`` changes only pacing (the delay between deltas, the server_vad
idle timer, which these sessions do not set); the reply's words and audio are the same. A control
run at ``--control-speed`` (default 1: exactly real time) repeats ``one_process`` and the baseline,
to show what the stand-in's pacing alone does to the phone's underruns.

Layouts (``runs``):
- ``one_process``: what `engine phone` does: one asyncio phone process holding every call's two
  WebSockets and a RealtimeCore per call.
- ``process_per_call``: each call's whole bridge (its Twilio socket, core and API socket) in a
  process of its own: ``python -m engine.phone.process`` per call with the spec's ``solo`` (it leaves
  other calls' commands alone and publishes no status each second), started before the call
  dials. A real per-call layout also needs a front to route each call to its process (a hop
  more), so its figures here are a lower bound of that layout's cost.
- ``process_per_core``: as many one-process bridges as the machine has cores (the spec's ``solo``),
  calls dealt out in turn: what several `engine phone` workers behind haproxy are on one machine.
- ``sdk_sample_baseline``: the most-forked Twilio sample's bridge (twilio-samples/speech-assistant-
  openai-realtime-api-python) on the official ``openai`` SDK, one asyncio process
  (``python bench/phone.py --sdk-bridge API_BASE``) bridging the same fake phones to the same
  local server. It times its paths with the engine's own :class:`engine.phone.bridge.Latency`
  at the same instants, and its calls are counted by the same :func:`level`.

Per level: every call dials, asks for a reply (cmd.say; the baseline: a user item and
response.create, what cmd.say sends) and listens at real pace; after ``--seconds`` all hang up.

Truncation (``--truncations N`` per bridge, one call at a time, by one function
:func:`truncation_trials`): the caller interrupts a long reply after a random 1-3 s of it heard;
the ``audio_end_ms`` each bridge sends is compared with what the fake phone had played when
``clear`` reached it (:func:`truncation_error_ms`). The sample's way: a ``mark`` after every
delta, only to know whether audio is still playing, and ``audio_end_ms`` = the latest inbound
media ``timestamp`` minus the one at the reply's first delta.

Every figure is defined in bench/README.md ("phone").
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import pct  # noqa: E402
from bus import Publisher, Subscriber  # noqa: E402
from engine.config import load_config, session_payload  # noqa: E402
from engine.codec import encode_audio  # noqa: E402
from engine.phone.bridge import Latency  # noqa: E402
from engine.phone.simulator import FRAME_BYTES, FakePhone  # noqa: E402
from engine.specs import SERVER_KEY_ENV  # noqa: E402
from engine.server.voice import synthesize  # noqa: E402
from engine.specs import ApiAccess, BusSpec, PhoneSpec, encode  # noqa: E402

LEVELS = "1,5,10,20,40"
LAYOUTS = ("one_process", "process_per_call", "process_per_core")
BASELINE = "sdk_sample_baseline"
SERVER_SPEED = 4.0       #: the stand-in's delta pacing, x real time (OpenAI sends audio ahead of playback)
CONTROL_SPEED = 1.0      #: the control run's: exactly real time
SAY = "Please tell me about the weather on the coast this weekend"
STORY = ("Tell me a long story about the sea and the ships that sail on it, with many details, please, "
         "one after the other, and the harbours they call at")
INTERRUPT = "Stop please, wait a moment"
#: what each bridge reports per call at its end (the engine in phone.call.ended, the baseline on stdout)
CALL_FIGURES = ("in_latency_p99_ms", "out_latency_p99_ms", "clear_latency_p99_ms", "media_in_late_frames",
                "media_out_late_frames", "media_in_frames", "media_out_frames")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in kB (PSS: shared pages split between the processes sharing them)."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


class BusLog:
    """Every message on the engine's bus with one of ``prefixes``, read on a thread."""

    def __init__(self, conn: dict[str, Any], prefixes: list[str]) -> None:
        self.sub = Subscriber(conn["subscribe"], prefixes)
        self.pub = Publisher(conn["publish"], "bench-phone")
        self.pub.join(conn["subscribe"])
        self.msgs: list[tuple[str, dict[str, Any]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            m = self.sub.recv(timeout_ms=100)
            if m:
                self.msgs.append(m)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)


class SoloBridges:
    """``n`` bridge processes of one call each (the process_per_call layout) on the engine's bus."""

    def __init__(self, n: int, conn: dict[str, Any], bus: BusLog, tmp: Path, max_calls: int = 1) -> None:
        cfg = load_config(None, {"backend": "local"})
        spec = PhoneSpec(config=cfg, session=session_payload(cfg), url=f"{conn['server_url']}?model={cfg['model']}",
                         api=ApiAccess(headers=(f"Authorization: Bearer {conn['server_key']}",)), solo=True,
                         phone={**cfg["phone"], "host": "127.0.0.1", "port": 0, "path": "/twilio", "max_calls": max_calls},
                         bus=BusSpec(publish=conn["publish"], subscribe=conn["subscribe"]))
        path = tmp / "solo-spec.json"
        path.write_bytes(encode(spec))
        os.chmod(path, 0o600)
        t0 = time.monotonic()
        self.procs = [subprocess.Popen([sys.executable, "-m", "engine.phone.process", str(path)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
        self.urls: dict[int, str] = {}
        self.start_ms: list[float] = []
        names = {f"phone:{p.pid}": p.pid for p in self.procs}
        deadline = time.monotonic() + 60 + 2 * n
        while len(self.urls) < n and time.monotonic() < deadline:
            for topic, body in list(bus.msgs):
                pid = names.get(str(body.get("pub")))
                if topic == "phone.status" and pid is not None and pid not in self.urls and body.get("url"):
                    self.urls[pid] = body["url"]
                    self.start_ms.append((time.monotonic() - t0) * 1000)
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a per-call bridge process exited at start")
            time.sleep(0.02)
        if len(self.urls) < n:
            self.close()
            raise RuntimeError(f"only {len(self.urls)} of {n} per-call bridge processes listened")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Calls(Protocol):
    """How the bench drives one bridge's calls and reads what the bridge counted."""

    def up(self) -> set[str]:
        """Call sids whose API session is up."""

    def say(self, call: str, text: str) -> None:
        """Ask ``call``'s model for a reply to ``text`` (a user item and a response)."""

    def ended(self, ids: set[str]) -> list[dict[str, Any]]:
        """The end reports (with :data:`CALL_FIGURES`) of the calls of ``ids`` that have ended."""

    def truncation_sent_ms(self, call: str) -> float | None:
        """The ``audio_end_ms`` of ``call``'s first ``conversation.item.truncate``, once sent."""


class EngineCalls:
    """`engine phone`'s calls, on its bus."""

    def __init__(self, bus: BusLog) -> None:
        self.bus = bus

    def up(self) -> set[str]:
        return {str(b.get("phone_call_id")) for t, b in list(self.bus.msgs) if t == "session.config"}

    def say(self, call: str, text: str) -> None:
        self.bus.pub.publish("cmd.say", {"text": text, "phone_call_id": call, "id": "b-" + call})

    def ended(self, ids: set[str]) -> list[dict[str, Any]]:
        return [b for t, b in list(self.bus.msgs) if t == "phone.call.ended" and b.get("phone_call_id") in ids]

    def truncation_sent_ms(self, call: str) -> float | None:
        return next((float(b["audio_end_ms"]) for t, b in list(self.bus.msgs)
                     if t == "client.conversation.item.truncate" and b.get("phone_call_id") == call), None)


class SdkBaseline:
    """The baseline's process (``bench/phone.py --sdk-bridge``): commands on its stdin, one JSON
    object a line on its stdout (``listening``, ``up``, ``truncate``, ``ended``)."""

    def __init__(self, api_base: str, model: str, server_key: str | None = None) -> None:
        env = {**os.environ, **({SERVER_KEY_ENV: server_key} if server_key else {})}   # the engine's server's key
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--sdk-bridge", api_base,
                                      "--model", model], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.lines: list[dict[str, Any]] = []
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.listening.wait(30):
            self.close()
            raise RuntimeError("the SDK baseline bridge did not listen")
        self.url = next(m["url"] for m in self.lines if m["event"] == "listening")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            self.lines.append(msg)
            if msg["event"] == "listening":
                self.listening.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def up(self) -> set[str]:
        return {m["call"] for m in list(self.lines) if m["event"] == "up"}

    def say(self, call: str, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"say": call, "text": text}) + "\n")
        self.proc.stdin.flush()

    def ended(self, ids: set[str]) -> list[dict[str, Any]]:
        return [m for m in list(self.lines) if m["event"] == "ended" and m["call"] in ids]

    def truncation_sent_ms(self, call: str) -> float | None:
        return next((float(m["audio_end_ms"]) for m in list(self.lines)
                     if m["event"] == "truncate" and m["call"] == call), None)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()    # its end: it stops when stdin closes
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def wait_until(check: Callable[[], bool], timeout_s: float, every_s: float = 0.02) -> bool:
    """Poll ``check`` (the bus and the baseline's stdout are read on threads) until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every_s)
    return True


async def level(urls: list[str], pids: list[int], n: int, seconds: float, calls: Calls,
                extra_pids: dict[str, int]) -> dict[str, Any]:
    """One level: ``n`` calls, call i dialing ``urls[i % len(urls)]``; ``pids``: the bridge processes.
    The engine's layouts and the baseline are counted by this one function."""
    idle_pss_kb = sum(memory_kb(p)[1] for p in pids)
    phones = [FakePhone(urls[i % len(urls)], custom_parameters={"n": str(i)}) for i in range(n)]
    await asyncio.gather(*(p.dial() for p in phones))
    ids = {p.call_sid for p in phones}
    await wait_until(lambda: ids <= calls.up(), 30, 0.05)   # every call's API session is up
    c0 = {p: cpu_s(p) for p in [*pids, *extra_pids.values()]}
    t0 = time.monotonic()
    for p in phones:
        calls.say(p.call_sid, SAY)
    await asyncio.sleep(seconds / 2)
    mem = [memory_kb(p) for p in pids]
    await asyncio.sleep(seconds / 2)
    wall = time.monotonic() - t0
    cpu = {p: cpu_s(p) - c0[p] for p in c0}
    await asyncio.gather(*(p.hang_up() for p in phones))
    await wait_until(lambda: len(calls.ended(ids)) >= n, 15, 0.1)
    ended = calls.ended(ids)

    def values(key: str) -> list[float]:
        return [e[key] for e in ended if e.get(key) is not None]

    def worst(key: str) -> float | None:
        v = values(key)
        return max(v) if v else None

    def median(key: str) -> float | None:
        v = values(key)
        return round(statistics.median(v), 3) if v else None
    bridge_cpu = sum(cpu[p] for p in pids)
    rss_kb, pss_kb = sum(m[0] for m in mem), sum(m[1] for m in mem)
    return {
        "calls": n, "calls_ended": len(ended),
        "cpu_percent": round(100 * bridge_cpu / wall, 1), "cpu_percent_per_call": round(100 * bridge_cpu / wall / n, 2),
        "server_cpu_percent": round(100 * cpu[extra_pids["server"]] / wall, 1) if "server" in extra_pids else None,
        "bench_cpu_percent": round(100 * cpu[extra_pids["bench"]] / wall, 1),
        "rss_mb": round(rss_kb / 1024, 1), "pss_mb": round(pss_kb / 1024, 1),
        "pss_mb_per_call": round(pss_kb / 1024 / n, 2),
        "pss_mb_added_per_call": round((pss_kb - idle_pss_kb) / 1024 / n, 3),
        "media_in_late_frames": int(sum(values("media_in_late_frames"))),
        "media_out_late_frames": int(sum(values("media_out_late_frames"))),
        "phone_late_frames": sum(p.late_frames for p in phones),
        "phone_underruns": sum(p.underruns for p in phones),
        "phone_underrun_ms": sum(p.underrun_frames for p in phones) * 20,
        # each call hears one reply here: a silence over 500 ms with audio after it is a stall, not a reply's end
        "phone_stalls_over_500ms": sum(p.long_silences for p in phones),
        "phone_stall_ms": sum(p.long_silence_frames for p in phones) * 20,
        # the gaps the engine's bridge saw in the marks (phone.call.ended phone_underruns; the baseline has none)
        "bridge_seen_phone_underruns": int(sum(values("phone_underruns"))) if values("phone_underruns") else None,
        "start_hold_ms_max": worst("start_hold_ms_max"),
        "reply_frames_played_min": min(p.played_frames for p in phones) // FRAME_BYTES,
        "reply_frames_played_max": max(p.played_frames for p in phones) // FRAME_BYTES,
        "in_latency_p99_ms_worst": worst("in_latency_p99_ms"), "in_latency_p99_ms_median": median("in_latency_p99_ms"),
        "out_latency_p99_ms_worst": worst("out_latency_p99_ms"),
        "out_latency_p99_ms_median": median("out_latency_p99_ms"),
    }


def run_layout(layout: str, counts: list[int], seconds: float, conn: dict[str, Any], bus: BusLog, url: str,
               tmp: Path) -> list[dict[str, Any]]:
    """Every level of one of the engine's layouts."""
    phone_pid = next(c["pid"] for c in conn["children"] if c["name"] == "phone")
    extra = extra_pids(conn)
    engine = EngineCalls(bus)
    out = []
    for n in counts:
        if layout == "one_process":
            out.append(asyncio.run(level([url], [phone_pid], n, seconds, engine, extra)))
            continue
        per_call = layout == "process_per_call"
        solo = SoloBridges(n if per_call else os.cpu_count() or 2, conn, bus, tmp, 1 if per_call else 100)
        try:
            row = asyncio.run(level([solo.urls[p] for p in solo.pids], solo.pids, n, seconds, engine, extra))
            if per_call:
                row["process_start_ms_median"] = round(statistics.median(solo.start_ms), 1)
            out.append(row)
        finally:
            solo.close()
    return out


def run_baseline(counts: list[int], seconds: float, conn: dict[str, Any]) -> list[dict[str, Any]]:
    """Every level through the SDK baseline (a fresh process for each run)."""
    sdk = SdkBaseline(api_base(conn), load_config(None, {})["model"], conn.get("server_key"))
    try:
        return [asyncio.run(level([sdk.url], [sdk.pid], n, seconds, sdk, extra_pids(conn))) for n in counts]
    finally:
        sdk.close()


def extra_pids(conn: dict[str, Any]) -> dict[str, int]:
    server = [c["pid"] for c in conn["children"] if c["name"] == "server"]
    return {"bench": os.getpid(), **({"server": server[0]} if server else {})}


def api_base(conn: dict[str, Any]) -> str:
    """The local server's base URL as the SDK takes it (``websocket_base_url``; it adds /realtime)."""
    return str(conn["server_url"]).rsplit("/realtime", 1)[0]


# ------------------------------------------------------------------ truncation
def truncation_error_ms(audio_end_ms: float, phone: FakePhone) -> float:
    """``audio_end_ms`` sent minus what the fake phone had played of the reply when the (first)
    ``clear`` reached it (ms; > 0: the bridge said more was heard than was). Both bridges' figure."""
    assert phone.clears, "no clear reached the phone"
    return audio_end_ms - phone.clears[0].played_frames / 8


def interrupt_speech() -> bytes:
    import numpy as np
    pcm = synthesize(INTERRUPT, "alloy", 1.0)
    pad = np.zeros(2400, dtype=np.int16)
    return encode_audio(np.concatenate([pad, pcm, pad]), "audio/pcmu")


async def interrupt_after(phone: FakePhone, heard_s: float, speech: bytes) -> None:
    """Wait until ``heard_s`` of the reply has played at the phone, then speak over it."""
    await asyncio.wait_for(phone.got_audio.wait(), 30)
    await wait_until(lambda: phone.played_frames >= heard_s * 8000, 30, 0.005)
    await phone.say(speech)


def p99(values: list[float]) -> float | None:
    """The nearest-rank p99 (bench/README.md's p50 / p99: ``bench.run.pct``, as the bridge's
    ``Latency.p99_ms`` takes it); None when nothing was measured."""
    return pct(values, 99) if values else None


async def barge_in(url: str, calls: Calls, heard_s: float, speech: bytes) -> tuple[float | None, float | None]:
    """One call through one bridge: a long reply interrupted after ``heard_s`` of it played;
    returns (truncation error ms, the call's speech_started -> clear ms), None where not seen."""
    phone = await FakePhone(url).dial()
    call = phone.call_sid
    await wait_until(lambda: call in calls.up(), 20)
    calls.say(call, STORY)
    await interrupt_after(phone, heard_s, speech)
    await wait_until(lambda: calls.truncation_sent_ms(call) is not None and bool(phone.clears), 10)
    sent = calls.truncation_sent_ms(call)
    err = truncation_error_ms(sent, phone) if sent is not None and phone.clears else None
    await phone.hang_up()
    await wait_until(lambda: bool(calls.ended({call})), 10)
    ended = calls.ended({call})
    clear = ended[0].get("clear_latency_p99_ms") if ended else None
    return err, (float(clear) if clear is not None else None)


async def truncation_trials(url: str, calls: Calls, cuts: list[float], speech: bytes) -> dict[str, Any]:
    """One barge-in per cut, one call at a time, through one bridge: the truncation errors and
    speech_started -> clear. The engine and the baseline are counted by this one function."""
    errs: list[float] = []
    clear_ms: list[float] = []
    for heard_s in cuts:
        err, clear = await barge_in(url, calls, heard_s, speech)
        if err is not None:
            errs.append(err)
        if clear is not None:
            clear_ms.append(clear)
    a = sorted(abs(e) for e in errs)
    worst_clear = p99(clear_ms)
    return {"trials": len(cuts), "truncations": len(errs), "clears_timed": len(clear_ms),
            "clear_latency_p99_ms": round(worst_clear, 3) if worst_clear is not None else None,
            "clear_latency_ms_max": round(max(clear_ms), 3) if clear_ms else None,
            "abs_error_ms_median": round(statistics.median(a), 1) if a else None,
            "abs_error_ms_p99": round(p99(a) or 0.0, 1) if a else None,
            "abs_error_ms_max": round(a[-1], 1) if a else None,
            "error_ms_mean": round(statistics.fmean(errs), 1) if errs else None,
            "errors_ms": [round(e, 1) for e in errs]}


async def truncations(url: str, conn: dict[str, Any], bus: BusLog, trials: int, seed: int) -> dict[str, Any]:
    """``trials`` barge-ins through `engine phone` and as many through the SDK baseline, at the same cuts."""
    speech = await asyncio.to_thread(interrupt_speech)
    rng = random.Random(seed)
    cuts = [rng.uniform(1.0, 3.0) for _ in range(trials)]
    out: dict[str, Any] = {"cut_after_s": [round(c, 2) for c in cuts]}
    out["engine"] = await truncation_trials(url, EngineCalls(bus), cuts, speech)
    sdk = await asyncio.to_thread(SdkBaseline, api_base(conn), load_config(None, {})["model"], conn.get("server_key"))
    try:
        out[BASELINE] = await truncation_trials(sdk.url, sdk, cuts, speech)
    finally:
        await asyncio.to_thread(sdk.close)
    return out


# ------------------------------------------------------------------ the SDK baseline's process
def b64_bytes(text: str) -> int:
    """Bytes a base64 string decodes to (without decoding it)."""
    return len(text) * 3 // 4 - (len(text) - len(text.rstrip("=")))


class SampleBridge:
    """The most-forked Twilio sample's bridge, on the official openai SDK (AsyncOpenAI
    ``realtime.connect``), to the same local server: what it does per message and on barge-in.

    Timed like the engine's bridge, with its :class:`Latency`: phone frame taken off the Twilio
    socket -> its ``input_audio_buffer.append`` handed to the API socket (the SDK's send returned);
    API message taken off the API socket (``recv_bytes`` returned, before the SDK parses it) -> each
    ``media`` message handed to the Twilio socket, noted once per 20 ms frame it carries (the
    sample sends each delta whole); speech_started taken off the API socket -> ``clear`` handed to
    the Twilio socket. ``emit`` gets ``up``, ``truncate`` and ``ended`` (the figures of
    :data:`CALL_FIGURES`) per call."""

    def __init__(self, api_base: str, model: str, emit: Callable[[dict[str, Any]], None]) -> None:
        from openai import AsyncOpenAI
        self.client = AsyncOpenAI(api_key=os.environ.get(SERVER_KEY_ENV) or "sk-local", websocket_base_url=api_base)
        self.model = model
        self.emit = emit
        self.conns: dict[str, Any] = {}      # call sid -> its SDK connection

    async def say(self, call: str, text: str) -> None:
        """The sample's "AI speaks first" (send_initial_conversation_item): a user item, a response."""
        conn = self.conns.get(call)
        if conn is None:
            return
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": text}]})
        await conn.response.create()

    async def handle(self, ws: Any) -> None:
        in_latency, out_latency, clear_latency = Latency(), Latency(), Latency()
        counts = {"media_in_frames": 0}
        out_bytes = {"n": 0}
        state: dict[str, Any] = {"sid": None, "call": None, "latest_ts": 0, "start_ts": None, "item": None,
                                 "marks": [], "event_in_s": 0.0}
        async with self.client.realtime.connect(model=self.model) as conn:
            recv_bytes = conn.recv_bytes

            async def stamped() -> bytes:          # the instant a message is taken off the API socket
                data: bytes = await recv_bytes()
                state["event_in_s"] = time.monotonic()
                return data
            conn.recv_bytes = stamped   # type: ignore[method-assign]
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
                "output": {"format": {"type": "audio/pcmu"}}}})

            async def from_twilio() -> None:
                async for text in ws:
                    frame_in_s = time.monotonic()
                    msg = json.loads(text)
                    if msg["event"] == "start":
                        state["sid"], state["call"] = msg["start"]["streamSid"], msg["start"]["callSid"]
                        self.conns[state["call"]] = conn
                        self.emit({"event": "up", "call": state["call"]})
                    elif msg["event"] == "media":
                        state["latest_ts"] = int(msg["media"]["timestamp"])
                        await conn.input_audio_buffer.append(audio=msg["media"]["payload"])
                        counts["media_in_frames"] += 1
                        in_latency.note((time.monotonic() - frame_in_s) * 1e6)
                    elif msg["event"] == "mark" and state["marks"]:
                        state["marks"].pop(0)
                    elif msg["event"] == "stop":
                        return

            async def to_twilio() -> None:
                async for ev in conn:
                    event_in_s = state["event_in_s"]
                    if ev.type == "response.output_audio.delta":
                        await ws.send(json.dumps({"event": "media", "streamSid": state["sid"],
                                                  "media": {"payload": ev.delta}}))
                        sent_us = (time.monotonic() - event_in_s) * 1e6
                        n_bytes = b64_bytes(ev.delta)
                        out_bytes["n"] += n_bytes
                        out_latency.note(sent_us, -(-n_bytes // FRAME_BYTES))   # per 20 ms frame (or part)
                        if state["start_ts"] is None:
                            state["start_ts"] = state["latest_ts"]
                        state["item"] = ev.item_id
                        await ws.send(json.dumps({"event": "mark", "streamSid": state["sid"],
                                                  "mark": {"name": "responsePart"}}))
                        state["marks"].append("responsePart")
                    elif ev.type == "input_audio_buffer.speech_started":
                        if state["marks"] and state["start_ts"] is not None:
                            elapsed = state["latest_ts"] - state["start_ts"]
                            if state["item"]:
                                await conn.conversation.item.truncate(item_id=state["item"], content_index=0,
                                                                      audio_end_ms=elapsed)
                                self.emit({"event": "truncate", "call": state["call"], "audio_end_ms": elapsed})
                            await ws.send(json.dumps({"event": "clear", "streamSid": state["sid"]}))
                            clear_latency.note((time.monotonic() - event_in_s) * 1e6)
                            state["marks"].clear()
                            state["item"], state["start_ts"] = None, None
            tasks = [asyncio.ensure_future(from_twilio()), asyncio.ensure_future(to_twilio())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                self.conns.pop(state["call"], None)
                self.emit({"event": "ended", "call": state["call"], **counts,
                           "media_out_frames": out_bytes["n"] // FRAME_BYTES,
                           "in_latency_p99_ms": in_latency.p99_ms(), "out_latency_p99_ms": out_latency.p99_ms(),
                           "clear_latency_p99_ms": clear_latency.p99_ms(),
                           "media_in_late_frames": in_latency.late, "media_out_late_frames": out_latency.late})


async def sdk_bridge_main(api_base_url: str, model: str) -> None:
    """``bench/phone.py --sdk-bridge``: serve Twilio calls with :class:`SampleBridge` until stdin
    closes; ``{"say": call sid, "text": ...}`` lines on stdin ask a call's model for a reply."""
    from websockets.asyncio.server import serve

    def emit(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()
    bridge = SampleBridge(api_base_url, model, emit)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            asyncio.run_coroutine_threadsafe(bridge.say(cmd["say"], cmd["text"]), loop)
        loop.call_soon_threadsafe(done.set)
    async with serve(bridge.handle, "127.0.0.1", 0, compression=None, ping_interval=None) as server:
        port = list(server.sockets)[0].getsockname()[1]
        emit({"event": "listening", "url": f"ws://127.0.0.1:{port}/"})
        threading.Thread(target=read_stdin, daemon=True).start()
        await done.wait()


# ------------------------------------------------------------------ the whole run
def level_on_time(r: dict[str, Any]) -> bool:
    """Every call ended and played the whole reply, the bridge sent no media frame late (in or
    out) and nothing underran or stalled at the phones."""
    return (r["calls_ended"] == r["calls"] and r["reply_frames_played_min"] == r["reply_frames_played_max"]
            and r["media_in_late_frames"] == 0 and r["media_out_late_frames"] == 0 and r["phone_underruns"] == 0
            and r["phone_stalls_over_500ms"] == 0)


def on_time(levels: list[dict[str, Any]]) -> int:
    """The largest level that is on time with every smaller level of the run on time too (0: the
    smallest is not)."""
    best = 0
    for r in sorted(levels, key=lambda r: r["calls"]):
        if not level_on_time(r):
            break
        best = r["calls"]
    return best


#: how the baseline's figures relate to the engine's (bench/README.md, "phone")
BASELINE_NOTES = {
    "counted_by": "the same level(), truncation_trials(), truncation_error_ms() and engine.phone.bridge.Latency",
    "in_latency": "same instants: the media message taken off the Twilio socket -> the SDK's append returned "
                  "(it awaits the same websockets send)",
    "out_latency": "from the SDK's recv_bytes returned (before its parsing) -> the media message sent; "
                   "noted per 20 ms frame it carries, as the engine",
    "clear_latency": "the sample sends conversation.item.truncate before clear (the engine: clear first), "
                     "so its figure includes that send",
    "pss_mb_added_per_call": "its first call imports the SDK's realtime modules (about 6.5 MB): read it at 5+ calls",
    "not_measured": "nothing of the engine's figures: the sample has no bus, so its per-call figures come on "
                    "its stdout instead of phone.call.ended",
}


@dataclass
class PhoneEngine:
    """A running `engine phone` (broker, local server, its phone process) and the bench's view of it."""
    url: str                      #: where the fake phones dial
    conn: dict[str, Any]          #: its connection file
    bus: BusLog
    tmp: Path                     #: its folder (runtime, data)


@contextmanager
def phone_engine(server_speed: float, prefixes: list[str], config: str | None = None) -> Iterator[PhoneEngine]:
    """Start `engine phone --backend local` (the local server at ``server_speed``; ``config``: a YAML
    config's text), read its bus (``prefixes``), stop it at the end. Twilio's signature is checked
    (``phone.auth: twilio``): ``$TWILIO_AUTH_TOKEN`` is set to a fresh token meanwhile, which the fake
    phones sign with."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-phone-"))
    run = tmp / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "REALTALK_RUNTIME_DIR": str(run), "XDG_DATA_HOME": str(tmp / "data"),
           "TWILIO_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("OPENAI_API_KEY", None)
    args = [sys.executable, "-m", "engine.api.cli", "phone", "--backend", "local", "--port", "0",
            "--speed", str(server_speed)]
    if config is not None:
        (tmp / "engine.yaml").write_text(config)
        args += ["--config", str(tmp / "engine.yaml")]
    saved = {k: os.environ.get(k) for k in ("REALTALK_RUNTIME_DIR", "XDG_DATA_HOME", "TWILIO_AUTH_TOKEN")}
    os.environ.update({k: env[k] for k in saved})
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp))
    bus: BusLog | None = None
    try:
        url = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"phone calls at (ws://\S+)", line)
            if m:
                url = m.group(1)
                break
        if not url:
            raise RuntimeError(f"engine phone exited with {proc.wait()} before it listened")
        threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
        conn = json.loads((run / "engine.json").read_text())
        bus = BusLog(conn, prefixes)
        yield PhoneEngine(url, conn, bus, tmp)
    finally:
        if bus is not None:
            bus.close()
        proc.send_signal(2)
        proc.wait(30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(counts: list[int], seconds: float, runs: int, layouts: list[str], trials: int = 0,
            server_speed: float = SERVER_SPEED, baseline: bool = True) -> dict[str, Any]:
    """Start `engine phone` (broker, local server at ``server_speed``, the one-process bridge) and
    run every layout and the baseline ``runs`` times, interleaved (run 1 of each, then run 2)."""
    out: dict[str, Any] = {"server_speed": server_speed,
                           "machine": {"cpus": os.cpu_count(), "loadavg_at_start": list(os.getloadavg())},
                           "seconds_per_level": seconds, "runs": {}}
    names = [*layouts, *([BASELINE] if baseline else [])]
    if baseline:
        out["baseline_notes"] = BASELINE_NOTES
    with phone_engine(server_speed, ["phone.", "session.config", "client.conversation.item.truncate"]) as eng:
        for _ in range(runs):
            for name in names:
                levels = (run_baseline(counts, seconds, eng.conn) if name == BASELINE
                          else run_layout(name, counts, seconds, eng.conn, eng.bus, eng.url, eng.tmp))
                out["runs"].setdefault(name, []).append(levels)
        for name in names:
            out[f"{name}_max_calls_on_time"] = [on_time(r) for r in out["runs"][name]]
        if trials:
            out["truncation"] = asyncio.run(truncations(eng.url, eng.conn, eng.bus, trials, seed=13))
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    return out


# ------------------------------------------------------------------ a reply's first delta to the phone (issue 25)
LINKS = (("clean", 0.0), ("jitter30", 30.0))   #: (name, the local server's delta_jitter_ms), at real time
HOLD_MODES = ("adaptive", "fixed")             #: audio.jitter_buffer: the start hold follows the call's jitter, or not
HOLD_MS = 60                                   #: audio.prebuffer_ms: the fixed hold, and the adaptive one's start
FIRST_DELTA_TURNS = 10                         #: replies per session after a warm-up
REPLY = "The sea is wide and the ships are many, and every sailor knows the way home."   #: the conversation suite's
BETWEEN_REPLIES_S = 0.6   #: after a reply has played: the phone's silence then is over 500 ms, a reply's end, no gap


def first_delta_figures(turns: list[dict[str, Any]], phone: FakePhone) -> dict[str, Any]:
    """Per reply (``turns``: each its ``arrival_s``, the bridge's ``start_delay_ms``): the reply's first
    delta taken by the bridge's core -> the first media message the fake phone received after it, and
    -> the player tick that began playing it; p50 / p99 / max of each, ms."""
    to_phone: list[float] = []
    to_playout: list[float] = []
    for t in turns:
        got = next((s for s in phone.media_in_s if s >= t["arrival_s"]), None)
        began = next((s for s in phone.audio_began_s if s >= t["arrival_s"]), None)
        if got is not None:
            to_phone.append((got - t["arrival_s"]) * 1000)
        if began is not None:
            to_playout.append((began - t["arrival_s"]) * 1000)
    delays = [float(t["start_delay_ms"]) for t in turns if t.get("start_delay_ms") is not None]

    def three(name: str, v: list[float]) -> dict[str, Any]:
        return {f"{name}_p50": rounded(pct(v, 50) if v else None), f"{name}_p99": rounded(pct(v, 99) if v else None),
                f"{name}_max": rounded(max(v) if v else None)}
    return {"replies": len(turns), **three("first_delta_to_phone_ms", to_phone),
            **three("first_delta_to_playout_ms", to_playout), **three("start_delay_ms", delays)}


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def call_msgs(bus: BusLog, call: str, since: int, topic: str) -> list[dict[str, Any]]:
    """``topic`` messages of ``call`` logged from index ``since`` on."""
    return [b for t, b in list(bus.msgs)[since:] if t == topic and b.get("phone_call_id") == call]


def reply_played(bus: BusLog, call: str, since: int) -> bool:
    """Since index ``since``, ``call``'s reply started, played to its end and had its latency.turn."""
    return all(call_msgs(bus, call, since, t) for t in ("playout.started", "playout.stopped", "latency.turn"))


async def first_delta_call(eng: PhoneEngine, turns: int) -> dict[str, Any]:
    """One call through `engine phone`: a warm-up reply, then ``turns`` replies one after another,
    each asked once the last has played (its end mark came back) and ``BETWEEN_REPLIES_S`` passed."""
    bus = eng.bus
    phone = await FakePhone(eng.url).dial()
    call = phone.call_sid
    try:
        if not await wait_until(lambda: call in EngineCalls(bus).up(), 30):
            raise RuntimeError("the call's API session did not come up")
        measured: list[dict[str, Any]] = []
        warm: dict[str, Any] = {}
        before = (0, 0, 0)
        mark_all = len(bus.msgs)
        for n in range(turns + 1):
            if n == 1:   # the warm-up is over: count the phone's gaps from here
                before = (phone.underruns, phone.underrun_frames, phone.long_silences)
                mark_all = len(bus.msgs)
            mark = len(bus.msgs)
            bus.pub.publish("cmd.say", {"text": f"Turn {n}", "phone_call_id": call, "id": f"fd-{call}-{n}"})
            if not await wait_until(functools.partial(reply_played, bus, call, mark), 30):
                raise RuntimeError(f"reply {n} did not play to its end within 30 s")
            started = call_msgs(bus, call, mark, "playout.started")[0]
            lat = call_msgs(bus, call, mark, "latency.turn")[0]
            # the core's instant of the first delta: latency.turn counts from it to playout.started's stamp
            turn = {"arrival_s": started["first_sample_mono_ns"] / 1e9 - float(lat["first_delta_to_device_ms"]) / 1000,
                    "start_delay_ms": started.get("output_latency_ms"),
                    "delta_interval_ms_std": lat.get("delta_interval_ms_std"),
                    "delta_interval_ms_max": lat.get("delta_interval_ms_max"), "deltas": lat.get("deltas")}
            if n == 0:
                warm = turn
            else:
                measured.append(turn)
            await asyncio.sleep(BETWEEN_REPLIES_S)
        after = (phone.underruns, phone.underrun_frames, phone.long_silences)
        bridge_gaps = call_msgs(bus, call, mark_all, "phone.underrun")
    finally:
        await phone.hang_up()
    out = first_delta_figures(measured, phone)
    first = first_delta_figures([warm], phone)
    out.update({
        "first_reply_first_delta_to_phone_ms": first["first_delta_to_phone_ms_p50"],
        "first_reply_first_delta_to_playout_ms": first["first_delta_to_playout_ms_p50"],
        "first_reply_start_delay_ms": first["start_delay_ms_p50"],
        # gaps at the fake phone (a dry spell of at most 500 ms that audio came back after), the replies after the warm-up
        "phone_underruns": after[0] - before[0], "phone_underrun_ms": (after[1] - before[1]) * 20,
        # each reply follows a pause of over 500 ms (a long silence each): more are stalls inside replies
        "phone_stalls_over_500ms": max(0, after[2] - before[2] - turns),
        "bridge_seen_phone_underruns": len(bridge_gaps),
        "delta_interval_ms_std_p50": rounded(statistics.median([float(t["delta_interval_ms_std"]) for t in measured
                                                                 if t["delta_interval_ms_std"] is not None] or [0.0])),
        "delta_interval_ms_max": max((float(t["delta_interval_ms_max"]) for t in measured
                                      if t["delta_interval_ms_max"] is not None), default=None),
        "deltas_per_reply_p50": pct([float(t["deltas"]) for t in measured if t["deltas"] is not None], 50)
        if measured else None})
    return out


def first_delta_session(mode: str, jitter_ms: float, turns: int) -> dict[str, Any]:
    """`engine phone` with ``audio.jitter_buffer: mode`` and ``audio.prebuffer_ms: HOLD_MS``, its local
    server at real time with deltas up to |N(0, ``jitter_ms``)| late (seed 7): :func:`first_delta_call`."""
    scen = Path(tempfile.mkdtemp(prefix="bench-phone-scen-")) / "jitter.yaml"
    scen.write_text(f'default_reply: "{REPLY}"\nfaults: {{delta_jitter_ms: {jitter_ms}, seed: 7}}\n')
    config = (f"audio: {{jitter_buffer: {mode}, prebuffer_ms: {HOLD_MS}}}\n"
              f"local_server: {{asr: false, scenario: {scen}}}\n")
    with phone_engine(1.0, ["phone.", "session.config", "playout.", "latency."], config) as eng:
        return asyncio.run(first_delta_call(eng, turns))


def bench_first_delta(turns: int = FIRST_DELTA_TURNS, modes: tuple[str, ...] = HOLD_MODES) -> dict[str, Any]:
    """:func:`first_delta_session` for each link (clean, 30 ms jitter) and hold mode, one after another:
    ``<mode>_<figure>_<link>``, and the issue's names ``engine_first_delta_to_device_ms_p99_<link>`` (the
    adaptive hold's first delta -> the phone's playout; ``..._fixed``: the fixed hold's)."""
    out: dict[str, Any] = {"first_delta_turns": turns, "first_delta_hold_ms": HOLD_MS,
                           "first_delta_loadavg_at_start": list(os.getloadavg())}
    for link, jitter in LINKS:
        for mode in modes:
            got = first_delta_session(mode, jitter, turns)
            out.update({f"{mode}_{k}_{link}": v for k, v in got.items()})
        for mode in modes:
            suffix = "" if mode == "adaptive" else f"_{mode}"
            out[f"engine_first_delta_to_device_ms_p99_{link}{suffix}"] = out[f"{mode}_first_delta_to_playout_ms_p99_{link}"]
    out["first_delta_loadavg_at_end"] = list(os.getloadavg())
    return out


def full(counts: list[int], seconds: float, runs: int, layouts: list[str], trials: int, speed: float,
         control_speed: float | None, first_delta_turns: int = FIRST_DELTA_TURNS) -> dict[str, Any]:
    """The run at ``speed``, then (unless None) the control: one_process and the baseline, one run,
    at ``control_speed``; then (unless 0 turns) a reply's first delta to the phone, adaptive and
    fixed hold, clean and at 30 ms jitter (:func:`bench_first_delta`)."""
    out = measure(counts, seconds, runs, layouts, trials, speed) if counts else {}
    if control_speed is not None and counts:
        control_layouts = [x for x in layouts if x == "one_process"]
        out["control"] = measure(counts, seconds, 1, control_layouts, 0, control_speed)
    if first_delta_turns > 0:
        out.update(bench_first_delta(first_delta_turns))
    return out


def run(first_delta_turns: int = FIRST_DELTA_TURNS) -> dict[str, Any]:
    """``python bench/run.py phone``: every level, layout and the baseline twice at speed 4, the
    truncation comparison, the control at speed 1, and the first delta's wait to the phone."""
    return full([int(x) for x in LEVELS.split(",")], 8.0, 2, list(LAYOUTS), 10, SERVER_SPEED, CONTROL_SPEED,
                first_delta_turns)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", default=LEVELS)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=2, help="each layout's levels this many times (a loaded machine)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="the engine's layouts (the baseline always runs)")
    ap.add_argument("--truncations", type=int, default=10, help="barge-ins per bridge (engine, SDK sample); 0: skip")
    ap.add_argument("--speed", type=float, default=SERVER_SPEED, help="the local server's delta pacing, x real time")
    ap.add_argument("--control-speed", type=float, default=CONTROL_SPEED,
                    help="the control run's pacing (one_process and the baseline, one run); 0: no control")
    ap.add_argument("--first-delta-turns", type=int, default=FIRST_DELTA_TURNS,
                    help="replies per session of the first delta's wait to the phone (4 sessions); 0: skip")
    ap.add_argument("--sdk-bridge", metavar="API_BASE", help=argparse.SUPPRESS)   # the baseline's own process
    ap.add_argument("--model", default="gpt-realtime", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.sdk_bridge:
        asyncio.run(sdk_bridge_main(args.sdk_bridge, args.model))
        return 0
    layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        ap.error(f"unknown layout {bad}; choose from {', '.join(LAYOUTS)}")
    counts = [int(x) for x in args.calls.split(",") if x]   # none (--calls ''): only the first delta's wait
    out = full(counts, args.seconds, args.runs, layouts, args.truncations, args.speed, args.control_speed or None,
               args.first_delta_turns)
    print(json.dumps(out, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
