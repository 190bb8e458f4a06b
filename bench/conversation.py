"""Conversation-quality benchmark (issue 4): the engine against a single-process baseline
written on the official openai SDK with PyAudio in one asyncio process, the way the SDK's
examples do it. Both use the same local server, scenario (30 ms delta jitter) and virtual
devices (PulseAudio null sinks, started with tools/vaudio.sh).

    python bench/run.py conversation [--json] [--interruptions N] [--double-talk-trials N] [--stall-replies N]
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (BusLog, cpu_ticks, local_server, played_channel, steal_percent_since, stop_engine,
                          vaudio, vaudio_env)
from engine.playback.renderer import FLUSH_FADE_MS

REPO = Path(__file__).resolve().parent.parent
REPLY = "The sea is wide and the ships are many, and every sailor knows the way home."
JITTER_MS = 30
PREBUFFER_MS = 80
PERIOD_MS = 20            # the mic's device period (the API gets 20 ms chunks)
PLAYBACK_PERIOD_MS = 10   # the speaker's (audio.playback_period_ms): barge-in waits for its next callback
BACKEND = "native"   #: audio.backend of the engines started (run() sets it for each backend measured)


def pct(values: list[float], q: float) -> float | None:
    """``bench.run.pct`` rounded for the report; None (valid JSON) when nothing was measured."""
    from bench.common import pct as percentile
    return round(percentile(values, q), 2) if values else None


def scenario(tmp: Path) -> Path:
    path = tmp / "bench.yaml"
    path.write_text(f'default_reply: "{REPLY}"\nfaults: {{delta_jitter_ms: {JITTER_MS}, seed: 7}}\n')
    return path


def cpu_hog(endpoint: str | None, seconds: float) -> None:
    """A CPU-heavy bus subscriber: reads every message and burns a core on it."""
    import zmq
    sock: zmq.Socket[bytes] | None = None
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


MIN_GAP_SAMPLES = 48  # 2 ms of exact digital silence: the reply's own speech has no zero run over 1 ms


def count_gaps(pcm: np.ndarray) -> int:
    """Underruns of one response as the speaker played it: the runs of exact digital silence of at
    least MIN_GAP_SAMPLES between the response's first and last non-zero sample (so the wait before
    the first sample and the silence after the end are not gaps; a gap is counted once however
    long it lasts). The one function both the engine's and the baseline's underruns are counted by."""
    nz = np.flatnonzero(pcm)
    if len(nz) < 2:
        return 0
    zero = (pcm[nz[0]:nz[-1] + 1] == 0).astype(np.int8)
    edges = np.diff(np.concatenate(([0], zero, [0])))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return int((runs >= MIN_GAP_SAMPLES).sum())


QUIET_FLOOR = 4   # the speaker monitor's silence is not exact: PulseAudio leaves +-1..3 LSB of noise


def response_spans(recording: np.ndarray, starts_ns: list[int], floor: int = 0) -> list[tuple[int, int]]:
    """Each response's span of a recording, as sample indices [a, b).

    ``starts_ns``: CLOCK_MONOTONIC of each response's first sample handed to the device. A
    response begins at an onset of the recording: a sample louder than ``floor`` after at least
    50 ms no louder than it (responses are at least 80 ms apart, the prebuffer; the reply's own
    pauses are under 50 ms). The first response takes the first onset, each later one the onset
    nearest (within 150 ms) to where the previous one's onset and the two starts' distance put
    it, so neither the recording's clock offset nor its drift matters. A span ends where the
    next one begins; a response with no onset there gets an empty span."""
    loud = np.flatnonzero(np.abs(recording.astype(np.int32)) > floor)
    if not starts_ns or not len(loud):
        return []
    onsets = np.concatenate(([loud[0]], loud[1:][np.diff(loud) > 1200]))
    found: list[int | None] = [int(onsets[0])]
    anchor, anchor_ns = int(onsets[0]), starts_ns[0]
    for s in starts_ns[1:]:
        expect = anchor + int((s - anchor_ns) / 1e9 * 24000)
        j = int(np.argmin(np.abs(onsets - expect)))
        if abs(int(onsets[j]) - expect) <= 3600:
            found.append(int(onsets[j]))
            anchor, anchor_ns = int(onsets[j]), s
        else:
            found.append(None)
    spans = []
    for i, a in enumerate(found):
        if a is None:
            spans.append((0, 0))
            continue
        b = next((x for x in found[i + 1:] if x is not None), len(recording))
        spans.append((a, b))
    return spans


def span_underruns(played: np.ndarray, spans: list[tuple[int, int]]) -> list[int]:
    """``count_gaps`` of each response's span of what a player handed to the device (-1: not found)."""
    return [count_gaps(played[a:b]) if b > a else -1 for a, b in spans]


def gap_lengths_ms(recording: np.ndarray, spans: list[tuple[int, int]]) -> list[float]:
    """The length of every gap ``count_gaps`` counts, in ms."""
    out: list[float] = []
    for a, b in spans:
        pcm = recording[a:b]
        nz = np.flatnonzero(pcm)
        if len(nz) < 2:
            continue
        zero = (pcm[nz[0]:nz[-1] + 1] == 0).astype(np.int8)
        edges = np.diff(np.concatenate(([0], zero, [0])))
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        out.extend(float(r) / 24 for r in runs if r >= MIN_GAP_SAMPLES)
    return out


def silence_after_cut_ms(recording: np.ndarray, span: tuple[int, int], cut_ms: float,
                         threshold: float) -> float | None:
    """In one item's span of the speaker monitor (it begins at the item's first sound, which is the
    reply's leading near-silence after its first sample): ms from the span's start to the end of
    the last audible 1 ms (RMS above ``threshold``) before the first run of at least 60 ms no
    louder than QUIET_FLOOR that starts after ``cut_ms - 20`` (the cut, in ms into the span; the
    reply's own pauses are under 50 ms). None if there is no such run in the span or nothing
    audible before it."""
    a, b = span
    seg = recording[a:b]
    if len(seg) < 24:
        return None
    quiet = (np.abs(seg.astype(np.int32)) <= QUIET_FLOOR).astype(np.int8)
    edges = np.diff(np.concatenate(([0], quiet, [0])))
    run_a, run_b = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    ok = np.flatnonzero((run_b - run_a >= 1440) & (run_a >= (cut_ms - 20) * 24))
    if not len(ok):
        return None
    stop = int(run_a[ok[0]])
    k = stop // 24
    ms = seg[:k * 24].astype(np.float64).reshape(k, 24)
    loud = np.flatnonzero(np.sqrt((ms ** 2).mean(axis=1)) > threshold)
    if not len(loud):
        return None
    return float(loud[-1] + 1)


