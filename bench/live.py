"""GPT-Live benchmark (issue 21): the engine on GPT-Live (``model: gpt-live-1``) against the
local server's Live endpoint on the virtual devices, and a baseline on the official SDK
(``client.live.connect()`` feeding a plain PyAudio player). Definitions: bench/README.md, "live".

    python bench/run.py live [--json] [--yields N] [--utterances N]

Phases, each with its own engine (``engine start --backend local``, vmic/vspk, prebuffer 80 ms,
mic period 20 ms, speaker period 10 ms, ``echo: aec``):

1. no network jitter, no echo path: every output delta's wait in the engine (delta -> device),
   the mic's (``latency.mic``), and N yields: the model says a long story (``cmd.commentary``),
   the bench talks over it into the virtual mic, the model yields; the speaker monitor is
   recorded throughout, and the bench watches the session's output track on the local server's
   sideband (``/v1/live/sessions/{id}/attach``), which gets every delta when the engine does;
2. 30 ms delta jitter (``delta_jitter_ms``): utterances one at a time, gaps counted in what
   playback handed out; then the SDK baseline on the same server scenario;
3. the real path of ``bench/run.py core`` (48 kHz device, soxr, AEC3 with an echo path at 60 %):
   engine CPU while the model speaks, beside the floor (bench/floor.py).
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
from typing import Any, Callable

import numpy as np

from bench.common import BusLog, cpu_window, local_server, played_channel, stop_engine, vaudio, vaudio_env
from bench.conversation import REPLY, MonitorRecorder, count_gaps, gap_lengths_ms, pct
from engine.server.live_session import OUTPUT_CHUNK_MS, OUTPUT_CHUNK_SAMPLES

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-live-1"
JITTER_MS = 30
PREBUFFER_MS = 80
PERIOD_MS = 20
PLAYBACK_PERIOD_MS = 10
RATE = 24000
QUIET = 4                  #: the speaker monitor's silence is not exact: +-1..3 LSB (bench.conversation.QUIET_FLOOR)
SILENT_RUN_MS = 60         #: the model's audio has gone silent: the monitor stays this quiet this long
SPAN_SPLIT_MS = 500        #: utterances are at least this far apart: a longer zero run starts a new span
STORY = ("Once upon a time a small red car lived in a garage by the sea, and every morning it drove along "
         "the coast road to the market, where it carried bread, apples and fish for the people of the "
         "village, until one day a storm came and the road was closed for a week")   # ~14 s, no pause over 45 ms
USER_SPEECH = "Wait, stop please, I have a question."
LONG = " ".join(["The sea is wide and the ships are many, and every sailor knows the way home."] * 14)  # ~60 s


# ------------------------------------------------------------------ the engine on GPT-Live
class LiveEngine(BusLog):
    """``engine start --backend local`` on GPT-Live and the virtual devices, with a bus subscriber
    and publisher for the bench. ``audio``: YAML flow-mapping items added to the bench's; ``model``
    and ``extra`` (more config lines): the Realtime engine beside it, for the CPU figure."""

    def __init__(self, tmp: Path, scen: Path, audio: str = "", model: str = MODEL, extra: str = "") -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = tmp / "engine.yaml"
        self.record_dir = tmp / "rec"
        cfg.write_text(f"model: {model}\nrecord: {self.record_dir}\n{extra}"
                       f"audio: {{mic: vmic, speaker: vspk, prebuffer_ms: {PREBUFFER_MS}, period_ms: {PERIOD_MS}, "
                       f"playback_period_ms: {PLAYBACK_PERIOD_MS}, echo: aec{', ' + audio if audio else ''}}}\n"
                       f"local_server: {{asr: false, scenario: {scen}}}\n")
        self.env = dict(os.environ, REALTALK_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"))
        self.env.pop("OPENAI_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--config",
                                      str(cfg)], stdout=subprocess.PIPE, text=True, env=self.env, cwd=str(REPO))
        ready = False
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if "ready in" in line:
                ready = True
                break
        if not ready:
            raise RuntimeError(f"engine start exited with {self.proc.wait()} before it was ready")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        self.conn = json.loads((tmp / "run" / "engine.json").read_text())
        for _ in range(100):   # the Live session's id comes into the connection file once it started
            if self.conn.get("session_id") or model != MODEL:
                break
            time.sleep(0.1)
            self.conn = json.loads((tmp / "run" / "engine.json").read_text())
        from bus import Publisher, Subscriber
        self.sub = Subscriber(self.conn["subscribe"], ["playout.", "playback.cadence", "latency.", "engine.",
                                                       "model.transcript.", "capture.echo", "cmd.done", "live.",
                                                       "user.speech."])
        self.pub = Publisher(self.conn["publish"], "bench")
        self.pub.join(self.conn["subscribe"])
        self.log: list[tuple[str, dict[str, Any]]] = []

    def commentary(self, text: str, cmd_id: str) -> None:
        """``cmd.commentary``: the model says ``text`` (the local server says it as it is)."""
        self.pub.publish("cmd.commentary", {"text": text, "id": cmd_id})

    def logged(self, topic: str) -> list[dict[str, Any]]:
        """Every ``topic`` message of the session's event log (those sent before the bench subscribed too)."""
        path = Path(self.conn.get("session_dir") or "") / "events.jsonl"
        out = []
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:   # the live log's last line may be cut off mid-write
                continue
            if ev.get("topic") == topic:
                out.append(ev["body"])
        return out

    def played(self) -> np.ndarray:
        """What playback handed to the device this session (the recording's right channel)."""
        return played_channel(self.record_dir)

    def stop(self) -> None:
        stop_engine(self.proc)


