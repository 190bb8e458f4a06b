"""Bench: phone calls at once through `engine phone` with the fake Twilio phone, local server at real
time, in two process layouts side by side. Prints JSON (``--json``: one line).

    python bench/phone.py [--calls 1,5,10,20,40] [--seconds 8] [--runs 2] [--layouts one_process,process_per_call]
    python bench/run.py phone [--json]        (the same, from the benchmark runner)

Layouts:
- ``one_process``: what `engine phone` does: one asyncio phone process holding every call's two
  WebSockets and a RealtimeCore per call.
- ``process_per_call``: each call's whole bridge (its Twilio socket, core and API socket) in a
  process of its own: ``python -m engine.phone.process`` per call with ``phone.solo`` (it leaves
  other calls' commands alone and publishes no status each second), started before the call
  dials. A real per-call layout also needs a front to route each call to its process (a hop
  more), so its figures here are a lower bound of that layout's cost.
- ``process_per_core``: as many one-process bridges as the machine has cores (``phone.solo``),
  calls dealt out in turn: what several `engine phone` workers behind haproxy are on one machine.

Per level: every call dials, asks for a reply (cmd.say) and listens at real pace; after
``--seconds`` all hang up.

Truncation (``--truncations N``, one call at a time): the caller interrupts a long reply after a
random 1-3 s of it heard; the ``audio_end_ms`` each bridge sends is compared with what the fake
phone had played when ``clear`` reached it, by one function (:func:`truncation_error_ms`). The
baseline is the most-forked Twilio sample's pattern (twilio-samples/speech-assistant-openai-
realtime-api-python) on the official ``openai`` SDK, in this process: a ``mark`` after every
delta, only to know whether audio is still playing, and ``audio_end_ms`` = the latest inbound
media ``timestamp`` minus the one at the reply's first delta.

Every figure is defined in bench/README.md ("phone").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus import Publisher, Subscriber  # noqa: E402
from engine.config import load_config, session_payload  # noqa: E402
from engine.codec import encode_audio  # noqa: E402
from engine.phone.simulator import FakePhone  # noqa: E402
from engine.server.voice import synthesize  # noqa: E402

LEVELS = "1,5,10,20,40"
LAYOUTS = ("one_process", "process_per_call", "process_per_core")
SAY = "Please tell me about the weather on the coast this weekend"
STORY = ("Tell me a long story about the sea and the ships that sail on it, with many details, please, "
         "one after the other, and the harbours they call at")
INTERRUPT = "Stop please, wait a moment"


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
        spec = {"config": cfg, "session": session_payload(cfg),
                "url": f"{conn['server_url']}?model={cfg['model']}", "headers": ["Authorization: Bearer local"],
                "phone": {"host": "127.0.0.1", "port": 0, "path": "/twilio", "solo": True, "max_calls": max_calls},
                "bus": {"publish": conn["publish"], "subscribe": conn["subscribe"]}}
        path = tmp / "solo-spec.json"
        path.write_text(json.dumps(spec))
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


async def level(urls: list[str], pids: list[int], n: int, seconds: float, bus: BusLog,
                extra_pids: dict[str, int]) -> dict[str, Any]:
    """One level: ``n`` calls, call i dialing ``urls[i % len(urls)]``; ``pids``: the bridge processes."""
    idle_pss_kb = sum(memory_kb(p)[1] for p in pids)
    phones = [FakePhone(urls[i % len(urls)], custom_parameters={"n": str(i)}) for i in range(n)]
    await asyncio.gather(*(p.dial() for p in phones))
    ids = {p.call_sid for p in phones}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # every call's API session is up
        up = {b.get("phone_call_id") for t, b in list(bus.msgs) if t == "session.config"}
        if ids <= up:
            break
        await asyncio.sleep(0.05)
    c0 = {p: cpu_s(p) for p in [*pids, *extra_pids.values()]}
    t0 = time.monotonic()
    for p in phones:
        bus.pub.publish("cmd.say", {"text": SAY, "phone_call_id": p.call_sid, "id": "b-" + p.call_sid})
    await asyncio.sleep(seconds / 2)
    mem = [memory_kb(p) for p in pids]
    await asyncio.sleep(seconds / 2)
    wall = time.monotonic() - t0
    cpu = {p: cpu_s(p) - c0[p] for p in c0}
    await asyncio.gather(*(p.hang_up() for p in phones))
    deadline = time.monotonic() + 15
    ended: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(ended) < n:
        ended = [b for t, b in list(bus.msgs) if t == "phone.call.ended" and b.get("phone_call_id") in ids]
        await asyncio.sleep(0.1)

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
        "reply_frames_played_min": min(p.played_frames for p in phones) // 160,
        "in_latency_p99_ms_worst": worst("in_latency_p99_ms"), "in_latency_p99_ms_median": median("in_latency_p99_ms"),
        "out_latency_p99_ms_worst": worst("out_latency_p99_ms"),
        "out_latency_p99_ms_median": median("out_latency_p99_ms"),
    }


def run_layout(layout: str, counts: list[int], seconds: float, conn: dict[str, Any], bus: BusLog, url: str,
               tmp: Path) -> list[dict[str, Any]]:
    """Every level of one layout."""
    phone_pid = next(c["pid"] for c in conn["children"] if c["name"] == "phone")
    server = [c["pid"] for c in conn["children"] if c["name"] == "server"]
    extra = {"bench": os.getpid(), **({"server": server[0]} if server else {})}
    out = []
    for n in counts:
        if layout == "one_process":
            out.append(asyncio.run(level([url], [phone_pid], n, seconds, bus, extra)))
            continue
        per_call = layout == "process_per_call"
        solo = SoloBridges(n if per_call else os.cpu_count() or 2, conn, bus, tmp, 1 if per_call else 100)
        try:
            row = asyncio.run(level([solo.urls[p] for p in solo.pids], solo.pids, n, seconds, bus, extra))
            if per_call:
                row["process_start_ms_median"] = round(statistics.median(solo.start_ms), 1)
            out.append(row)
        finally:
            solo.close()
    return out


# ------------------------------------------------------------------ truncation, and the SDK baseline
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
    deadline = time.monotonic() + 30
    while phone.played_frames < heard_s * 8000 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await phone.say(speech)


class SampleBridge:
    """The most-forked Twilio sample's bridge, on the official openai SDK (AsyncOpenAI
    ``realtime.connect``), to the same local server: what it does on barge-in, nothing more."""

    def __init__(self, api_base: str, model: str) -> None:
        from openai import AsyncOpenAI
        self.client = AsyncOpenAI(api_key="sk-local", websocket_base_url=api_base)
        self.model = model
        self.sent_audio_end_ms: dict[str, float] = {}    # call sid -> the truncation's audio_end_ms
        self.clear_ms: dict[str, float] = {}             # call sid -> speech_started in -> clear sent

    async def handle(self, ws: Any) -> None:
        async with self.client.realtime.connect(model=self.model) as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "audio": {
                "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
                "output": {"format": {"type": "audio/pcmu"}}}})
            state: dict[str, Any] = {"sid": None, "call": None, "latest_ts": 0, "start_ts": None, "item": None,
                                     "marks": []}

            async def from_twilio() -> None:
                async for text in ws:
                    msg = json.loads(text)
                    if msg["event"] == "start":
                        state["sid"], state["call"] = msg["start"]["streamSid"], msg["start"]["callSid"]
                        # the sample's "AI speaks first": an item and a response at the start
                        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                            {"type": "input_text", "text": STORY}]})
                        await conn.response.create()
                    elif msg["event"] == "media":
                        state["latest_ts"] = int(msg["media"]["timestamp"])
                        await conn.input_audio_buffer.append(audio=msg["media"]["payload"])
                    elif msg["event"] == "mark" and state["marks"]:
                        state["marks"].pop(0)
                    elif msg["event"] == "stop":
                        return

            async def to_twilio() -> None:
                async for ev in conn:
                    if ev.type == "response.output_audio.delta":
                        await ws.send(json.dumps({"event": "media", "streamSid": state["sid"],
                                                  "media": {"payload": ev.delta}}))
                        if state["start_ts"] is None:
                            state["start_ts"] = state["latest_ts"]
                        state["item"] = ev.item_id
                        await ws.send(json.dumps({"event": "mark", "streamSid": state["sid"],
                                                  "mark": {"name": "responsePart"}}))
                        state["marks"].append("responsePart")
                    elif ev.type == "input_audio_buffer.speech_started":
                        heard_at = time.monotonic()
                        if state["marks"] and state["start_ts"] is not None:
                            elapsed = state["latest_ts"] - state["start_ts"]
                            if state["item"]:
                                await conn.conversation.item.truncate(item_id=state["item"], content_index=0,
                                                                      audio_end_ms=elapsed)
                                self.sent_audio_end_ms.setdefault(state["call"], elapsed)
                            await ws.send(json.dumps({"event": "clear", "streamSid": state["sid"]}))
                            self.clear_ms.setdefault(state["call"], (time.monotonic() - heard_at) * 1000)
                            state["marks"].clear()
                            state["item"], state["start_ts"] = None, None
            tasks = [asyncio.ensure_future(from_twilio()), asyncio.ensure_future(to_twilio())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()


async def truncations(url: str, conn: dict[str, Any], bus: BusLog, trials: int, seed: int) -> dict[str, Any]:
    """``trials`` barge-ins through `engine phone` and as many through the sample's bridge."""
    from websockets.asyncio.server import serve
    speech = await asyncio.to_thread(interrupt_speech)
    rng = random.Random(seed)
    cuts = [rng.uniform(1.0, 3.0) for _ in range(trials)]
    engine_err: list[float] = []
    engine_clear: list[float] = []
    for heard_s in cuts:
        phone = await FakePhone(url).dial()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                t == "session.config" and b.get("phone_call_id") == phone.call_sid for t, b in list(bus.msgs)):
            await asyncio.sleep(0.02)
        bus.pub.publish("cmd.say", {"text": STORY, "phone_call_id": phone.call_sid})
        await interrupt_after(phone, heard_s, speech)
        sent = None
        deadline = time.monotonic() + 10
        while sent is None and time.monotonic() < deadline:
            sent = next((b["audio_end_ms"] for t, b in list(bus.msgs) if t == "client.conversation.item.truncate"
                         and b.get("phone_call_id") == phone.call_sid), None)
            await asyncio.sleep(0.02)
        if sent is not None and phone.clears:
            engine_err.append(truncation_error_ms(sent, phone))
        await phone.hang_up()
        deadline = time.monotonic() + 10
        ended = None
        while ended is None and time.monotonic() < deadline:
            ended = next((b for t, b in list(bus.msgs) if t == "phone.call.ended"
                          and b.get("phone_call_id") == phone.call_sid), None)
            await asyncio.sleep(0.02)
        if ended is not None and ended.get("clear_latency_p99_ms") is not None:
            engine_clear.append(ended["clear_latency_p99_ms"])
    model = load_config(None, {})["model"]
    sample = SampleBridge(conn["server_url"].rsplit("/realtime", 1)[0], model)
    base_err: list[float] = []
    async with serve(sample.handle, "127.0.0.1", 0, compression=None, ping_interval=None) as server:
        port = list(server.sockets)[0].getsockname()[1]
        for heard_s in cuts:
            phone = await FakePhone(f"ws://127.0.0.1:{port}/").dial()
            await interrupt_after(phone, heard_s, speech)
            deadline = time.monotonic() + 10
            while phone.call_sid not in sample.sent_audio_end_ms and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 5
            while not phone.clears and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if phone.call_sid in sample.sent_audio_end_ms and phone.clears:
                base_err.append(truncation_error_ms(sample.sent_audio_end_ms[phone.call_sid], phone))
            await phone.hang_up()

    def summary(errs: list[float], clears: list[float]) -> dict[str, Any]:
        a = sorted(abs(e) for e in errs)
        return {"trials": len(errs), "clear_ms_max": round(max(clears), 3) if clears else None,
                "abs_error_ms_median": round(statistics.median(a), 1) if a else None,
                "abs_error_ms_max": round(a[-1], 1) if a else None,
                "error_ms_mean": round(statistics.fmean(errs), 1) if errs else None,
                "errors_ms": [round(e, 1) for e in errs]}
    return {"cut_after_s": [round(c, 2) for c in cuts], "engine": summary(engine_err, engine_clear),
            "sdk_sample_baseline": summary(base_err, list(sample.clear_ms.values()))}