def truncation_errors_from_recording(recording: np.ndarray, rec_start_s: float, reply: np.ndarray,
                                     cuts: list[tuple[int, int | None, int, float]]) -> list[float]:
    """How far each truncation's ``audio_end_ms`` is from what the speaker monitor recorded.

    ``cuts``: (first_sample_mono_ns, next item's first_sample_mono_ns or None, audio_end_ms,
    stretch_ms) per interruption; the item played ``stretch_ms`` longer than its audio up to the
    cut (time-stretching), so the recording's span is that much longer than what it played. Every reply is the
    same speech (``reply``, the server's PCM), so in each item's
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
class Engine(BusLog):
    """``engine start`` on the virtual devices, with a bus subscriber and publisher for the bench.

    ``audio`` / ``session`` / ``local_server``: YAML flow mappings merged over the bench's config."""

    def __init__(self, tmp: Path, scen: Path, audio: str = "", session: str = "turn_detection: null, transcription: null",
                 local_server: str = "asr: false", extra_prefixes: tuple[str, ...] = ()) -> None:
        cfg = tmp / "engine.yaml"
        self.record_dir = tmp / "rec"
        cfg.write_text(f"record: {self.record_dir}\n"
                       f"audio: {{backend: {BACKEND}, mic: vmic, speaker: vspk, prebuffer_ms: {PREBUFFER_MS}, "
                       f"period_ms: {PERIOD_MS}, "
                       f"playback_period_ms: {PLAYBACK_PERIOD_MS}, echo: aec{', ' + audio if audio else ''}}}\n"
                       f"local_server: {{{local_server}, scenario: {scen}}}\n"
                       f"session: {{{session}}}\n")
        self.env = dict(os.environ, REALTALK_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"))
        self.env.pop("OPENAI_API_KEY", None)
        self.exec_mono = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--config",
                                      str(cfg)], stdout=subprocess.PIPE, text=True, env=self.env, cwd=str(REPO))
        self.ready_ms = None
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if "ready in" in line:
                self.ready_ms = (time.monotonic() - self.exec_mono) * 1000  # from the exec, seen from outside
                break
        if self.ready_ms is None:
            raise RuntimeError(f"engine start exited with {self.proc.wait()} before it was ready")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        self.conn = json.loads((tmp / "run" / "engine.json").read_text())
        from bus import Publisher, Subscriber
        self.sub = Subscriber(self.conn["subscribe"], ["playback.", "playout.", "latency.", "engine.error",
                                                       "response.done", "cmd.ack", "server.error", "capture.echo",
                                                       *extra_prefixes])
        self.pub = Publisher(self.conn["publish"], "bench")
        self.pub.join(self.conn["subscribe"])
        self.log: list[tuple[str, dict[str, Any]]] = []

    def seen_or_wait(self, mark: int, topic: str, timeout: float = 20) -> dict[str, Any]:
        """The first ``topic`` message logged since ``mark``, waiting for it if need be."""
        for t, b in self.log[mark:]:
            if t == topic:
                return b
        return self.wait(topic, timeout)

    def turn(self, n: int) -> None:
        mark = len(self.log)
        self.pub.publish("cmd.say", {"text": f"Turn {n}", "id": f"turn-{n}-{time.monotonic_ns()}"})
        self.wait("playout.stopped", timeout=30)
        if not any(t == "latency.turn" for t, _ in self.log[mark:]):
            self.wait("latency.turn", timeout=5)

    def stop(self) -> None:
        stop_engine(self.proc)

    def played(self) -> np.ndarray:
        """What playback handed to the device this session (the recording's right channel)."""
        return played_channel(self.record_dir)


# ------------------------------------------------------------------ the first delta's wait (issue 25)
LINKS = (("clean", 0.0), ("jitter30", float(JITTER_MS)))   #: (name, the server's delta_jitter_ms)
FIRST_DELTA_TURNS = 5      #: the conversation suite's replies per link (after a warm-up); the jitter suite's: --turns
#: silence between one reply's end and the next request: with the server's answer and a small start delay
#: the recording then has the 50 ms of silence before each reply ``response_spans`` finds replies by
#: (without it a clean link's replies, 20 ms apart, were not found and their gaps not counted)
BETWEEN_REPLIES_S = 0.1
TARGET_SAMPLE_S = 0.02     #: the adaptive target is read from the speaker ring this often (the plot)


def jitter_scenario(tmp: Path, jitter_ms: float) -> Path:
    """The conversation's reply, each delta up to |N(0, ``jitter_ms``)| late (seed 7)."""
    path = tmp / f"jitter{jitter_ms:g}.yaml"
    path.write_text(f'default_reply: "{REPLY}"\nfaults: {{delta_jitter_ms: {jitter_ms}, seed: 7}}\n')
    return path


