"""The adaptive jitter buffer against the fixed prebuffer (issue 25, part 1): the engine on the
virtual devices (the conversation suite's engine: vmic, vspk, AEC, 10 ms playback periods, 80 ms
configured prebuffer) against the local server at real time, clean and at 30 ms of delta jitter,
``audio.jitter_buffer: adaptive`` and ``fixed`` in the same run, each measured by the same
function (``bench.conversation.first_delta_session``, which the conversation suite runs too, for
the adaptive buffer alone). Also the adaptive target over one jittery session: a CSV, and a PNG drawn here with
numpy and zlib (matplotlib is not installed on this machine, and the plot needs no more).

    python bench/run.py jitter [--json] [--turns N] [--out DIR]
"""
from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import vaudio_env
from bench.conversation import JITTER_MS, PREBUFFER_MS, bench_first_delta


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
    """Adaptive and fixed, clean and at 30 ms jitter, by the conversation suite's one function
    (:func:`bench.conversation.first_delta_session`), and the plot of the adaptive jittery session."""
    vaudio_env()
    result: dict[str, Any] = {"jitter_ms": JITTER_MS, "prebuffer_ms": PREBUFFER_MS, "turns": turns}
    out_dir = out_dir or Path(tempfile.gettempdir())
    out_dir.mkdir(parents=True, exist_ok=True)   # --out names a folder that may not exist yet
    with tempfile.TemporaryDirectory() as tmp:
        got = bench_first_delta(Path(tmp), turns, modes=("adaptive", "fixed"), sample=True)
    drawn = got.pop("_plot", None)
    if drawn is not None:
        csv = out_dir / "jitter_target.csv"
        csv.write_text("t_s,target_ms\n" + "".join(f"{t},{ms}\n" for t, ms in drawn["samples"]))
        rcsv = out_dir / "jitter_replies.csv"
        rcsv.write_text("t_s,delta_interval_ms_std,delta_interval_ms_max\n"
                        + "".join(f"{t},{s},{m}\n" for t, s, m in drawn["jitter"]))
        png = out_dir / "jitter_target.png"
        plot(png, drawn["samples"], drawn["jitter"], PREBUFFER_MS)
        result["plot_png"], result["plot_csv"], result["plot_replies_csv"] = str(png), str(csv), str(rcsv)
    result.update(got)
    return result