class Sideband:
    """The local server's sideband on one Live session: every output delta (the session's track,
    silence included) with the CLOCK_MONOTONIC ns it came at, its ordinal on the track and its PCM.

    The server sends a delta to the primary (the engine) and to each sideband in the same step of
    its track, so the time it reaches the bench is the time it reaches the engine, to within the
    two sockets' scheduling on this machine. The track's first delta is ordinal 0 (the engine's
    stream starts with it); a sideband attached later learns the ordinal of its first delta from
    its ``start_ms`` (the track advances 100 ms a delta from 0 and can jump forward only once the
    input has run 300 ms ahead of it), then counts."""

    def __init__(self, server_url: str, session_id: str, server_key: str) -> None:
        from websockets.sync.client import connect
        base = server_url.split("/v1/")[0]
        self.ws = connect(f"{base}/v1/live/sessions/{session_id}/attach", max_size=None, open_timeout=10,
                          additional_headers={"Authorization": f"Bearer {server_key}"})
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.recv_ns: list[int] = []
        self.ordinal: list[int] = []
        self.start_ms: list[int] = []
        self.pcm: list[np.ndarray] = []
        self.peak: list[int] = []
        self.input_ns: list[int] = []      #: the input the server heard (reflected to sidebands), when it came
        self.input_rms: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            for raw in self.ws:
                t = time.monotonic_ns()
                ev = json.loads(raw)
                if ev.get("type") == "session.input_audio.append":
                    heard = np.frombuffer(base64.b64decode(ev["audio"]), dtype="<i2").astype(np.float64)
                    with self.lock:
                        self.input_ns.append(t)
                        self.input_rms.append(float(np.sqrt(np.mean(heard ** 2))) if len(heard) else 0.0)
                    continue
                if ev.get("type") != "session.output_audio.delta":
                    continue
                pcm = np.frombuffer(base64.b64decode(ev["delta"]), dtype="<i2").astype(np.int16)
                with self.cond:
                    n = self.ordinal[-1] + 1 if self.ordinal else int(ev["start_ms"]) // OUTPUT_CHUNK_MS
                    self.recv_ns.append(t)
                    self.ordinal.append(n)
                    self.start_ms.append(int(ev["start_ms"]))
                    self.pcm.append(pcm)
                    self.peak.append(int(np.abs(pcm.astype(np.int32)).max()) if len(pcm) else 0)
                    self.cond.notify_all()
        except ConnectionClosed:
            pass

    def count(self) -> int:
        with self.lock:
            return len(self.recv_ns)

    def wait_for(self, pred: Callable[[int], bool], after: int, timeout: float) -> int:
        """The index of the first delta from ``after`` that ``pred`` (given its index) accepts."""
        end = time.monotonic() + timeout
        with self.cond:
            i = after
            while True:
                while i < len(self.recv_ns):
                    if pred(i):
                        return i
                    i += 1
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such delta on the sideband within {timeout} s")
                self.cond.wait(min(left, 0.2))

    def loud(self, i: int) -> bool:
        return self.peak[i] > QUIET

    def track(self) -> tuple[int, np.ndarray]:
        """(the ordinal of the first delta seen, the track from it: every delta's PCM in order)."""
        with self.lock:
            return self.ordinal[0], np.concatenate(self.pcm) if self.pcm else np.zeros(0, dtype=np.int16)

    def input_dbfs(self, from_ns: int, to_ns: int) -> float:
        """The loudest input chunk the server heard between the two instants, dBFS."""
        with self.lock:
            rms = [r for t, r in zip(self.input_ns, self.input_rms) if from_ns <= t <= to_ns]
        return 20 * float(np.log10(max(max(rms, default=0.0), 1e-3) / 32768))

    def input_first_loud_ns(self, from_ns: int, dbfs: float = -40.0) -> int | None:
        """When the first input chunk louder than ``dbfs`` reached the sideband after ``from_ns``: about
        when the server heard it (the server reflects each append as it takes it)."""
        level = 32768 * 10 ** (dbfs / 20)
        with self.lock:
            return next((t for t, r in zip(self.input_ns, self.input_rms) if t >= from_ns and r > level), None)

    def resyncs(self) -> int:
        """Jumps of the track's ``start_ms`` (the ordinal still counts deltas, as the engine's ring does)."""
        with self.lock:
            return sum(1 for a, b in zip(self.start_ms, self.start_ms[1:]) if b - a != OUTPUT_CHUNK_MS)

    def close(self) -> None:
        self.ws.close()
        self.thread.join(5)


def delta_lateness_ms(recv_ns: list[int], ordinal: list[int]) -> list[float]:
    """How late each delta came against the track's real-time schedule: its arrival less its
    ordinal's 100 ms steps, less the earliest such difference of the run (ms, >= 0)."""
    if not recv_ns:
        return []
    off = [t / 1e6 - n * OUTPUT_CHUNK_MS for t, n in zip(recv_ns, ordinal)]
    base = min(off)
    return [o - base for o in off]


