"""Conversation-quality benchmark (issue 4): the engine against a single-process baseline
written on the official openai SDK with PyAudio in one asyncio process, the way the SDK's
examples do it. Both use the same local server, scenario (30 ms delta jitter) and virtual
devices (PulseAudio null sinks, started with tools/vaudio.sh).

    python bench/run.py conversation [--json] [--interruptions N]
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.playback import FLUSH_FADE_MS

REPO = Path(__file__).resolve().parent.parent
REPLY = "The sea is wide and the ships are many, and every sailor knows the way home."
JITTER_MS = 30
PREBUFFER_MS = 80
PERIOD_MS = 20            # the mic's device period (the API gets 20 ms chunks)
PLAYBACK_PERIOD_MS = 10   # the speaker's (audio.playback_period_ms): barge-in waits for its next callback


def pct(values: list[float], q: float) -> float | None:
    """``bench.run.pct`` rounded for the report; None (valid JSON) when nothing was measured."""
    from bench.run import pct as percentile
    return round(percentile(values, q), 2) if values else None


def vaudio(*args: str) -> str:
    """Run ``tools/vaudio.sh ARGS``; its output."""
    return subprocess.run(["bash", str(REPO / "tools" / "vaudio.sh"), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def vaudio_env() -> dict[str, str]:
    out = vaudio("start")
    env = dict(part.split("=", 1) for part in out.strip().split()[1:])
    os.environ.update(env)
    return env


def scenario(tmp: Path) -> Path:
    path = tmp / "bench.yaml"
    path.write_text(f'default_reply: "{REPLY}"\nfaults: {{delta_jitter_ms: {JITTER_MS}, seed: 7}}\n')
    return path


def cpu_hog(endpoint: str | None, seconds: float) -> None:
    """A CPU-heavy bus subscriber: reads every message and burns a core on it."""
    import zmq
    sock = None
    if endpoint:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.connect(endpoint)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        if sock is not None:
            try:
                sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
        for i in range(20000):
            x += i * i


# ------------------------------------------------------------------ what the speaker really played
WINDOW = 120  # 5 ms at 24 kHz


def loud_windows(pcm: np.ndarray, threshold: float) -> np.ndarray:
    """Per 5 ms window: True where the RMS is above ``threshold``."""
    n = len(pcm) // WINDOW
    frames = pcm[:n * WINDOW].astype(np.float64).reshape(n, WINDOW)
    return np.sqrt((frames ** 2).mean(axis=1)) > threshold


def truncation_errors_from_recording(recording: np.ndarray, rec_start_s: float, reply: np.ndarray,
                                     cuts: list[tuple[int, int | None, int]]) -> list[float]:
    """How far each truncation's ``audio_end_ms`` is from what the speaker monitor recorded.

    ``cuts``: (first_sample_mono_ns, next item's first_sample_mono_ns or None, audio_end_ms,
    stretch_ms) per interruption; the item played ``stretch_ms`` longer than its audio up to the
    cut (time-stretching), so the recording's span is that much longer than what it played. Every reply is the same speech (``reply``, the server's PCM), so in each item's
    stretch of the recording the item starts where the sound starts less the reply's own leading
    silence, and the cut is where the sound stops for good. A cut inside a pause of the reply can
    be anywhere up to the reply's next sound, and the fade ends below the threshold: within
    those bounds the error is 0.
    """
    level = np.sqrt(np.mean(reply.astype(np.float64) ** 2))
    threshold = 0.05 * level
    ref_loud = loud_windows(reply, threshold)
    lead_ms = int(np.argmax(ref_loud)) * 5
    loud = loud_windows(recording, threshold)
    if not cuts or not loud.any():
        return []
    # where the monitor's clock sits against CLOCK_MONOTONIC: the first item's sound, less its lead
    offset_ms = int(np.argmax(loud)) * 5 - lead_ms - (cuts[0][0] / 1e9 - rec_start_s) * 1000
    errors = []
    for start_ns, next_ns, end_ms, stretch_ms in cuts:
        expected_ms = (start_ns / 1e9 - rec_start_s) * 1000 + offset_ms   # where this item should begin
        a = max(0, int((expected_ms - 30) / 5))   # window index (5 ms)
        b = len(loud) if next_ns is None else min(len(loud), int(((next_ns / 1e9 - rec_start_s) * 1000 + offset_ms
                                                                   - 30) / 5))
        seg = np.nonzero(loud[a:b])[0]
        if len(seg) == 0:
            errors.append(float(end_ms) if end_ms > lead_ms + 20 else 0.0)  # nothing heard
            continue
        item_start_ms = (a + int(seg[0])) * 5 - lead_ms              # this item's own onset
        heard_ms = (a + int(seg[-1]) + 1) * 5 - item_start_ms - round(stretch_ms)   # the end of the last loud window
        # the reply's next sound after the stretch the recording stopped in (the two envelopes may
        # be a window or two apart, so first step past the end of that stretch in the reply)
        i = max(0, heard_ms // 5 - 2)
        while i < len(ref_loud) and ref_loud[i]:
            i += 1
        later = np.nonzero(ref_loud[i:])[0]
        next_sound_ms = (i + int(later[0])) * 5 if len(later) else heard_ms + 10_000
        lo, hi = heard_ms - 5, max(heard_ms + 15, next_sound_ms + 5)   # 5 ms windows, a fade of ≤ 10 ms
        errors.append(float(max(0, lo - end_ms, end_ms - hi)))
    return errors


class MonitorRecorder:
    """Records the virtual speaker's monitor (what PulseAudio really played) with parec."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self.proc = subprocess.Popen(["parec", "-d", "spk.monitor", "--rate=24000", "--channels=1",
                                      "--format=s16le", "--raw", "--latency-msec=10"], stdout=self._file)
        self.start_s = time.monotonic()

    def stop(self) -> np.ndarray:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._file.close()
        return np.fromfile(self.path, dtype=np.int16)


