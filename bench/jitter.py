"""The adaptive jitter buffer against the fixed prebuffer (issue 25, part 1): the engine on the
virtual devices (the conversation suite's engine: vmic, vspk, AEC, 10 ms playback periods, 80 ms
configured prebuffer) against the local server at real time, clean and at 30 ms of delta jitter,
``audio.jitter_buffer: adaptive`` and ``fixed`` in the same run, each measured by the same
functions. Also the adaptive target over one jittery session: a CSV, and a PNG drawn here with
numpy and zlib (matplotlib is not installed on this machine, and the plot needs no more).

    python bench/run.py jitter [--json] [--turns N] [--out DIR]
"""
from __future__ import annotations

import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import vaudio_env
from bench.conversation import JITTER_MS, PREBUFFER_MS, REPLY, Engine, pct, response_spans, span_underruns

SAMPLE_EVERY_S = 0.02   #: the target is read from the speaker ring this often


def _scenario(tmp: Path, jitter_ms: float) -> Path:
    path = tmp / f"jitter{jitter_ms:g}.yaml"
    path.write_text(f'default_reply: "{REPLY}"\nfaults: {{delta_jitter_ms: {jitter_ms}, seed: 7}}\n')
    return path


class TargetSampler:
    """Reads the speaker ring's ``target_frames`` (and the time) every SAMPLE_EVERY_S, from a thread."""

    def __init__(self, conn: dict[str, Any]) -> None:
        from engine.audio.ring import Ring
        self.ring = Ring.attach(conn["ring_names"]["speaker"])
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            self.samples.append((time.monotonic(), self.ring.control.target_frames / 24))

    def close(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.thread.join(1)
        self.ring.close()
        return self.samples


def session(tmp: Path, mode: str, jitter_ms: float, turns: int, sample: bool = False) -> dict[str, Any]:
    """One engine session: a warm-up reply, then ``turns`` replies one after another. Per reply:
    first delta -> first sample handed to the device (latency.turn), the start delay playback used,
    short gaps in what playback handed the device (``count_gaps``, the conversation suite's one
    function), and the delta arrival figures the realtime core measured."""
    run = tmp / f"{mode}-{jitter_ms:g}"
    run.mkdir()
    eng = Engine(run, _scenario(run, jitter_ms), audio=f"jitter_buffer: {mode}")
    sampler = TargetSampler(eng.conn) if sample else None
    t0 = time.monotonic()
    try:
        eng.turn(0)
        warm_start = [b["first_sample_mono_ns"] for t, b in eng.log if t == "playout.started"][:1]
        first = [b for t, b in eng.log if t == "latency.turn"][:1]
        eng.log.clear()
        for n in range(1, turns + 1):
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
    out: dict[str, Any] = {
        "replies": len(waits),
        "first_reply_first_delta_to_device_ms": first[0]["first_delta_to_device_ms"] if first else None,
        "first_delta_to_device_ms_p50": pct(waits, 50), "first_delta_to_device_ms_p99": pct(waits, 99),
        "first_delta_to_device_ms_max": max(waits, default=None),
        "start_delay_ms_p50": pct([b["prebuffer_ms"] for b in started if "prebuffer_ms" in b], 50),
        "start_delay_ms_max": max([b["prebuffer_ms"] for b in started if "prebuffer_ms" in b], default=None),
        "device_lead_ms_p50": pct([b["device_lead_ms"] for b in started if "device_lead_ms" in b], 50),
        "short_gaps": sum(g for g in gaps if g > 0),
        "short_gaps_per_reply": round(sum(g for g in gaps if g > 0) / max(1, sum(1 for g in gaps if g >= 0)), 3),
        "replies_checked_for_gaps": sum(1 for g in gaps if g >= 0),
        "underruns_reported": sum(1 for t, _ in log if t == "playout.underrun"),
        # the recording's reference is zero-padded where playback was behind the mic (a loaded machine):
        # such padding reads as a short gap; not 0 here means short_gaps counts some that were not played
        "recording_padded_frames": (echoes[-1].get("far_missing_frames", 0) - echoes[0].get("far_missing_frames", 0))
        if len(echoes) > 1 else None,
        "device_underflows": sum(int(b.get("device_underflows") or 0) for t, b in log if t == "playback.stopped"),
        "expanded_ms": round(sum(float(b.get("expanded_ms") or 0) for t, b in log if t == "playback.stopped"), 1),
        "expanded_percent_of_played": round(100 * sum(float(b.get("expanded_ms") or 0) for t, b in log
                                                      if t == "playback.stopped")
                                            / max(1, sum(int(b.get("played_ms") or 0) for t, b in log
                                                         if t == "playback.stopped")), 2),
        "delta_interval_ms_std_p50": pct([t["delta_interval_ms_std"] for t in lat], 50),
        "delta_interval_ms_max": max([t["delta_interval_ms_max"] for t in lat], default=None),
    }
    if sample:
        out["_samples"] = [(round(t - t0, 3), ms) for t, ms in samples]
        out["_replies"] = [(round(b["first_sample_mono_ns"] / 1e9 - t0, 3), b.get("prebuffer_ms")) for b in started]
        out["_jitter"] = [(round(t0_reply, 3), t["delta_interval_ms_std"], t["delta_interval_ms_max"])
                          for t0_reply, t in zip([r[0] for r in out["_replies"]], lat)]
    return out


# ------------------------------------------------------------------ the plot, without matplotlib
def _png(path: Path, rgb: np.ndarray) -> None:
    """Write an H x W x 3 uint8 image as a PNG (zlib, one filter byte per row)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot(path: Path, samples: list[tuple[float, float]], jitter: list[tuple[float, float, float]],
         fixed_ms: float, w: int = 900, h: int = 360) -> None:
    """Target (blue steps) and each reply's measured delta-interval std (orange dots) and max late
    (interval max - 100 ms, red dots) over time; the fixed prebuffer as a grey line; a light grid
    every 10 s and 20 ms. y from 0 to 200 ms."""
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    t_end = max([s[0] for s in samples] + [1.0])
    pad = 10

    def xy(t: float, ms: float) -> tuple[int, int]:
        x = pad + int((w - 2 * pad - 1) * t / t_end)
        y = h - pad - 1 - int((h - 2 * pad - 1) * min(max(ms, 0.0), 200.0) / 200.0)
        return x, y
    for grid_ms in range(0, 201, 20):
        img[xy(0, grid_ms)[1], pad:w - pad] = (225, 225, 225)
    for t in np.arange(0, t_end, 10.0):
        img[pad:h - pad, xy(float(t), 0)[0]] = (225, 225, 225)
    img[xy(0, fixed_ms)[1], pad:w - pad] = (150, 150, 150)
    prev: tuple[int, int] | None = None
    for t, target_ms in samples:
        x, y = xy(t, target_ms)
        if prev is not None:
            px, py = prev
            img[min(py, y):max(py, y) + 1, px] = (30, 90, 200)
            img[y, px:x + 1] = (30, 90, 200)
        img[max(0, y - 1):y + 2, x] = (30, 90, 200)
        prev = (x, y)

    def dot(t: float, ms: float, color: tuple[int, int, int]) -> None:
        x, y = xy(t, ms)
        img[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = color
    for t, std, mx in jitter:
        dot(t, std, (240, 140, 20))
        dot(t, mx - 100.0, (200, 30, 30))
    _png(path, img)


def run(turns: int = 12, out_dir: Path | None = None) -> dict[str, Any]:
    vaudio_env()
    result: dict[str, Any] = {"jitter_ms": JITTER_MS, "prebuffer_ms": PREBUFFER_MS, "turns": turns}
    out_dir = out_dir or Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory() as tmp:
        for link, jitter in (("clean", 0.0), ("jitter30", float(JITTER_MS))):
            for mode in ("adaptive", "fixed"):   # the same function, the same run, one after the other
                got = session(Path(tmp), mode, jitter, turns, sample=(mode == "adaptive" and jitter > 0))
                if "_samples" in got:
                    csv = out_dir / "jitter_target.csv"
                    csv.write_text("t_s,target_ms\n" + "".join(f"{t},{ms}\n" for t, ms in got["_samples"]))
                    rcsv = out_dir / "jitter_replies.csv"
                    rcsv.write_text("t_s,delta_interval_ms_std,delta_interval_ms_max\n"
                                    + "".join(f"{t},{s},{m}\n" for t, s, m in got["_jitter"]))
                    png = out_dir / "jitter_target.png"
                    plot(png, got.pop("_samples"), got.pop("_jitter"), PREBUFFER_MS)
                    got.pop("_replies")
                    result["plot_png"], result["plot_csv"], result["plot_replies_csv"] = str(png), str(csv), str(rcsv)
                for k, v in got.items():
                    result[f"{mode}_{k}_{link}"] = v
    # the names: the engine's share of voice-to-voice latency, the adaptive buffer's
    for link in ("clean", "jitter30"):
        result[f"engine_first_delta_to_device_ms_p99_{link}"] = result[f"adaptive_first_delta_to_device_ms_p99_{link}"]
        result[f"engine_first_delta_to_device_ms_p99_{link}_fixed"] = result[f"fixed_first_delta_to_device_ms_p99_{link}"]
    return result