class MicFeeder:
    """Plays PCM into the virtual mic (PulseAudio's ``micsink``, ALSA ``vmicfeed``) from a PyAudio
    callback, as a person talking into it. ``say`` hands the speech over and returns the
    CLOCK_MONOTONIC ns at which its first sample was handed to the device (the callback that
    returned it, plus the sample's offset in the block)."""

    def __init__(self) -> None:
        import pyaudio
        from engine.audio.devices import find_device, open_pyaudio
        self.pyaudio = pyaudio
        self.pa = open_pyaudio()
        dev = find_device(self.pa, "vmicfeed", "output")
        self.lock = threading.Lock()
        self.pending: np.ndarray | None = None
        self.pos = 0
        self.first_ns: int | None = None
        self.done = threading.Event()
        self.stream = self.pa.open(format=pyaudio.paInt16, channels=1, rate=RATE, output=True,
                                   output_device_index=dev["index"], frames_per_buffer=RATE * 10 // 1000,
                                   stream_callback=self._callback)

    def _callback(self, in_data: Any, frame_count: int, time_info: Any, status: int) -> tuple[bytes, int]:
        now = time.monotonic_ns()
        out = np.zeros(frame_count, dtype=np.int16)
        with self.lock:
            if self.pending is not None:
                take = self.pending[self.pos:self.pos + frame_count]
                out[:len(take)] = take
                if self.pos == 0:
                    self.first_ns = now
                self.pos += len(take)
                if self.pos >= len(self.pending):
                    self.pending = None
                    self.done.set()
        return out.tobytes(), self.pyaudio.paContinue

    def say(self, pcm: np.ndarray, timeout: float = 30) -> int:
        with self.lock:
            self.pending, self.pos, self.first_ns = pcm, 0, None
            self.done.clear()
        if not self.done.wait(timeout):
            raise TimeoutError("the mic feeder did not play the speech")
        assert self.first_ns is not None
        return self.first_ns

    def close(self) -> None:
        self.stream.stop_stream()
        self.stream.close()
        self.pa.terminate()


def speech_onset_trimmed(pcm: np.ndarray) -> np.ndarray:
    """``pcm`` from its first 1 ms louder than 1 % of its RMS (the start of the speech itself)."""
    level = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    k = len(pcm) // 24
    ms = np.sqrt((pcm[:k * 24].astype(np.float64).reshape(k, 24) ** 2).mean(axis=1))
    first = int(np.argmax(ms > 0.01 * level))
    return pcm[first * 24:].copy()


# ------------------------------------------------------------------ the hand-off clock, the monitor, the track
class HandOff:
    """When playback handed each frame of the session's track to the device (CLOCK_MONOTONIC ns).

    The track's first frame (ring index ``start_index``) was handed at ``first_ns``
    (``playout.started`` ``first_sample_mono_ns``); while playback inserts nothing, frame ``i``
    of the track follows at ``first_ns + i / 24 kHz``. What it does insert (a late device
    callback: a device underflow; an underrun; time-stretching) makes every later frame later:
    the *shift*. Each ``playback.position`` (``index``: the heard index, which the device
    callback sets to the first frame it hands over less the output latency) bounds it: at the
    message's ``mono_ns`` the callback that handed frame ``index + latency`` had run, so
    shift <= mono_ns - first_ns - (index + latency - start_index) / 24 kHz, with equality when
    the message went out right at the callback; the smallest bound in a window of +-0.5 s (10
    messages against a 10 ms callback) is the shift there, to about a millisecond. The bounds
    have a constant part (how the heard index and the reported latency round a resampling
    device's blocks): the shift in the track's first second, when nothing was inserted yet, is
    taken as zero."""

    def __init__(self, first_ns: int, start_index: int, latency_frames: int,
                 positions: list[tuple[int, int]]) -> None:
        self.first_ns = first_ns
        self.t = np.array([t for t, _ in positions], dtype=np.float64)
        self.bound = np.array([t - first_ns - (i + latency_frames - start_index) / RATE * 1e9 for t, i in positions],
                              dtype=np.float64)
        first_s = self.t <= first_ns + 1e9
        self.zero = float(self.bound[first_s].min()) if first_s.any() else 0.0
        self.bound -= self.zero

    def shift_ns(self, at_ns: float) -> float | None:
        near = (self.t >= at_ns - 5e8) & (self.t <= at_ns + 5e8)
        return float(self.bound[near].min()) if near.any() else None

    def handed_ns(self, frame: float) -> float | None:
        """When track frame ``frame`` (from the track's first, ordinal 0) was handed to the device."""
        plain = self.first_ns + frame / RATE * 1e9
        shift = self.shift_ns(plain)
        return None if shift is None else plain + shift