# ------------------------------------------------------------------ the engine
class Engine:
    def __init__(self, tmp: Path, scen: Path) -> None:
        cfg = tmp / "engine.yaml"
        cfg.write_text(f"audio: {{mic: vmic, speaker: vspk, prebuffer_ms: {PREBUFFER_MS}, period_ms: {PERIOD_MS}, "
                       f"playback_period_ms: {PLAYBACK_PERIOD_MS}, "
                       f"echo: aec}}\nlocal_server: {{asr: false, scenario: {scen}}}\n"
                       "session: {turn_detection: null, transcription: null}\n")
        self.env = dict(os.environ, REALTALK_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"))
        self.env.pop("OPENAI_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "start", "--backend", "local", "--config",
                                      str(cfg)], stdout=subprocess.PIPE, text=True, env=self.env, cwd=str(REPO))
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if "ready in" in line:
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        self.conn = json.loads((tmp / "run" / "engine.json").read_text())
        from bus import Publisher, Subscriber
        self.sub = Subscriber(self.conn["subscribe"], ["playback.", "latency.", "engine.error", "response.done",
                                                       "cmd.ack", "server.error", "capture.echo"])
        self.pub = Publisher(self.conn["publish"], "bench")
        self.pub.join(self.conn["subscribe"])
        self.log: list[tuple[str, dict[str, Any]]] = []

    def wait(self, topic: str, timeout: float = 20, where: Any = None) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self.sub.recv(timeout_ms=100)
            if msg is None:
                continue
            self.log.append(msg)
            if msg[0] == topic and (where is None or where(msg[1])):
                return msg[1]
        raise TimeoutError(f"no {topic} within {timeout} s")

    def seen_or_wait(self, mark: int, topic: str, timeout: float = 20) -> dict[str, Any]:
        """The first ``topic`` message logged since ``mark``, waiting for it if need be."""
        for t, b in self.log[mark:]:
            if t == topic:
                return b
        return self.wait(topic, timeout)

    def turn(self, n: int) -> None:
        mark = len(self.log)
        self.pub.publish("cmd.say", {"text": f"Turn {n}", "id": f"turn-{n}-{time.monotonic_ns()}"})
        self.wait("playback.stopped", timeout=30)
        if not any(t == "latency.turn" for t, _ in self.log[mark:]):
            self.wait("latency.turn", timeout=5)

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(timeout=20)