def on_time(levels: list[dict[str, Any]]) -> int:
    """The largest level whose every call ended and whose bridge sent no media frame late."""
    ok = [r["calls"] for r in levels if r["calls_ended"] == r["calls"]
          and r["media_in_late_frames"] == 0 and r["media_out_late_frames"] == 0]
    return max(ok, default=0)


def measure(counts: list[int], seconds: float, runs: int, layouts: list[str], trials: int = 0) -> dict[str, Any]:
    """Start `engine phone` (broker, local server, the one-process bridge) and run every layout ``runs`` times."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-phone-"))
    run = tmp / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "REALTALK_RUNTIME_DIR": str(run), "XDG_DATA_HOME": str(tmp / "data")}
    env.pop("OPENAI_API_KEY", None)
    saved = {k: os.environ.get(k) for k in ("REALTALK_RUNTIME_DIR", "XDG_DATA_HOME")}
    os.environ.update({k: env[k] for k in saved})
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "phone", "--backend", "local", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp))
    url = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"phone calls at (ws://\S+)", line)
        if m:
            url = m.group(1)
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
    conn = json.loads((run / "engine.json").read_text())
    bus = BusLog(conn, ["phone.", "session.config", "client.conversation.item.truncate"])
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": list(os.getloadavg())},
                           "seconds_per_level": seconds, "runs": {}}
    try:
        for layout in layouts:
            out["runs"][layout] = [run_layout(layout, counts, seconds, conn, bus, url, tmp) for _ in range(runs)]
            out[f"{layout}_max_calls_on_time"] = [on_time(r) for r in out["runs"][layout]]
        if trials:
            out["truncation"] = asyncio.run(truncations(url, conn, bus, trials, seed=13))
    finally:
        bus.close()
        proc.send_signal(2)
        proc.wait(30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    return out


def run() -> dict[str, Any]:
    """``python bench/run.py phone``: every level and layout twice, and the truncation comparison."""
    return measure([int(x) for x in LEVELS.split(",")], 8.0, 2, list(LAYOUTS), 8)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", default=LEVELS)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=2, help="each layout's levels this many times (a loaded machine)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--truncations", type=int, default=8, help="barge-ins per bridge (engine, SDK sample); 0: skip")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        ap.error(f"unknown layout {bad}; choose from {', '.join(LAYOUTS)}")
    counts = [int(x) for x in args.calls.split(",") if x]
    out = measure(counts, args.seconds, args.runs, layouts, args.truncations)
    print(json.dumps(out, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