def align(monitor: np.ndarray, track: np.ndarray, a: int, b: int, lo: int, hi: int) -> tuple[int, float] | None:
    """(lag, score): where ``track[a:b]`` best matches the monitor, as monitor position minus track
    position, searched for lags ``lo`` to ``hi`` (normalised cross-correlation by FFT); None if
    it matches nowhere (score < 0.7: not this audio)."""
    ref = track[a:b].astype(np.float64)
    lo_m, hi_m = max(0, a + lo), min(len(monitor), b + hi)
    seg = monitor[lo_m:hi_m].astype(np.float64)
    w = b - a
    if w <= 0 or len(seg) < w or not ref.any():
        return None
    n = 1 << int(np.ceil(np.log2(len(seg) + w)))
    corr = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(ref, n)), n)[:len(seg) - w + 1]
    energy = np.sqrt(np.maximum(np.convolve(seg ** 2, np.ones(w), mode="valid"), 1e-9))
    score = corr / (energy * np.sqrt((ref ** 2).sum()))
    best = int(np.argmax(score))
    if score[best] < 0.7:
        return None
    return lo_m + best - a, float(score[best])


def first_onset(monitor: np.ndarray) -> int | None:
    """The first sample of the monitor louder than QUIET after at least 50 ms no louder than it."""
    loud = np.flatnonzero(np.abs(monitor.astype(np.int32)) > QUIET)
    if not len(loud):
        return None
    onsets = np.concatenate(([loud[0]], loud[1:][np.diff(loud) > 1200]))
    return int(onsets[0])


def silent_from(monitor: np.ndarray, start: int, threshold: float) -> int | None:
    """Where the model's audio goes silent in the monitor after ``start``: the end of the last
    1 ms whose RMS is above ``threshold`` before the first run of at least SILENT_RUN_MS no
    louder than QUIET that begins at or after ``start``."""
    seg = monitor[start:]
    quiet = (np.abs(seg.astype(np.int32)) <= QUIET).astype(np.int8)
    edges = np.diff(np.concatenate(([0], quiet, [0])))
    run_a, run_b = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    ok = np.flatnonzero(run_b - run_a >= SILENT_RUN_MS * 24)
    if not len(ok):
        return None
    stop = start + int(run_a[ok[0]])
    back = max(0, stop - RATE)   # the loud ms before it, within a second
    k = (stop - back) // 24
    ms = np.sqrt((monitor[stop - k * 24:stop].astype(np.float64).reshape(k, 24) ** 2).mean(axis=1))
    loud = np.flatnonzero(ms > threshold)
    if not len(loud):
        return stop
    return stop - k * 24 + (int(loud[-1]) + 1) * 24


def utterance_spans(played: np.ndarray) -> list[tuple[int, int]]:
    """The utterances of a played track: spans of it separated by at least SPAN_SPLIT_MS of exact
    digital silence (the track's silence between utterances; the bench leaves more than that)."""
    nz = np.flatnonzero(played)
    if not len(nz):
        return []
    breaks = np.flatnonzero(np.diff(nz) > SPAN_SPLIT_MS * 24)
    starts = np.concatenate(([nz[0]], nz[breaks + 1]))
    ends = np.concatenate((nz[breaks] + 1, [nz[-1] + 1]))
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def span_gaps(played: np.ndarray, spans: list[tuple[int, int]]) -> tuple[int, list[float]]:
    """``count_gaps`` (bench.conversation: the one function engine and baselines are counted by)
    summed over the spans, and the gaps' lengths in ms."""
    return sum(count_gaps(played[a:b]) for a, b in spans), gap_lengths_ms(played, spans)