def bench_engine(tmp: Path, scen: Path, interruptions: int) -> dict[str, Any]:
    # the echo path: what the speaker plays reaches the mic at 60 % volume; the engine cancels it (AEC3)
    vaudio("echo-on", "60%")
    eng = Engine(tmp, scen)
    try:
        eng.turn(0)  # warm-up
        eng.log.clear()
        for n in range(1, 11):
            eng.turn(n)
        quiet = eng.log[:]
        echo = eng.wait("capture.echo", timeout=5)  # ERLE over the quiet turns' far-end speech
        vaudio("echo-off")
        # isolation: a CPU-heavy subscriber on the bus, saturating a core, while the engine talks
        hog = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                                f"from bench.conversation import cpu_hog; cpu_hog({eng.conn['subscribe']!r}, 60)"])
        eng.log.clear()
        for n in range(11, 19):
            eng.turn(n)
        loaded = eng.log[:]
        hog.kill()
        # interruptions at random points of the model's speech
        rng = random.Random(3)
        eng.log.clear()
        silence_ms: list[float] = []   # cmd.cancel published (bench process) -> fade done
        engine_ms: list[float] = []    # the engine took the barge-in -> the device callback began the fade
        # (first sample handed to the device, audio_end_ms, item id, stretch_ms at the cut)
        cut_points: list[tuple[int, int, str, float]] = []
        monitor = MonitorRecorder(tmp / "monitor.raw")
        for n in range(interruptions):
            mark = len(eng.log)
            eng.pub.publish("cmd.say", {"text": f"Interrupt {n}", "id": f"int-{n}-{time.monotonic_ns()}"})
            started = eng.seen_or_wait(mark, "playback.started")
            time.sleep(rng.uniform(0.05, 1.5))
            t_ns = time.monotonic_ns()
            mark_cancel = len(eng.log)
            eng.pub.publish("cmd.cancel", {"id": f"cancel-{n}"})
            flushed = eng.seen_or_wait(mark_cancel, "playback.flushed", 5)
            interrupted = eng.seen_or_wait(mark_cancel, "playback.interrupted", 5)
            eng.seen_or_wait(mark, "response.done", 10)
            silence_ms.append((flushed["flush_mono_ns"] - t_ns) / 1e6 + FLUSH_FADE_MS)  # + the fade
            engine_ms.append((flushed["flush_mono_ns"] - interrupted["interrupt_mono_ns"]) / 1e6)
            cut_points.append((started["first_sample_mono_ns"], interrupted["played_ms"], started["item_id"],
                               flushed.get("stretch_ms", 0.0)))
        time.sleep(0.5)  # the last fade reaches the monitor
        recording = monitor.stop()
        inter = eng.log[:]
        mic = eng.wait("latency.mic", timeout=10)
    finally:
        eng.stop()
        vaudio("echo-off")
    from engine.server.voice import synthesize
    cuts = [(start, cut_points[i + 1][0] if i + 1 < len(cut_points) else None, end_ms, stretch_ms)
            for i, (start, end_ms, _, stretch_ms) in enumerate(cut_points)]
    heard_err = truncation_errors_from_recording(recording, monitor.start_s, synthesize(REPLY, "marin", 1.0), cuts)
    if os.environ.get("REALTALK_BENCH_DUMP"):   # the raw material, to look into a bad figure
        dump = Path(os.environ["REALTALK_BENCH_DUMP"])
        dump.mkdir(parents=True, exist_ok=True)
        np.save(dump / "monitor.npy", recording)
        (dump / "run.json").write_text(json.dumps({"rec_start_s": monitor.start_s, "cuts": cuts,
                                                   "errors": heard_err, "log": inter}, default=str))
    # an underrun puts a gap in the recording that is not in the item's audio, and so does the device
    # running dry (a scheduling stall of the playback process longer than the device's buffer): those
    # items are left out, and counted
    gapped = {b.get("item_id") for t, b in inter if t == "playback.underrun"
              or (t == "playback.flushed" and b.get("device_underflows"))}
    heard_err = [e for e, (_, _, item_id, _) in zip(heard_err, cut_points) if item_id not in gapped]
    turns = [b for t, b in quiet + loaded if t == "latency.turn"]
    interrupted = [b for t, b in inter if t == "playback.interrupted"]
    flushed = [b for t, b in inter if t == "playback.flushed"]
    api_errors = [b for t, b in quiet + loaded + inter if t == "server.error"]
    trunc_err = [abs(i["played_ms"] - f["played_ms"]) for i, f in zip(interrupted, flushed)]
    return {
        "engine_mic_to_socket_ms_p50": mic["p50_ms"], "engine_mic_to_socket_ms_p99": mic["p99_ms"],
        "engine_delta_to_device_ms_p50": pct([t["first_delta_to_device_ms"] for t in turns], 50),
        "engine_delta_to_device_ms_p99": pct([t["first_delta_to_device_ms"] for t in turns], 99),
        "engine_delta_to_device_bound_ms": PREBUFFER_MS + PLAYBACK_PERIOD_MS,
        "engine_request_to_device_ms_p50": pct([t["to_device_ms"] for t in turns], 50),
        "delta_interval_ms_std_mean": pct([t["delta_interval_ms_std"] for t in turns], 50),
        "engine_underruns_jitter30": sum(1 for t, _ in quiet if t == "playback.underrun"),
        "engine_underruns_under_cpu_load": sum(1 for t, _ in loaded if t == "playback.underrun"),
        # time-stretching over late deltas (audio.time_stretch): responses it touched, and by how much
        "engine_stretched_responses": sum(1 for t, b in quiet + loaded if t == "playback.stopped"
                                          and b.get("expanded_ms")),
        "engine_stretched_responses_of": sum(1 for t, _ in quiet + loaded if t == "playback.stopped"),
        "engine_expanded_ms_max": max([b.get("expanded_ms", 0) for t, b in quiet + loaded
                                       if t == "playback.stopped"], default=None),
        "engine_stretch_left_ms_max": max([abs(b.get("stretch_ms", 0)) for t, b in quiet + loaded
                                           if t == "playback.stopped"], default=None),
        "stretched_interruptions": sum(1 for c in cut_points if c[3]),
        "engine_turns": len(turns),
        "bargein_fade_start_ms_p50": pct(engine_ms, 50), "bargein_fade_start_ms_p99": pct(engine_ms, 99),
        "bargein_silent_ms_p50": pct([m + FLUSH_FADE_MS for m in engine_ms], 50),
        "bargein_silent_ms_p99": pct([m + FLUSH_FADE_MS for m in engine_ms], 99),
        "bargein_from_bus_command_silent_ms_p99": pct(silence_ms, 99),
        "interruptions": len(interrupted),
        "truncations_measured": sum(1 for i in interrupted if i.get("measured")),
        "truncation_error_ms_max": max(trunc_err) if trunc_err else None,
        "truncation_api_errors": len(api_errors),
        "truncation_vs_speaker_monitor_error_ms_p50": pct(heard_err, 50),
        "truncation_vs_speaker_monitor_error_ms_p99": pct(heard_err, 99),
        "truncation_vs_speaker_monitor_error_ms_max": max(heard_err) if heard_err else None,
        "truncation_vs_speaker_monitor_within_10ms": sum(1 for e in heard_err if e <= 10),
        "truncation_vs_speaker_monitor_checked": len(heard_err),
        "underruns_during_interruptions": sum(1 for t, _ in inter if t == "playback.underrun"),
        "interruptions_with_device_underflow": sum(1 for t, b in inter if t == "playback.flushed"
                                                   and b.get("device_underflows")),
        "device_underflows_total": max([b.get("device_underflows", 0) for t, b in inter
                                        if t == "playback.cadence"], default=None),
        "echo_erle_db": echo.get("erle_db"), "echo_erle_p10_db": echo.get("erle_p10_db"),
        "echo_erle_total_db": echo.get("erle_total_db"), "echo_guarded_ms": echo.get("guarded_ms"),
        "echo_far_active_ms": echo.get("far_active_ms"),
    }


