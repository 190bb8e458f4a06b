"""Pure helpers of the conversation bench (bench/conversation.py)."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from bench.conversation import echo_delay_shifts_ms

pytestmark = pytest.mark.timeout(60)


def _recording(path: Path, mic: np.ndarray, ref: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(np.stack([mic, ref], axis=1).astype(np.int16).tobytes())
    return path


def test_a_stall_is_measured_and_a_silence_that_ends_the_recording_is_no_stall(tmp_path: Path) -> None:
    """A run of zeros in the reference inside speech is a stall, its echo delay measured on both
    sides; the zeros a session ends with have no speech after them: left out, never an error (a
    run of the bench once ended on them)."""
    rng = np.random.default_rng(3)
    n = 24000 * 8
    ref = (6000 * rng.standard_normal(n)).clip(-30000, 30000)
    ref[24000 * 4:24000 * 4 + 2400] = 0       # a 100 ms stall at 4 s
    ref[n - 24000:] = 0                       # the session's last second: nothing played
    mic = np.roll(ref, 960) * 0.5             # the echo, 40 ms late
    shifts = echo_delay_shifts_ms(_recording(tmp_path / "a.wav", mic, ref))
    assert len(shifts) == 1 and abs(shifts[0]) < 1.0