# ------------------------------------------------------------------ phase 1: latency and yields
def bench_latency_and_yields(tmp: Path, yields: int) -> dict[str, Any]:
    from engine.server.voice import synthesize
    scen = tmp / "quiet.yaml"
    scen.write_text('default_reply: "Okay."\n')
    story = synthesize(STORY, "marin", 1.0)
    story_rms = float(np.sqrt(np.mean(story.astype(np.float64) ** 2)))
    story_deltas = -(-len(story) // OUTPUT_CHUNK_SAMPLES)
    user = speech_onset_trimmed(synthesize(USER_SPEECH, "alloy", 1.0))
    user = np.clip(user.astype(np.float64) * (0.5 * 32767 / max(1, int(np.abs(user).max()))), -32768,
                   32767).astype(np.int16)
    vaudio("echo-off")
    eng = LiveEngine(tmp / "p1", scen)
    side = feeder = monitor = None
    rng = random.Random(5)
    trials: list[dict[str, Any]] = []
    try:
        side = Sideband(eng.conn["server_url"], eng.conn["session_id"], eng.conn["server_key"])
        feeder = MicFeeder()
        monitor = MonitorRecorder(tmp / "p1-monitor.raw")
        eng.pump(1.0)
        for n in range(yields):
            mark = side.count()
            eng.commentary(STORY, f"story-{n}-{time.monotonic_ns()}")
            on = side.wait_for(side.loud, mark, 15)
            eng.pump(rng.uniform(1.0, 2.5))
            mark_user = side.count()
            u_ns = feeder.say(user)
            # the yield: the first silent delta after the user began (the track is cut at a delta's end)
            y = side.wait_for(lambda i: not side.loud(i), mark_user, 15)
            trials.append({"onset": on, "user_ns": u_ns, "yield": y, "yielded": y < on + story_deltas - 1})
            # the model answers the user's turn ("Okay."), then the track is silent for a second
            try:
                again = side.wait_for(side.loud, y + 1, 6)
                side.wait_for(lambda i: all(not side.loud(j) for j in range(i - 10, i + 1)), again + 10, 10)
            except TimeoutError:
                pass
            eng.pump(0.2)
        eng.pump(5.5)   # a latency.mic report (every 5 s)
    finally:
        recording = monitor.stop() if monitor is not None else np.zeros(0, dtype=np.int16)
        if feeder is not None:
            feeder.close()
        if side is not None:
            side.close()
        eng.stop()
    assert side is not None
    first = eng.logged("playout.started")[0]
    f_ns, out_latency_ms = int(first["first_sample_mono_ns"]), float(first.get("output_latency_ms") or 0)
    stream_wait_ms = (f_ns - int(first["arrived_mono_ns"])) / 1e6
    clock = HandOff(f_ns, int(first["start_index"]), round(out_latency_ms * 24),
                    [(b["mono_ns"], b["index"]) for b in eng.logged("playback.position")
                     if b.get("start_index") == first["start_index"]])
    n0, track = side.track()
    base = n0 * OUTPUT_CHUNK_SAMPLES   # track[k] is frame base + k of the session's track
    mics = [b for t, b in eng.log if t == "latency.mic"]
    underruns = [b for t, b in eng.log if t == "playout.underrun"]
    cadence = eng.logged("playback.cadence")

    # every delta's wait in the engine: received (the sideband's arrival) -> its first frame handed to the
    # device; and the same less the track's shift then (what playback's stalls inserted and the
    # continuous track keeps: the engine's own wait against the track's schedule)
    d2d: list[float] = []
    d2d_less_shift: list[float] = []
    for t_ns, n in zip(side.recv_ns, side.ordinal):
        plain = f_ns + n * OUTPUT_CHUNK_MS * 1e6
        shift = clock.shift_ns(plain)
        if shift is not None:
            d2d.append((plain + shift - t_ns) / 1e6)
            d2d_less_shift.append((plain - t_ns) / 1e6)
    shift_end = clock.shift_ns(float(clock.t[-1]) - 5e8) if len(clock.t) else None

    # each yield: where the monitor goes silent, as a track frame (the monitor aligned on the track's
    # last 200 ms before the cut, searched near where the hand-off clock puts it: the story is the
    # same each time), put on the hand-off clock
    results: list[dict[str, Any]] = []
    c0: float | None = None   # monitor position - track frame - shift (frames), from the first story's onset
    first_sound = first_onset(recording)
    for tr in trials:
        if c0 is None and first_sound is not None:
            i_on = tr["onset"]
            k = int(np.argmax(np.abs(side.pcm[i_on].astype(np.int32)) > QUIET))
            onset = (side.ordinal[i_on] - n0) * OUTPUT_CHUNK_SAMPLES + k
            got = align(recording, track, onset - 2400, onset + 4800, first_sound - onset - RATE // 4,
                        first_sound - onset + RATE // 4)
            shift = clock.shift_ns(f_ns + (onset + base) / RATE * 1e9)
            if got is not None and shift is not None:
                c0 = got[0] - shift / 1e9 * RATE
        if not tr["yielded"] or c0 is None:
            continue
        y = tr["yield"]
        cut = (side.ordinal[y] - n0) * OUTPUT_CHUNK_SAMPLES            # the track's first silent frame
        shift = clock.shift_ns(f_ns + (cut + base) / RATE * 1e9)
        if shift is None:
            continue
        expect = int(c0 + shift / 1e9 * RATE)
        got = align(recording, track, cut - 4800, cut, expect - RATE // 4, expect + RATE // 4)
        if got is None:
            continue
        lag = got[0]
        u_frame = (tr["user_ns"] - f_ns - shift) / 1e9 * RATE - base   # about where the user began, on the track
        sil = silent_from(recording, max(0, int(u_frame + lag)), 0.01 * story_rms)
        if sil is None or abs(sil - (cut + lag)) > RATE // 2:
            continue   # silent elsewhere than where the track was cut: not this yield's silence
        silent_ns = clock.handed_ns(sil - lag + base)
        if silent_ns is None:
            continue
        prev = np.flatnonzero(np.abs(side.pcm[y - 1].astype(np.int32)) > QUIET)
        track_last = cut - OUTPUT_CHUNK_SAMPLES + (int(prev[-1]) + 1 if len(prev) else 0)
        engine_ms = (silent_ns - side.recv_ns[y]) / 1e6
        heard_ns = side.input_first_loud_ns(tr["user_ns"])
        results.append({"user_at_server_ms": (heard_ns - tr["user_ns"]) / 1e6 if heard_ns else None,
                        "yield_ms": (silent_ns - tr["user_ns"]) / 1e6,
                        "server_ms": (side.recv_ns[y] - tr["user_ns"]) / 1e6,
                        "engine_ms": engine_ms, "engine_less_shift_ms": engine_ms - shift / 1e6,
                        "monitor_vs_track_ms": (sil - lag - track_last) / 24,
                        "user_heard_dbfs": side.input_dbfs(tr["user_ns"], tr["user_ns"] + 1_500_000_000)})
    late = delta_lateness_ms(side.recv_ns, side.ordinal)
    mic = mics[-1] if mics else {}
    d2d_p99 = pct(d2d, 99)
    added = round(mic["p99_ms"] + d2d_p99 - PREBUFFER_MS, 2) if mic.get("p99_ms") is not None and d2d_p99 is not None \
        else None
    if os.environ.get("REALTALK_BENCH_DUMP"):   # the raw material, to look into a bad figure
        dump = Path(os.environ["REALTALK_BENCH_DUMP"])
        dump.mkdir(parents=True, exist_ok=True)
        np.save(dump / "live-monitor.npy", recording)
        np.save(dump / "live-track.npy", track)
        (dump / "live-run.json").write_text(json.dumps({
            "f_ns": f_ns, "n0": n0, "trials": trials, "recv_ns": side.recv_ns, "ordinal": side.ordinal,
            "results": results, "d2d": d2d, "c0": c0,
            "positions": list(zip(clock.t.tolist(), clock.bound.tolist()))}, default=str))
    ys = [r["yield_ms"] for r in results]
    servers = [r["server_ms"] for r in results]
    engines = [r["engine_ms"] for r in results]
    engine_p99 = pct(engines, 99)
    engines_less = [r["engine_less_shift_ms"] for r in results]
    underflows = (cadence[-1].get("device_underflows", 0) - cadence[0].get("device_underflows", 0)) if cadence else None
    return {
        "engine_mic_to_socket_ms_p50": mic.get("p50_ms"), "engine_mic_to_socket_ms_p99": mic.get("p99_ms"),
        "engine_delta_to_device_ms_p50": pct(d2d, 50), "engine_delta_to_device_ms_p99": d2d_p99,
        "engine_delta_to_device_ms_max": round(max(d2d), 2) if d2d else None,
        "engine_delta_to_device_deltas": len(d2d),
        "engine_delta_to_device_less_shift_ms_p50": pct(d2d_less_shift, 50),
        "engine_delta_to_device_less_shift_ms_p99": pct(d2d_less_shift, 99),
        "engine_added_latency_less_shift_ms_p99": round(mic["p99_ms"] + pct(d2d_less_shift, 99) - PREBUFFER_MS, 2)
        if mic.get("p99_ms") is not None and d2d_less_shift else None,
        "engine_added_latency_ms_p99": added, "engine_added_latency_goal_ms": 5.0,
        "engine_stream_start_wait_beyond_prebuffer_ms": round(stream_wait_ms - PREBUFFER_MS, 2),
        "engine_track_shift_ms_at_end": round(shift_end / 1e6, 2) if shift_end is not None else None,
        "handoff_clock_constant_ms": round(clock.zero / 1e6, 2),
        "engine_output_latency_ms": out_latency_ms,
        "engine_device_underflows_no_jitter": underflows,
        "engine_callback_interval_ms_max_no_jitter": max((c.get("interval_ms_max", 0) for c in cadence), default=None),
        "engine_underruns_reported_no_jitter": len(underruns),
        "engine_stretch_ms_no_jitter": (cadence[-1].get("expanded_ms", 0) + cadence[-1].get("accelerated_ms", 0))
        if cadence else None,
        "server_delta_late_ms_p50_no_jitter": pct(late, 50), "server_delta_late_ms_p99_no_jitter": pct(late, 99),
        "yield_trials": len(trials), "yield_trials_yielded": sum(1 for t in trials if t["yielded"]),
        "yield_measured": len(results),
        "yield_ms_p50": pct(ys, 50), "yield_ms_p99": pct(ys, 99), "yield_ms_max": round(max(ys), 2) if ys else None,
        "yield_server_ms_p50": pct(servers, 50), "yield_server_ms_p99": pct(servers, 99),
        "yield_user_at_server_ms_p50": pct([r["user_at_server_ms"] for r in results if r["user_at_server_ms"]], 50),
        "yield_engine_part_ms_p50": pct(engines, 50), "yield_engine_part_ms_p99": engine_p99,
        "yield_engine_part_ms_max": round(max(engines), 2) if engines else None,
        "yield_engine_part_beyond_prebuffer_ms_p99": round(engine_p99 - PREBUFFER_MS, 2)
        if engine_p99 is not None else None,
        "yield_engine_part_less_shift_ms_p50": pct(engines_less, 50),
        "yield_engine_part_less_shift_ms_p99": pct(engines_less, 99),
        "yield_engine_part_goal_ms": 15.0,
        "yield_monitor_vs_track_ms_max": round(max(abs(r["monitor_vs_track_ms"]) for r in results), 2)
        if results else None,
        "yield_user_heard_dbfs_min": round(min(r["user_heard_dbfs"] for r in results), 1) if results else None,
        "sideband_track_resyncs": side.resyncs(),
    }


# ------------------------------------------------------------------ phase 2: underruns at 30 ms jitter
def jitter_scenario(tmp: Path) -> Path:
    path = tmp / "jitter.yaml"
    path.write_text(f'default_reply: "Okay."\nfaults: {{delta_jitter_ms: {JITTER_MS}, seed: 7}}\n')
    return path


def bench_engine_jitter(tmp: Path, utterances: int) -> dict[str, Any]:
    scen = jitter_scenario(tmp)
    vaudio("echo-off")
    eng = LiveEngine(tmp / "p2", scen)
    side = None
    warm = 0
    try:
        side = Sideband(eng.conn["server_url"], eng.conn["session_id"], eng.conn["server_key"])
        for n in range(utterances + 1):   # the first is the warm-up
            mark = len(eng.log)
            eng.commentary(REPLY, f"reply-{n}-{time.monotonic_ns()}")
            eng.wait("model.transcript.done", 30, since=mark)
            eng.pump(1.5)
            if n == 0:
                warm = len(eng.log)
        eng.pump(0.5)
    finally:
        if side is not None:
            side.close()
        eng.stop()
    played = eng.played()
    spans = utterance_spans(played)[1:]   # the warm-up's left out
    gaps, gap_ms = span_gaps(played, spans)
    turns = eng.log[warm:]
    echoes = [b for t, b in turns if t == "capture.echo"]
    late = delta_lateness_ms(side.recv_ns, side.ordinal)
    padded = (echoes[-1].get("far_missing_frames", 0) - echoes[0].get("far_missing_frames", 0)) if echoes else None
    return {"engine_underruns_jitter30": gaps, "engine_underruns_responses_checked": len(spans),
            "engine_underrun_gap_ms_p50": pct(gap_ms, 50), "engine_underrun_gap_ms_max": max(gap_ms, default=None),
            "engine_underruns_reported_jitter30": sum(1 for t, _ in turns if t == "playout.underrun"),
            "engine_recording_padded_frames_during_utterances": padded, "engine_underruns_recording_exact": padded == 0,
            "server_delta_late_ms_p50_jitter30": pct(late, 50), "server_delta_late_ms_p99_jitter30": pct(late, 99),
            "server_deltas_jitter30": len(late)}


def bench_baseline(tmp: Path, utterances: int) -> dict[str, Any]:
    """The official SDK's ``client.live.connect()`` feeding a plain PyAudio player (the shape of
    bench.conversation's Realtime baseline): one asyncio process, silence streamed as the mic (the
    session's clock needs input audio), each delta appended to a buffer the device callback
    takes from, zeros when it is short."""
    with local_server(jitter_scenario(tmp)) as url:
        played, underflows = asyncio.run(_baseline(url, utterances))
    spans = utterance_spans(played)[1:]
    gaps, gap_ms = span_gaps(played, spans)
    return {"baseline_underruns_jitter30": gaps, "baseline_underruns_responses_checked": len(spans),
            "baseline_underrun_gap_ms_p50": pct(gap_ms, 50), "baseline_underrun_gap_ms_max": max(gap_ms, default=None),
            "baseline_device_underflows": underflows}


async def _baseline(url: str, utterances: int) -> tuple[np.ndarray, int]:
    import pyaudio
    from openai import AsyncOpenAI
    from engine.audio.devices import find_device, open_pyaudio
    pa = open_pyaudio()
    dev = find_device(pa, "vspk", "output")
    lock = threading.Lock()
    buf = bytearray()
    played = bytearray()
    underflows = [0]

    def callback(in_data: Any, frame_count: int, time_info: Any, status: int) -> tuple[bytes, int]:
        need = frame_count * 2
        with lock:
            chunk = bytes(buf[:need])
            del buf[:need]
            if status & pyaudio.paOutputUnderflow:
                underflows[0] += 1
        out = chunk + bytes(need - len(chunk))
        played.extend(out)
        return out, pyaudio.paContinue

    stream = pa.open(format=pyaudio.paInt16, channels=1, rate=RATE, output=True, output_device_index=dev["index"],
                     frames_per_buffer=RATE * PLAYBACK_PERIOD_MS // 1000, stream_callback=callback)
    client = AsyncOpenAI(api_key="sk-local", websocket_base_url=url)
    silence = base64.b64encode(bytes(RATE * 2 // 10)).decode()   # 100 ms
    async with client.live.connect() as conn:
        await conn.session.start(session={"model": MODEL})
        stop = asyncio.Event()

        async def mic() -> None:
            t = time.monotonic()
            while not stop.is_set():
                await conn.session.input_audio.append(audio=silence)
                t += 0.1
                await asyncio.sleep(max(0.0, t - time.monotonic()))
        mic_task = asyncio.create_task(mic())
        said = asyncio.Event()
        quiet_since: list[float | None] = [None]
        speaking = [False]

        async def read() -> None:
            async for ev in conn:
                if ev.type == "session.output_audio.delta":
                    pcm = base64.b64decode(ev.delta)
                    with lock:
                        buf.extend(pcm)
                    loud = bool(np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32)).max() > QUIET)
                    if loud:
                        speaking[0], quiet_since[0] = True, None
                    elif speaking[0]:
                        if quiet_since[0] is None:
                            quiet_since[0] = time.monotonic()
                        elif time.monotonic() - quiet_since[0] >= 1.5:
                            speaking[0] = False
                            said.set()
        reader = asyncio.create_task(read())
        await asyncio.sleep(1.0)
        for _ in range(utterances + 1):   # the first is the warm-up
            said.clear()
            await conn.session.commentary.append(content=REPLY, delegation_id=None)
            await asyncio.wait_for(said.wait(), 30)
        stop.set()
        await mic_task
        reader.cancel()
    stream.stop_stream()
    stream.close()
    pa.terminate()
    return np.frombuffer(bytes(played), dtype=np.int16), underflows[0]


# ------------------------------------------------------------------ phase 3: CPU on the real path
CPU_WINDOWS = 3
CPU_WINDOW_S = 6.0


def cpu_windows(eng: LiveEngine) -> list[tuple[dict[str, float], dict[str, float], float, float]]:
    """CPU_WINDOWS windows of ``bench/run.py core``'s measure, the floor (bench/floor.py) running beside
    the engine and measured in the same windows: (engine by process, floor by side, start, end)."""
    from bench.floor import running
    windows = []
    with running(48000, 20, 10, eng.env) as floor_pids:
        for _ in range(CPU_WINDOWS):
            by_name, t0, t1 = cpu_window(eng.proc, eng.conn, CPU_WINDOW_S, floor_pids)
            windows.append(({k: v for k, v in by_name.items() if k not in floor_pids},
                            {k: by_name[k] for k in floor_pids}, t0, t1))
    return windows


def cpu_figures(prefix: str, windows: list[tuple[dict[str, float], dict[str, float], float, float]]) -> dict[str, Any]:
    import statistics
    from bench.floor import figures
    totals = [round(sum(w[0].values()), 2) for w in windows]
    floors = [figures(w[1])["floor_cpu_percent_of_one_core"] for w in windows]
    above = [round(t - f, 2) for t, f in zip(totals, floors)]
    mid = sorted(range(len(windows)), key=lambda i: totals[i])[len(windows) // 2]
    return {f"{prefix}engine_cpu_percent_of_one_core_streaming": statistics.median(totals),
            f"{prefix}engine_cpu_percent_of_one_core_streaming_runs": totals,
            f"{prefix}engine_cpu_percent_by_process": windows[mid][0],
            f"{prefix}floor_cpu_percent_of_one_core": statistics.median(floors),
            f"{prefix}floor_cpu_percent_of_one_core_runs": floors,
            f"{prefix}engine_cpu_percent_above_floor": statistics.median(above),
            f"{prefix}engine_cpu_percent_above_floor_runs": above}


def bench_cpu(tmp: Path) -> dict[str, Any]:
    """``bench/run.py core``'s real path (48 kHz device: soxr both ways, AEC3, echo path 60 %) on
    GPT-Live: three 6 s windows while the model speaks, the floor beside it in the same windows,
    then one window while the track is silent (the mic and the track still stream); then the
    same windows for a Realtime engine on the same path answering a ``cmd.say`` (``bench core``'s
    own run), side by side in the same run."""
    scen = tmp / "cpu.yaml"
    scen.write_text(f'default_reply: "{LONG}"\n')
    out: dict[str, Any] = {"engine_cpu_path": "PyAudio on PulseAudio null sinks, device 48 kHz (soxr), echo aec, "
                                              "echo path 60 %", "engine_cpu_window_s": CPU_WINDOW_S}
    vaudio("echo-on", "60%")
    try:
        eng = LiveEngine(tmp / "p3", scen, audio="device_rate_hz: 48000")
        try:
            mark = len(eng.log)
            eng.commentary(LONG, f"cpu-{time.monotonic_ns()}")
            eng.wait("model.transcript.delta", 20, since=mark)
            eng.pump(1.5)
            windows = cpu_windows(eng)
            eng.pump(0.3)
            first_t0, last_t1 = windows[0][2], windows[-1][3]
            out["engine_cpu_model_speaking_whole_window"] = not [
                b for t, b in eng.log[mark:] if t in ("model.transcript.done", "playout.underrun")
                and first_t0 <= b.get("mono_ns", 0) / 1e9 <= last_t1]
            eng.wait("model.transcript.done", 120)   # the long utterance ends
            eng.pump(2.0)
            silent, _, _ = cpu_window(eng.proc, eng.conn, CPU_WINDOW_S)
            out["engine_cpu_percent_of_one_core_model_silent"] = round(sum(silent.values()), 2)
        finally:
            eng.stop()
        out.update(cpu_figures("", windows))
        rt = LiveEngine(tmp / "p3-realtime", scen, audio="device_rate_hz: 48000", model="gpt-realtime",
                        extra="session: {turn_detection: null, transcription: null}\n")
        try:
            mark = len(rt.log)
            rt.pub.publish("cmd.say", {"text": "Tell me about the sea.", "id": f"cpu-rt-{time.monotonic_ns()}"})
            rt.wait("playout.started", 20, since=mark)
            rt.pump(1.5)
            windows = cpu_windows(rt)
            rt.pump(0.3)
            first_t0, last_t1 = windows[0][2], windows[-1][3]
            out["realtime_engine_cpu_reply_streaming_whole_window"] = not [
                b for t, b in rt.log[mark:] if t in ("playout.stopped", "playout.interrupted", "playout.underrun")
                and first_t0 <= b.get("mono_ns", 0) / 1e9 <= last_t1]
        finally:
            rt.stop()
        out.update(cpu_figures("realtime_", windows))
    finally:
        vaudio("echo-off")
    return out


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def run(yields: int = 20, utterances: int = 10) -> dict[str, Any]:
    vaudio_env()
    tmp = Path(tempfile.mkdtemp(prefix="rtlive"))
    result: dict[str, Any] = {"model": MODEL, "jitter_ms": JITTER_MS, "prebuffer_ms": PREBUFFER_MS,
                              "period_ms": PERIOD_MS, "playback_period_ms": PLAYBACK_PERIOD_MS,
                              "machine_at_start": machine()}
    result.update(bench_latency_and_yields(tmp, yields))
    result.update(bench_engine_jitter(tmp, utterances))
    result.update(bench_baseline(tmp, utterances))
    result.update(bench_cpu(tmp))
    result["machine_at_end"] = machine()
    return result