# ------------------------------------------------------------------ the baseline
def bench_baseline(scen: Path, load: bool, turns: int = 8) -> dict[str, Any]:
    """openai SDK + PyAudio in one asyncio process, as the SDK's examples do it."""
    import socket
    from engine.supervisor import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--scenario",
                               str(scen), "--no-asr"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=str(REPO))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        return asyncio.run(_baseline(f"ws://127.0.0.1:{port}/v1", load, turns))
    finally:
        server.kill()


async def _baseline(url: str, load: bool, turns: int) -> dict[str, Any]:
    import pyaudio
    from openai import AsyncOpenAI
    from engine.audio import find_device, open_pyaudio
    pa = open_pyaudio()
    dev = find_device(pa, "vspk", "output")
    lock = threading.Lock()
    buf = bytearray()
    state = {"underruns": 0, "in_response": False, "first_out": None, "done_audio": False}

    def callback(in_data: Any, frame_count: int, time_info: Any, status: int) -> tuple[bytes, int]:
        need = frame_count * 2
        with lock:
            chunk = bytes(buf[:need])
            del buf[:need]
            if chunk and state["first_out"] is None:
                state["first_out"] = time.monotonic()
            if len(chunk) < need and state["in_response"] and not state["done_audio"]:
                state["underruns"] += 1
        return chunk + bytes(need - len(chunk)), pyaudio.paContinue

    stream = pa.open(format=pyaudio.paInt16, channels=1, rate=24000, output=True, output_device_index=dev["index"],
                     frames_per_buffer=24 * PLAYBACK_PERIOD_MS, stream_callback=callback)
    delta_to_device: list[float] = []
    client = AsyncOpenAI(api_key="sk-local", websocket_base_url=url)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        for n in range(turns):
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": f"Turn {n}"}]})
            await conn.response.create()
            first_delta = None
            with lock:
                state.update(in_response=True, first_out=None, done_audio=False)
            async for ev in conn:
                if ev.type == "response.output_audio.delta":
                    if first_delta is None:
                        first_delta = time.monotonic()
                    with lock:
                        buf.extend(base64.b64decode(ev.delta))
                elif ev.type == "response.output_audio_transcript.delta" and load:
                    t_end = time.monotonic() + 0.08  # a CPU-heavy handler in the same process
                    while time.monotonic() < t_end:
                        pass
                elif ev.type == "response.output_audio.done":
                    with lock:
                        state["done_audio"] = True
                elif ev.type == "response.done":
                    break
            while True:
                with lock:
                    if not buf:
                        break
                await asyncio.sleep(0.02)
            with lock:
                state["in_response"] = False
                if state["first_out"] is not None and first_delta is not None:
                    delta_to_device.append((state["first_out"] - first_delta) * 1000)
    stream.stop_stream()
    stream.close()
    pa.terminate()
    key = "baseline_under_cpu_load" if load else "baseline"
    return {f"{key}_underruns": state["underruns"], f"{key}_delta_to_device_ms_p50": pct(delta_to_device, 50),
            f"{key}_delta_to_device_ms_p99": pct(delta_to_device, 99), f"{key}_turns": turns}


def run(interruptions: int = 200) -> dict[str, Any]:
    vaudio_env()
    tmp = Path(tempfile.mkdtemp(prefix="rtconv"))
    scen = scenario(tmp)
    result: dict[str, Any] = {"jitter_ms": JITTER_MS, "prebuffer_ms": PREBUFFER_MS, "period_ms": PERIOD_MS,
                              "playback_period_ms": PLAYBACK_PERIOD_MS}
    result.update(bench_engine(tmp, scen, interruptions))
    result.update(bench_baseline(scen, load=False))
    result.update(bench_baseline(scen, load=True))
    return result