class TargetSampler:
    """Reads the speaker ring's ``target_frames`` (and the time) every TARGET_SAMPLE_S, from a thread."""

    def __init__(self, conn: dict[str, Any]) -> None:
        from engine.audio.ring import Ring
        self.ring = Ring.attach(conn["ring_names"]["speaker"])
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(TARGET_SAMPLE_S):
            self.samples.append((time.monotonic(), self.ring.control.target_frames / 24))

    def close(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.thread.join(1)
        self.ring.close()
        return self.samples


def first_delta_session(tmp: Path, mode: str, jitter_ms: float, turns: int, sample: bool = False) -> dict[str, Any]:
    """One engine (``audio.jitter_buffer: mode``) against the local server at real time, its deltas
    ``jitter_ms`` late at most: a warm-up reply, then ``turns`` replies one after another. Per reply:
    first delta -> first sample handed to the device (latency.turn), the start delay playback used,
    short gaps in what playback handed the device (``count_gaps``), and the delta arrival figures the
    realtime core measured. ``sample``: also the ring's target over the session (``_samples``,
    ``_jitter``), for the jitter suite's plot. The conversation and jitter suites' one function."""
    run = tmp / f"{mode}-{jitter_ms:g}"
    run.mkdir()
    eng = Engine(run, jitter_scenario(run, jitter_ms), audio=f"jitter_buffer: {mode}")
    sampler = TargetSampler(eng.conn) if sample else None
    t0 = time.monotonic()
    try:
        eng.turn(0)
        warm_start = [b["first_sample_mono_ns"] for t, b in eng.log if t == "playout.started"][:1]
        first = [b for t, b in eng.log if t == "latency.turn"][:1]
        eng.log.clear()
        for n in range(1, turns + 1):
            eng.pump(BETWEEN_REPLIES_S)
            eng.turn(n)
        eng.pump(0.5)
        log = eng.log[:]
    finally:
        samples = sampler.close() if sampler is not None else []
        eng.stop()
    played = eng.played()
    lat = [b for t, b in log if t == "latency.turn"]
    started = [b for t, b in log if t == "playback.started"]
    starts = [b["first_sample_mono_ns"] for t, b in log if t == "playout.started"]
    spans = response_spans(played, warm_start + starts)[len(warm_start):]
    gaps = span_underruns(played, spans)
    echoes = [b for t, b in log if t == "capture.echo"]
    waits = [t["first_delta_to_device_ms"] for t in lat if t.get("first_delta_to_device_ms") is not None]
    delays = [b["prebuffer_ms"] for b in started if "prebuffer_ms" in b]
    stopped = [b for t, b in log if t == "playback.stopped"]
    expanded_ms = sum(float(b.get("expanded_ms") or 0) for b in stopped)
    out: dict[str, Any] = {
        "replies": len(waits),
        "first_reply_first_delta_to_device_ms": first[0]["first_delta_to_device_ms"] if first else None,
        "first_delta_to_device_ms_p50": pct(waits, 50), "first_delta_to_device_ms_p99": pct(waits, 99),
        "first_delta_to_device_ms_max": max(waits, default=None),
        "start_delay_ms_p50": pct(delays, 50), "start_delay_ms_p99": pct(delays, 99),
        "start_delay_ms_max": max(delays, default=None),
        "device_lead_ms_p50": pct([b["device_lead_ms"] for b in started if "device_lead_ms" in b], 50),
        "short_gaps": sum(g for g in gaps if g > 0),
        "short_gaps_per_reply": round(sum(g for g in gaps if g > 0) / max(1, sum(1 for g in gaps if g >= 0)), 3),
        "replies_checked_for_gaps": sum(1 for g in gaps if g >= 0),
        "underruns_reported": sum(1 for t, _ in log if t == "playout.underrun"),
        # the recording's reference is zero-padded where playback was behind the mic (a loaded machine):
        # such padding reads as a short gap; not 0 here means short_gaps counts some that were not played
        "recording_padded_frames": (echoes[-1].get("far_missing_frames", 0) - echoes[0].get("far_missing_frames", 0))
        if len(echoes) > 1 else None,
        "device_underflows": sum(int(b.get("device_underflows") or 0) for b in stopped),
        "expanded_ms": round(expanded_ms, 1),
        "expanded_percent_of_played": round(100 * expanded_ms / max(1, sum(int(b.get("played_ms") or 0)
                                                                           for b in stopped)), 2),
        "delta_interval_ms_std_p50": pct([t["delta_interval_ms_std"] for t in lat], 50),
        "delta_interval_ms_max": max([t["delta_interval_ms_max"] for t in lat], default=None),
        "deltas_per_reply_p50": pct([t["deltas"] for t in lat if t.get("deltas") is not None], 50),
    }
    if sample:
        out["_samples"] = [(round(t - t0, 3), ms) for t, ms in samples]
        replies = [round(b["first_sample_mono_ns"] / 1e9 - t0, 3) for b in started]
        out["_jitter"] = [(at, t["delta_interval_ms_std"], t["delta_interval_ms_max"]) for at, t in zip(replies, lat)]
    return out


def bench_first_delta(tmp: Path, turns: int, modes: tuple[str, ...] = ("adaptive",),
                      sample: bool = False) -> dict[str, Any]:
    """:func:`first_delta_session` on each link (clean, 30 ms jitter) for each jitter buffer mode, one
    session after another: ``<mode>_<figure>_<link>``, and the issue's names
    ``engine_first_delta_to_device_ms_p99_<link>`` (the adaptive buffer's; ``..._fixed`` beside it when
    measured). ``sample``: the adaptive jittery session's target over time under ``_plot``."""
    out: dict[str, Any] = {}
    for link, jitter in LINKS:
        for mode in modes:
            got = first_delta_session(tmp, mode, jitter, turns, sample=sample and mode == "adaptive" and jitter > 0)
            if "_samples" in got:
                out["_plot"] = {"samples": got.pop("_samples"), "jitter": got.pop("_jitter")}
            out.update({f"{mode}_{k}_{link}": v for k, v in got.items()})
        for mode in modes:
            suffix = "" if mode == "adaptive" else f"_{mode}"
            out[f"engine_first_delta_to_device_ms_p99_{link}{suffix}"] = out[f"{mode}_first_delta_to_device_ms_p99_{link}"]
    return out


def bench_engine(tmp: Path, scen: Path, interruptions: int) -> dict[str, Any]:
    from engine.server.voice import synthesize
    reply = synthesize(REPLY, "marin", 1.0)
    level = float(np.sqrt(np.mean(reply.astype(np.float64) ** 2)))
    # the echo path: what the speaker plays reaches the mic at 60 % volume; the engine cancels it (AEC3)
    vaudio("echo-on", "60%")
    eng = Engine(tmp, scen)
    try:
        eng.turn(0)  # warm-up
        warm_start = [b["first_sample_mono_ns"] for t, b in eng.log if t == "playout.started"][:1]
        eng.log.clear()
        ticks = cpu_ticks()
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
        silence_ms: list[float] = []   # cmd.cancel published (bench process) -> fade done (old definition)
        engine_ms: list[float] = []    # the engine took the barge-in -> the device callback began the fade
        cancel_ns: list[int] = []      # when the bench published each cmd.cancel
        # (first sample handed to the device, audio_end_ms, item id, stretch_ms at the cut)
        cut_points: list[tuple[int, int, str, float]] = []
        interrupt_ns: list[int] = []
        # the flush callback: (flush_mono_ns, the item's ms where the fade it handed the device begins)
        flush_points: list[tuple[int, float]] = []
        device_gapped: set[str] = set()   # items whose flush report counted a device underflow
        monitor = MonitorRecorder(tmp / "monitor.raw")
        for n in range(interruptions):
            mark = len(eng.log)
            eng.pub.publish("cmd.say", {"text": f"Interrupt {n}", "id": f"int-{n}-{time.monotonic_ns()}"})
            started = eng.seen_or_wait(mark, "playout.started")   # playback's report, mapped to its item
            time.sleep(rng.uniform(0.05, 1.5))
            t_ns = time.monotonic_ns()
            mark_cancel = len(eng.log)
            eng.pub.publish("cmd.cancel", {"id": f"cancel-{n}"})
            flush = eng.seen_or_wait(mark_cancel, "playback.flushed", 5)
            cut = eng.seen_or_wait(mark_cancel, "playout.interrupted", 5)
            eng.seen_or_wait(mark, "response.done", 10)
            silence_ms.append((flush["flush_mono_ns"] - t_ns) / 1e6 + FLUSH_FADE_MS)  # + the fade
            engine_ms.append((flush["flush_mono_ns"] - cut["interrupt_mono_ns"]) / 1e6)
            cancel_ns.append(t_ns)
            interrupt_ns.append(cut["interrupt_mono_ns"])
            # the flushed index is where the fade ends (what the listener has heard once it is done)
            flush_points.append((flush["flush_mono_ns"], (flush["index"] - flush["start_index"]) / 24 - FLUSH_FADE_MS))
            cut_points.append((started["first_sample_mono_ns"], cut["played_ms"], started["item_id"],
                               flush.get("stretch_ms", 0.0)))
            if flush.get("device_underflows"):
                device_gapped.add(started["item_id"])
        time.sleep(0.5)  # the last fade reaches the monitor
        recording = monitor.stop()
        inter = eng.log[:]
        mic = eng.wait("latency.mic", timeout=10)
        steal = steal_percent_since(ticks)
    finally:
        eng.stop()
        vaudio("echo-off")
    played = eng.played()
    cuts = [(start, cut_points[i + 1][0] if i + 1 < len(cut_points) else None, end_ms, stretch_ms)
            for i, (start, end_ms, _, stretch_ms) in enumerate(cut_points)]
    heard_err = truncation_errors_from_recording(recording, monitor.start_s, reply, cuts)
    # barge-in to silence, at the speaker monitor: each item's span of the recording, aligned on its
    # own first sample (= first_sample_mono_ns, when playback handed it to the device); silent =
    # after the last 1 ms whose RMS is above -40 dB of the reply's RMS
    spans = response_spans(recording, [c[0] for c in cut_points], QUIET_FLOOR)
    # a span begins at the item's first sound, the reply's own leading near-silence after its first sample
    onset_ms = int(np.argmax(np.abs(reply.astype(np.int32)) > QUIET_FLOOR)) / 24
    silent_engine: list[float] = []
    silent_bus: list[float] = []
    already_quiet = 0
    for (_, _, _, stretch_ms), span, i_ns, c_ns, (flush_ns, fade_at_ms) in zip(cut_points, spans, interrupt_ns,
                                                                                 cancel_ns, flush_points):
        # item ms -> ms into its span: less the onset, plus what stretching added up to the cut
        to_span_ms = stretch_ms - onset_ms
        cut_item_ms = fade_at_ms - (flush_ns - i_ns) / 1e6   # what had been handed to the device at the cut
        got = silence_after_cut_ms(recording, span, cut_item_ms + to_span_ms, 0.01 * level)
        if got is None:
            already_quiet += 1
            continue
        # the item's ms at its last audible one, put on CLOCK_MONOTONIC by the flush callback (it handed
        # the fade's first sample, ms fade_at_ms, at flush_ns), as the first sample is by first_sample_mono_ns
        silent_ns = flush_ns + (got - to_span_ms - fade_at_ms) * 1e6
        if silent_ns <= i_ns:   # the cut fell in a pause of the speech: nothing to silence
            already_quiet += 1
            continue
        silent_engine.append((silent_ns - i_ns) / 1e6)
        silent_bus.append((silent_ns - c_ns) / 1e6)
    if os.environ.get("REALTALK_BENCH_DUMP"):   # the raw material, to look into a bad figure
        dump = Path(os.environ["REALTALK_BENCH_DUMP"]) / BACKEND   # each backend apart
        dump.mkdir(parents=True, exist_ok=True)
        np.save(dump / "monitor.npy", recording)
        np.save(dump / "played.npy", played)
        (dump / "run.json").write_text(json.dumps({"rec_start_s": monitor.start_s, "cuts": cuts,
                                                   "errors": heard_err, "log": inter}, default=str))
    # an underrun puts a gap in the recording that is not in the item's audio, and so does the device
    # running dry (a scheduling stall of the playback process longer than the device's buffer): the
    # check is reported over all items, and without those
    gapped = {b.get("item_id") for t, b in inter if t == "playout.underrun"} | device_gapped
    heard_err_clean = [e for e, (_, _, item_id, _) in zip(heard_err, cut_points) if item_id not in gapped]
    turns = [b for t, b in quiet + loaded if t == "latency.turn"]
    interrupted = [b for t, b in inter if t == "playout.interrupted"]
    flushed = [b for t, b in inter if t == "playback.flushed"]
    api_errors = [b for t, b in quiet + loaded + inter if t == "server.error"]
    trunc_self = [abs(i["played_ms"] - f["played_ms"]) for i, f in zip(interrupted, flushed)]
    # underruns at the speaker monitor, one function for engine and baseline
    starts = [b["first_sample_mono_ns"] for t, b in quiet + loaded if t == "playout.started"]
    n_quiet = sum(1 for t, _ in quiet if t == "playout.started")
    # the next response after the turns (the interruptions' first) bounds the last turn's span, which
    # would otherwise run to the end of the recording and count every pause between those replies
    after = [b["first_sample_mono_ns"] for t, b in inter if t == "playout.started"][:1]
    spans = response_spans(played, warm_start + starts + after)[len(warm_start):len(warm_start) + len(starts)]
    gaps = span_underruns(played, spans)
    gap_ms = gap_lengths_ms(played, spans)
    cadence = [b for t, b in quiet + loaded if t == "playback.cadence"]
    echoes = [b for t, b in quiet + loaded if t == "capture.echo"]
    d2d_p99 = pct([t["first_delta_to_device_ms"] for t in turns], 99)
    # delta -> device beyond the start delay the renderer chose for that reply (the adaptive jitter
    # buffer's target, or the fixed prebuffer; playout.started prebuffer_ms): what the engine adds
    start_delay = {b.get("item_id"): b.get("prebuffer_ms", PREBUFFER_MS) for t, b in quiet + loaded
                   if t == "playout.started"}
    beyond_p99 = pct([t["first_delta_to_device_ms"] - start_delay.get(t.get("item_id"), PREBUFFER_MS)
                      for t in turns if t.get("first_delta_to_device_ms") is not None], 99)
    added = (mic["p99_ms"] + beyond_p99) if beyond_p99 is not None and mic.get("p99_ms") is not None else None
    held_means = [e["mic_held_back_ms"] for e in echoes if e.get("mic_held_back_ms") is not None]
    held_mean = round(sum(held_means) / len(held_means), 1) if held_means else None
    held_max = max([e["mic_held_back_ms_max"] for e in echoes if e.get("mic_held_back_ms_max") is not None],
                   default=None)
    return {
        "engine_mic_to_socket_ms_p50": mic["p50_ms"], "engine_mic_to_socket_ms_p99": mic["p99_ms"],
        "engine_delta_to_device_ms_p50": pct([t["first_delta_to_device_ms"] for t in turns], 50),
        "engine_delta_to_device_ms_p99": d2d_p99,
        "engine_delta_to_device_bound_ms": PREBUFFER_MS + PLAYBACK_PERIOD_MS,
        "engine_delta_to_device_beyond_start_delay_ms_p99": beyond_p99,
        "engine_added_latency_ms_p99": round(added, 2) if added is not None else None,
        "engine_added_latency_goal_ms": 5.0,
        "machine_cpu_steal_percent_turns_to_mic_report": steal,
        "engine_request_to_device_ms_p50": pct([t["to_device_ms"] for t in turns], 50),
        "delta_interval_ms_std_mean": pct([t["delta_interval_ms_std"] for t in turns], 50),
        "engine_underruns_jitter30": sum(g for g in gaps[:n_quiet] if g > 0),
        "engine_underruns_under_cpu_load": sum(g for g in gaps[n_quiet:] if g > 0),
        "engine_underruns_responses_checked": sum(1 for g in gaps if g >= 0),
        "engine_underrun_gap_ms_p50": pct(gap_ms, 50), "engine_underrun_gap_ms_max": max(gap_ms, default=None),
        # the recording's reference is zero-padded where playback was behind the mic (or the speaker
        # ran dry), and frames are skipped where they came too late for their time: a padding would
        # read as a gap; 0 here means the recording is what playback handed out
        "engine_recording_padded_frames_during_turns": (echoes[-1].get("far_missing_frames", 0)
                                                         - echoes[0].get("far_missing_frames", 0)) if echoes else None,
        "engine_recording_skipped_frames_during_turns": (echoes[-1].get("far_skipped_frames", 0)
                                                          - echoes[0].get("far_skipped_frames", 0)) if echoes else None,
        # what the capture step held the mic back before the ring (capture.echo, each report's mean and
        # most over its chunks): before the mic -> socket figure starts, so not in engine_added_latency
        "engine_mic_held_back_ms_mean_during_turns": held_mean,
        "engine_mic_held_back_ms_max_during_turns": held_max,
        "engine_underruns_recording_exact": bool(echoes) and all(
            echoes[-1].get(k, 0) == echoes[0].get(k, 0) for k in ("far_missing_frames", "far_skipped_frames")),
        "engine_device_underflows_during_turns": (cadence[-1].get("device_underflows", 0)
                                                  - cadence[0].get("device_underflows", 0)) if cadence else None,
        # the libpulse speaker's buffer rises each time the sink runs dry (_native.c): where it ended
        "engine_device_buffer_ms_max_during_turns": max([c["device_buffer_ms"] for c in cadence
                                                         if "device_buffer_ms" in c], default=None),
        "engine_underruns_reported_jitter30": sum(1 for t, _ in quiet if t == "playout.underrun"),
        "engine_underruns_reported_under_cpu_load": sum(1 for t, _ in loaded if t == "playout.underrun"),
        # time-stretching over late deltas (audio.time_stretch): responses it touched, and by how much
        "engine_stretched_responses": sum(1 for t, b in quiet + loaded if t == "playout.stopped"
                                          and b.get("expanded_ms")),
        "engine_stretched_responses_of": sum(1 for t, _ in quiet + loaded if t == "playout.stopped"),
        "engine_expanded_ms_max": max([b.get("expanded_ms", 0) for t, b in quiet + loaded
                                       if t == "playout.stopped"], default=None),
        "engine_stretch_left_ms_max": max([abs(b.get("stretch_ms", 0)) for t, b in quiet + loaded
                                           if t == "playout.stopped"], default=None),
        "stretched_interruptions": sum(1 for c in cut_points if c[3]),
        "engine_turns": len(turns),
        "bargein_fade_start_ms_p50": pct(engine_ms, 50), "bargein_fade_start_ms_p99": pct(engine_ms, 99),
        "bargein_silent_ms_p50": pct(silent_engine, 50), "bargein_silent_ms_p99": pct(silent_engine, 99),
        "bargein_silent_ms_max": max(silent_engine) if silent_engine else None,
        "bargein_silent_measured": len(silent_engine), "bargein_cut_in_a_pause": already_quiet,
        "bargein_from_bus_command_silent_ms_p99": pct(silent_bus, 99),
        "old_bargein_silent_ms_p99_fade_start_plus_fade": pct([m + FLUSH_FADE_MS for m in engine_ms], 99),
        "old_bargein_from_bus_command_silent_ms_p99_fade_start_plus_fade": pct(silence_ms, 99),
        "interruptions": len(interrupted),
        "truncations_measured": sum(1 for i in interrupted if i.get("measured")),
        "truncation_sent_vs_flush_report_ms_max": max(trunc_self) if trunc_self else None,
        "truncation_api_errors": len(api_errors),
        "truncation_vs_speaker_monitor_error_ms_p50": pct(heard_err, 50),
        "truncation_vs_speaker_monitor_error_ms_p99": pct(heard_err, 99),
        "truncation_vs_speaker_monitor_error_ms_max": max(heard_err) if heard_err else None,
        "truncation_vs_speaker_monitor_within_10ms": sum(1 for e in heard_err if e <= 10),
        "truncation_vs_speaker_monitor_checked": len(heard_err),
        "truncation_vs_speaker_monitor_no_gap_error_ms_p99": pct(heard_err_clean, 99),
        "truncation_vs_speaker_monitor_no_gap_error_ms_max": max(heard_err_clean) if heard_err_clean else None,
        "truncation_vs_speaker_monitor_no_gap_within_10ms": sum(1 for e in heard_err_clean if e <= 10),
        "truncation_vs_speaker_monitor_no_gap_checked": len(heard_err_clean),
        "truncation_items_with_gap": len(heard_err) - len(heard_err_clean),
        "underruns_during_interruptions": sum(1 for t, _ in inter if t == "playout.underrun"),
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
    with local_server(scen) as url:
        result, played, starts, old_count = asyncio.run(_baseline(url, load, turns))
    key = "baseline_under_cpu_load" if load else "baseline"
    spans = [(a, b) for a, b in zip(starts, starts[1:] + [len(played)])]
    gaps = span_underruns(played, spans)
    gap_ms = gap_lengths_ms(played, spans)
    result[f"{key}_underruns"] = sum(g for g in gaps if g > 0)   # what it handed the device, counted as the engine's are
    result[f"{key}_underruns_responses_checked"] = sum(1 for g in gaps if g >= 0)
    result[f"{key}_underrun_gap_ms_p50"] = pct(gap_ms, 50)
    result[f"{key}_underrun_gap_ms_max"] = max(gap_ms, default=None)
    result[f"old_{key}_underruns_short_callbacks"] = old_count   # the old count: every short callback
    return result


@dataclass
class _BaselineState:
    """What the baseline's device callback and its asyncio loop share (under their lock)."""
    underruns: int = 0              # short callbacks inside a response (the old count)
    in_response: bool = False
    first_out: float | None = None  # time.monotonic() of this response's first sample handed to the device
    first_at: int = 0               # where that sample is in ``played`` (frames)
    done_audio: bool = False
    device_underflows: int = 0


async def _baseline(url: str, load: bool, turns: int) -> tuple[dict[str, Any], np.ndarray, list[int], int]:
    import pyaudio
    from openai import AsyncOpenAI
    from engine.audio.devices import find_device, open_pyaudio
    pa = open_pyaudio()
    dev = find_device(pa, "vspk", "output")
    lock = threading.Lock()
    buf = bytearray()
    state = _BaselineState()
    played = bytearray()   # every byte the callback handed to the device, silence included

    def callback(in_data: Any, frame_count: int, time_info: Any, status: int) -> tuple[bytes, int]:
        need = frame_count * 2
        with lock:
            chunk = bytes(buf[:need])
            del buf[:need]
            if chunk and state.first_out is None:
                state.first_out = time.monotonic()
                state.first_at = len(played) // 2
            if status & pyaudio.paOutputUnderflow:
                state.device_underflows += 1
            if len(chunk) < need and state.in_response and not state.done_audio:
                state.underruns += 1
        out = chunk + bytes(need - len(chunk))
        played.extend(out)
        return out, pyaudio.paContinue

    stream = pa.open(format=pyaudio.paInt16, channels=1, rate=24000, output=True, output_device_index=dev["index"],
                     frames_per_buffer=24 * PLAYBACK_PERIOD_MS, stream_callback=callback)
    delta_to_device: list[float] = []
    starts: list[int] = []   # where each response's first sample is in ``played`` (frames)
    client = AsyncOpenAI(api_key="sk-local", websocket_base_url=url)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        for n in range(turns):
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": f"Turn {n}"}]})
            await conn.response.create()
            first_delta = None
            with lock:
                state.in_response, state.first_out, state.done_audio = True, None, False
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
                        state.done_audio = True
                elif ev.type == "response.done":
                    break
            while True:
                with lock:
                    if not buf:
                        break
                await asyncio.sleep(0.02)
            with lock:
                state.in_response = False
                if state.first_out is not None and first_delta is not None:
                    delta_to_device.append((state.first_out - first_delta) * 1000)
                    starts.append(state.first_at)
    stream.stop_stream()
    stream.close()
    pa.terminate()
    key = "baseline_under_cpu_load" if load else "baseline"
    return ({f"{key}_delta_to_device_ms_p50": pct(delta_to_device, 50),
             f"{key}_delta_to_device_ms_p99": pct(delta_to_device, 99), f"{key}_turns": turns,
             f"{key}_device_underflows": state.device_underflows},
            np.frombuffer(bytes(played), dtype=np.int16), starts, state.underruns)


# ------------------------------------------------------------------ double talk
USER_SPEECH = "Wait, stop please, what is the weather like in Paris today?"
DT_LEVELS_DB = (0, -10, -20)   # the user's speech at the mic relative to the model's echo there
DT_REPLY = " ".join([REPLY] * 3)


def rms_loud(pcm: np.ndarray) -> float:
    """RMS over the 5 ms windows within 30 dB of the loudest one (speech, not its pauses)."""
    n = len(pcm) // WINDOW
    w = np.sqrt((pcm[:n * WINDOW].astype(np.float64).reshape(n, WINDOW) ** 2).mean(axis=1))
    if not len(w) or w.max() <= 0:
        return 0.0
    loud = w[w > w.max() * 10 ** (-30 / 20)]
    return float(np.sqrt((loud ** 2).mean()))


def write_wav(path: Path, pcm: np.ndarray) -> None:
    import wave
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm.astype(np.int16).tobytes())


def words(text: str) -> set[str]:
    return {w.strip(".,?!").lower() for w in text.split() if len(w.strip(".,?!")) > 2}


def bench_double_talk(tmp: Path, trials: int, echo_trials: int = 2) -> dict[str, Any]:
    """The user talks over the model: their speech is played into the mic (PulseAudio's micsink, where
    the echo path also lands) at 0, -10 and -20 dB relative to the model's echo at the mic, with
    the echo guard on (audio.echo_guard_db -6) and off (null), server VAD on (it interrupts,
    creates no response). Per setting: barge-ins that happened (user.speech.started, then
    playout.interrupted with reason speech, within 2 s of the user's speech starting), how much
    of the user's speech the server detected (its speech_started .. speech_stopped span, less
    the VAD's prefix padding and silence, over the utterance's length), the words of the
    server's transcript (the local server's offline recogniser) found in what the user said, and
    false barge-ins from the echo alone (replies played in full, nobody talking)."""
    from engine.server.voice import synthesize
    scen = tmp / "dt.yaml"
    scen.write_text(f'default_reply: "{DT_REPLY}"\n')
    user = synthesize(USER_SPEECH, "alloy", 1.0)
    user_ms = len(user) / 24
    user_rms = rms_loud(user)
    vaudio("echo-on", "60%")
    out: dict[str, Any] = {"double_talk_user_speech_ms": round(user_ms), "double_talk_trials_per_level": trials}
    echo_rms = None
    rng = random.Random(11)
    try:
        for guard, guard_yaml in (("guard_on", "-6.0"), ("guard_off", "null")):
            run_dir = tmp / f"dt-{guard}"
            run_dir.mkdir()
            eng = Engine(run_dir, scen, audio=f"echo_guard_db: {guard_yaml}",
                         session="turn_detection: {type: server_vad, create_response: false, interrupt_response: true}",
                         local_server="asr: true", extra_prefixes=("user.",))
            try:
                if echo_rms is None:   # the model's echo at the mic: record the mic sink during a reply
                    rec = subprocess.Popen(["parec", "-d", "micsink.monitor", "--rate=24000", "--channels=1",
                                            "--format=s16le", "--raw", "--latency-msec=10"], stdout=subprocess.PIPE)
                    mark = len(eng.log)
                    eng.pub.publish("cmd.say", {"text": "calibrate", "id": f"cal-{time.monotonic_ns()}"})
                    eng.seen_or_wait(mark, "playout.started", 20)
                    eng.pump(4.0)
                    rec.terminate()
                    echo_pcm = np.frombuffer(rec.communicate(timeout=10)[0], dtype=np.int16)
                    echo_rms = rms_loud(echo_pcm)
                    eng.pub.publish("cmd.cancel", {"id": f"cal-cancel-{time.monotonic_ns()}"})
                    eng.pump(1.5)
                    out["double_talk_echo_dbfs_at_mic"] = round(20 * np.log10(max(echo_rms, 1e-9) / 32768), 1)
                # echo alone: whole replies, nobody talking
                mark = len(eng.log)
                for n in range(echo_trials):
                    m = len(eng.log)
                    eng.pub.publish("cmd.say", {"text": f"echo {n}", "id": f"echo-{guard}-{n}-{time.monotonic_ns()}"})
                    try:
                        eng.seen_or_wait(m, "response.done", 40)
                    except TimeoutError:
                        pass
                    eng.pump(1.0)
                seg = eng.log[mark:]
                out[f"double_talk_{guard}_false_bargeins_echo_alone"] = sum(
                    1 for t, b in seg if t == "playout.interrupted" and b.get("reason") == "speech")
                out[f"double_talk_{guard}_false_speech_detected_echo_alone"] = sum(
                    1 for t, _ in seg if t == "user.speech.started")
                out[f"double_talk_{guard}_echo_alone_replies"] = echo_trials
                for db in DT_LEVELS_DB:
                    gain = (echo_rms or 1.0) * 10 ** (db / 20) / max(user_rms, 1e-9)
                    wav = run_dir / f"user{db}.wav"
                    write_wav(wav, np.clip(user.astype(np.float64) * gain, -32768, 32767))
                    hits, valid, cut_before, transcripts, detected, heard_words = 0, 0, 0, 0, [], []
                    for n in range(trials):
                        m = len(eng.log)
                        eng.pub.publish("cmd.say", {"text": f"talk {n}", "id": f"dt-{guard}-{db}-{n}-{time.monotonic_ns()}"})
                        eng.seen_or_wait(m, "playout.started", 20)
                        eng.pump(rng.uniform(1.0, 2.5))
                        m_user = len(eng.log)
                        t_user = time.monotonic()
                        subprocess.run(["paplay", "--device=micsink", str(wav)], timeout=30)
                        eng.pump(2.0)   # VAD silence, transcription
                        if any(t in ("playout.interrupted", "playout.stopped") for t, _ in eng.log[m:m_user]):
                            cut_before += 1   # the echo (or the reply's end) got there first: not a double-talk trial
                            eng.pub.publish("cmd.cancel", {"id": f"dt-cancel-{guard}-{db}-{n}"})
                            eng.pump(1.0)
                            continue
                        valid += 1
                        seg = [(t, b) for t, b in eng.log[m_user:] if b.get("mono_ns", 0) >= t_user * 1e9 - 1e8]
                        interrupted = [b for t, b in seg if t == "playout.interrupted" and b.get("reason") == "speech"
                                       and b.get("mono_ns", 0) / 1e9 - t_user < user_ms / 1000 + 2.0]
                        hits += bool(interrupted)
                        transcripts += sum(1 for t, _ in seg if t == "user.transcript.done")
                        started = [b for t, b in seg if t == "user.speech.started"]
                        stopped = [b for t, b in seg if t == "user.speech.stopped"]
                        span = 0.0
                        for a, b in zip(started, stopped):
                            if isinstance(a.get("audio_start_ms"), int) and isinstance(b.get("audio_end_ms"), int):
                                span += max(0, b["audio_end_ms"] - a["audio_start_ms"] - 300 - 500)  # less padding, silence
                        detected.append(min(1.0, span / user_ms))
                        text = " ".join(b.get("text", "") for t, b in seg if t == "user.transcript.done")
                        said = words(USER_SPEECH)
                        heard_words.append(len(words(text) & said) / len(said))
                        eng.pub.publish("cmd.cancel", {"id": f"dt-cancel-{guard}-{db}-{n}"})   # if still talking
                        eng.pump(1.0)
                    key = f"double_talk_{guard}_{'0' if db == 0 else 'minus' + str(-db)}db"
                    out[f"{key}_bargein_rate"] = round(hits / valid, 2) if valid else None
                    out[f"{key}_trials_valid"] = valid
                    out[f"{key}_trials_reply_cut_before_user_spoke"] = cut_before
                    out[f"{key}_transcripts_received"] = transcripts
                    out[f"{key}_speech_detected_fraction_mean"] = round(float(np.mean(detected)), 2) if detected else None
                    out[f"{key}_transcript_words_found_mean"] = round(float(np.mean(heard_words)), 2) if heard_words else None
                echo = [b for t, b in eng.log if t == "capture.echo"]
                if echo:
                    out[f"double_talk_{guard}_guarded_ms"] = echo[-1].get("guarded_ms")
                    out[f"double_talk_{guard}_far_active_ms"] = echo[-1].get("far_active_ms")
            finally:
                eng.stop()
    finally:
        vaudio("echo-off")
    return out


# ------------------------------------------------------------------ playback stalls
STALLS_MS = (60, 120, 250, 500)
STALL_REPLY = " ".join([REPLY] * 2)     # about 9 s: every stall falls inside it with 5 s or more after
#: capture.echo counters whose growth each stall length reports (those the running engine publishes)
STALL_ECHO_COUNTERS = ("far_missing_frames", "far_skipped_frames", "far_gap_frames", "far_realignments",
                       "far_uncertain_ms", "guard_holds", "guard_held_ms", "talkers")


def _delay_ms(mic: np.ndarray, ref: np.ndarray, at: int, window: int = 12000, lags: int = 24 * 300) -> float | None:
    """How far (ms) the reference leads its echo in the mic over ``window`` frames from ``at`` (the
    lag of the best correlation), or None where the mic is quiet or the match poor (under 0.5)."""
    if at < lags or at + window > min(len(mic), len(ref)):
        return None
    m, r = mic[at:at + window], ref[at - lags:at + window]
    if np.sqrt(np.mean(m ** 2)) < 100:
        return None
    c = np.correlate(r, m, mode="valid")
    k = int(np.argmax(np.abs(c)))
    if abs(c[k]) / (np.linalg.norm(m) * np.linalg.norm(r[k:k + window]) + 1e-9) <= 0.5:
        return None
    return (lags - k) / 24


def echo_delay_shifts_ms(recording: Path) -> list[float]:
    """Per stall in a session recording (mic left, the reference the canceller got right): how far
    the echo's delay moved across it. A stall is a run of at least 40 ms of exact zeros in the
    reference inside speech; its shift is the median delay (``_delay_ms``) of the three 0.5 s windows
    starting 0.5 s after it, less that of the three ending 1 s before it. Zeros that end the
    recording are no stall (nothing plays after them)."""
    import wave
    with wave.open(str(recording)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2).astype(np.float64)
    mic, ref = pcm[:, 0], pcm[:, 1]
    zero = (ref == 0).astype(np.int8)
    edges = np.diff(np.concatenate(([0], zero, [0])))
    shifts = []
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        if (b - a < 960 or a < 72000 or b + 4800 > len(ref)   # (the zeros a session ends with: no speech after)
                or np.abs(ref[a - 4800:a]).max() < 2000 or np.abs(ref[b:b + 4800]).max() < 2000):
            continue
        before = [d for k in (2, 3, 4) if (d := _delay_ms(mic, ref, int(a) - k * 12000)) is not None]
        after = [d for k in (1, 2, 3) if (d := _delay_ms(mic, ref, int(b) + k * 12000)) is not None]
        if before and after:
            shifts.append(float(np.median(after) - np.median(before)))
    return shifts


def _engine_pid(run_dir: Path, name: str) -> int:
    conn = json.loads((run_dir / "run" / "engine.json").read_text())
    return next(int(c["pid"]) for c in conn["children"] if c["name"] == name)


def bench_playback_stalls(tmp: Path, replies: int = 10, stalls_ms: tuple[int, ...] = STALLS_MS) -> dict[str, Any]:
    """The playback process stalls mid-reply (SIGSTOP, then SIGCONT ``stall`` ms later) with the echo
    path on (60 %), server VAD on (it interrupts on speech, creates no response), guard as configured
    (default): per stall length, ``replies`` replies, each stalled once at a random 1-3 s after its
    playout.started and then played to its end. A false barge-in is a ``playout.interrupted`` with
    reason speech during such a reply: nobody talks, so whatever the server took for speech was the
    model's own echo. Also the echo counters' growth over each length's replies and the ERLE after
    them (capture.echo). Definitions: bench/README.md "playback stalls"."""
    scen = tmp / "stall.yaml"
    scen.write_text(f'default_reply: "{STALL_REPLY}"\n')
    run_dir = tmp / "stall"
    run_dir.mkdir()
    vaudio("echo-on", "60%")
    out: dict[str, Any] = {"stall_replies_per_length": replies, "stall_lengths_ms": list(stalls_ms)}
    rng = random.Random(23)
    eng = Engine(run_dir, scen, session="turn_detection: {type: server_vad, create_response: false, "
                 "interrupt_response: true}, transcription: null", extra_prefixes=("user.",))
    try:
        def reply(label: str, stall_ms: int | None) -> tuple[list[tuple[str, dict[str, Any]]], float]:
            """One reply (stalled once if ``stall_ms``); its log from the say on, and how long playback stood."""
            m = len(eng.log)
            eng.pub.publish("cmd.say", {"text": label, "id": f"{label}-{time.monotonic_ns()}"})
            eng.seen_or_wait(m, "playout.started", 20)
            stood_ms = 0.0
            if stall_ms is not None:
                eng.pump(rng.uniform(1.0, 3.0))
                pid = _engine_pid(run_dir, "playback")
                t0 = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                try:
                    time.sleep(stall_ms / 1000)
                finally:
                    os.kill(pid, signal.SIGCONT)
                stood_ms = (time.monotonic() - t0) * 1000
            end = time.monotonic() + 30
            while time.monotonic() < end and not any(t in ("playout.stopped", "playout.interrupted")
                                                     for t, _ in eng.log[m:]):
                eng.pump(0.1)
            eng.pump(0.5)
            return eng.log[m:], stood_ms

        reply("warm-up", None)   # AEC3 converges on the echo path
        for stall_ms in stalls_ms:
            key = f"stall_{stall_ms}ms"
            echo_before = eng.wait("capture.echo", timeout=5)
            false_bargeins, speech_started, completed, stood = 0, 0, 0, []
            for n in range(replies):
                seg, stood_ms = reply(f"stall-{stall_ms}-{n}", stall_ms)
                stood.append(stood_ms)
                false_bargeins += sum(1 for t, b in seg if t == "playout.interrupted" and b.get("reason") == "speech")
                speech_started += sum(1 for t, _ in seg if t == "user.speech.started")
                completed += any(t == "playout.stopped" for t, _ in seg)
            echo_after = eng.wait("capture.echo", timeout=5)
            out[f"{key}_false_bargeins"] = false_bargeins
            out[f"{key}_false_speech_started"] = speech_started
            out[f"{key}_replies_played_to_end"] = completed
            out[f"{key}_stopped_ms_max"] = round(max(stood), 1)
            out[f"{key}_erle_db"] = echo_after.get("erle_db")
            for name in STALL_ECHO_COUNTERS:
                if name in echo_after:
                    out[f"{key}_{name}"] = echo_after[name] - echo_before.get(name, 0)
        out["stall_false_bargeins_total"] = sum(out[f"stall_{s}ms_false_bargeins"] for s in stalls_ms)
        echo = eng.wait("capture.echo", timeout=5)
        out["stall_echo_erle_db"] = echo.get("erle_db")
        out["stall_echo_erle_total_db"] = echo.get("erle_total_db")
    finally:
        eng.stop()
        vaudio("echo-off")
    shifts = np.abs(echo_delay_shifts_ms(next(eng.record_dir.glob("*/conversation.wav"))))
    out["stall_echo_delay_shift_ms_p50"] = pct(list(shifts), 50)
    out["stall_echo_delay_shift_ms_p90"] = pct(list(shifts), 90)
    out["stall_echo_delay_shift_ms_max"] = round(float(shifts.max()), 1) if len(shifts) else None
    out["stall_echo_delay_shift_over_5ms"] = int((shifts > 5).sum())
    out["stall_echo_delay_shifts_measured"] = len(shifts)
    return out


def bench_push_to_talk(tmp: Path, turns: int = 8) -> dict[str, Any]:
    """Push to talk against server VAD, on the same devices and server: the user's question is
    played into the mic (PulseAudio's micsink), then
    - push to talk (``turn_detection: null``): the bench publishes ``cmd.input.commit`` once the
      question has played; ``ptt_commit_to_speaker_ms`` runs from that publish to the reply's first
      sample at the speaker (playout.started's ``first_sample_mono_ns`` + ``output_latency_ms``);
    - server VAD: ``vad_speech_end_to_speaker_ms`` is latency.turn's ``to_speaker_ms``, from the
      server's ``audio_end_ms`` mapped to capture time to the same instant; ``audio_end_ms``
      already includes the VAD's ``silence_duration_ms`` (500), so the user waits that much more
      after they stop talking; push to talk has no such wait."""
    from engine.server.voice import synthesize
    scen = tmp / "ptt.yaml"
    scen.write_text('default_reply: "Here is your answer."\n')
    wav = tmp / "question.wav"
    write_wav(wav, synthesize("What is the time in Paris?", "alloy", 1.0))
    vaudio("echo-off")
    out: dict[str, Any] = {"ptt_turns": turns}
    ptt: list[float] = []
    run_dir = tmp / "ptt"
    run_dir.mkdir()
    eng = Engine(run_dir, scen, session="turn_detection: null, transcription: null")
    try:
        for n in range(turns):
            subprocess.run(["paplay", "--device=micsink", str(wav)], timeout=30, check=True)
            sent_ns = time.monotonic_ns()
            eng.pub.publish("cmd.input.commit", {"id": f"ptt-{n}-{sent_ns}", "respond": True})
            started = eng.wait("playout.started", timeout=20)
            ptt.append((started["first_sample_mono_ns"] - sent_ns) / 1e6 + float(started.get("output_latency_ms") or 0))
            eng.wait("playout.stopped", timeout=30)
    finally:
        eng.stop()
    vad: list[float] = []
    run_dir = tmp / "vad"
    run_dir.mkdir()
    eng = Engine(run_dir, scen, session="transcription: null")
    try:
        for _ in range(turns):
            subprocess.run(["paplay", "--device=micsink", str(wav)], timeout=30, check=True)
            turn = eng.wait("latency.turn", timeout=20, where=lambda b: b.get("trigger") == "speech")
            if turn.get("to_speaker_ms") is not None:
                vad.append(float(turn["to_speaker_ms"]))
            eng.wait("playout.stopped", timeout=30)
    finally:
        eng.stop()
    out.update({"ptt_commit_to_speaker_ms_p50": pct(ptt, 50), "ptt_commit_to_speaker_ms_p99": pct(ptt, 99),
                "vad_speech_end_to_speaker_ms_p50": pct(vad, 50), "vad_speech_end_to_speaker_ms_p99": pct(vad, 99),
                "vad_turns_measured": len(vad)})
    return out


def run(interruptions: int = 200, double_talk_trials: int = 5,
        backends: tuple[str, ...] = ("native", "pyaudio"), stall_replies: int = 10,
        first_delta_turns: int = FIRST_DELTA_TURNS) -> dict[str, Any]:
    """Every engine figure once per audio backend (``audio.backend``), in the same run: the first
    backend's under the plain names, the others' with ``_<backend>`` after each name; the SDK
    baseline once. ``first_delta_turns``: replies per link of :func:`bench_first_delta` (0: skip)."""
    global BACKEND
    vaudio_env()
    tmp = Path(tempfile.mkdtemp(prefix="rtconv"))
    scen = scenario(tmp)
    result: dict[str, Any] = {"jitter_ms": JITTER_MS, "prebuffer_ms": PREBUFFER_MS, "period_ms": PERIOD_MS,
                              "playback_period_ms": PLAYBACK_PERIOD_MS, "backends": list(backends),
                              "first_delta_turns": first_delta_turns}
    for backend in backends:
        BACKEND = backend
        btmp = tmp / backend   # each backend's engines, recordings and logs apart
        btmp.mkdir()
        figures: dict[str, Any] = {}
        figures.update(bench_engine(btmp, scen, interruptions))
        figures.update(bench_push_to_talk(btmp))
        if double_talk_trials > 0:
            figures.update(bench_double_talk(btmp, double_talk_trials))
        if stall_replies > 0:   # the echo guard runs in C on the native backend, in Python on PyAudio's
            figures.update(bench_playback_stalls(btmp, stall_replies))
        if first_delta_turns > 0:   # the adaptive buffer, clean and at 30 ms jitter: the jitter suite's function
            figures.update(bench_first_delta(btmp, first_delta_turns))
        suffix = "" if backend == backends[0] else f"_{backend}"
        result.update({k + suffix: v for k, v in figures.items()})
    BACKEND = backends[0]
    result.update(bench_baseline(scen, load=False))
    result.update(bench_baseline(scen, load=True))
    return result
