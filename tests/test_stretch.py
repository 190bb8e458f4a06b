"""Time-stretching: pitch-period insertion and removal splice seamlessly."""
from __future__ import annotations

import numpy as np

from engine.audio.stretch import MAX_PERIOD_FRAMES, MIN_PERIOD_FRAMES, TimeStretcher
from tests.helpers import steepest, voiced as tone


def test_expand_repeats_whole_pitch_periods_and_splices_smoothly() -> None:
    x = tone(4800, 137)
    st = TimeStretcher()
    st.remember(x[:480])
    out = np.zeros(480, dtype=np.int16)
    n = st.expand(x[480:1200], out, max_frames=240)
    assert n % 137 == 0 and 137 <= n <= 480           # whole periods of the tone (one at least)
    spliced = np.concatenate([x[:480], out[:n], x[480:960]])
    assert steepest(spliced) <= steepest(x) * 1.05      # no click where it joins either side


def test_accelerate_leaves_out_whole_periods_and_splices_smoothly() -> None:
    x = tone(4800, 137)
    out = np.zeros(480, dtype=np.int16)
    n = TimeStretcher().accelerate(x[480:1480], out, max_frames=1000)
    assert n % 137 == 0 and n > 0
    spliced = np.concatenate([x[:480], out[:n], x[480 + 2 * n:1480]])
    assert steepest(spliced) <= steepest(x) * 1.05


def test_nothing_is_stretched_without_enough_audio() -> None:
    x = tone(4800, 137)
    st = TimeStretcher()
    out = np.zeros(480, dtype=np.int16)
    assert st.expand(x[:480], out, 240) == 0             # no past to splice to yet
    st.remember(x[:480])
    assert st.expand(x[480:480 + MIN_PERIOD_FRAMES - 1], out, 240) == 0
    assert st.accelerate(x[:2 * MIN_PERIOD_FRAMES], out, 1000) == 0
    assert st.accelerate(x, out, MIN_PERIOD_FRAMES - 1) == 0


def test_quiet_audio_stretches_by_the_longest_period() -> None:
    st = TimeStretcher()
    quiet = np.zeros(2000, dtype=np.int16)
    st.remember(quiet[:480])
    out = np.ones(480, dtype=np.int16)
    assert st.expand(quiet[:480], out, 0) == MAX_PERIOD_FRAMES and not out[:MAX_PERIOD_FRAMES].any()
