"""Percentiles for the engine's periodic reports, without ``np.percentile``.

``np.percentile`` imports ``numpy.ma`` on its first call (through ``np.unique``'s
``np.ma.is_masked``): about 14 ms of CPU here, on whichever thread asks first. In
the engine that was the realtime link thread (the mic path's) at its first ``latency.mic``
report, and the capture and playback chores at their first echo and cadence reports, each in
the middle of a conversation. :func:`percentiles` is numpy's default (``linear``) method on a
sorted copy: the same figures, nothing imported.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def percentiles(values: Iterable[float] | np.ndarray, qs: Sequence[float]) -> list[float]:
    """``np.percentile(values, qs)`` (``method="linear"``) as floats; ``values`` must not be empty."""
    v = np.sort(np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64))
    if v.size == 0:
        raise ValueError("percentiles of no values")
    last = v.size - 1
    out = []
    for q in qs:
        pos = last * float(q) / 100.0
        lo = int(pos)
        hi = min(lo + 1, last)
        frac = pos - lo
        out.append(float(v[lo] + (v[hi] - v[lo]) * frac))
    return out
