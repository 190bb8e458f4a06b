"""A stalled playback must not make the model interrupt itself (issue 23): a replay, in simulated
time, of a speaker with a device buffer, an echo path and a mic, through the capture process's
own far end (FarEnd), canceller (AEC3) and guard, with the playback callbacks stopped for 60 to
500 ms mid-reply as a loaded machine stops them.

Counting frames (the old far end) zero-padded the reference for the stall and then took the late
frames as they came: with a 50 ms device buffer the reference then led its echo by 20 ms less for
good, AEC3 leaked while it looked for the new delay, and the guard took the leak for a talker
(the server's VAD heard speech in it). Lined up by the DAC times playback stamps, the echo's delay
is the same after the stall as before it, and nothing passes for speech. The replay runs through
the Python canceller (the PyAudio backend's) and through the native backend's C capture step (its
guard in C, the same FarEnd), which must hold alike."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from engine.audio import native
from engine.audio.ring import Ring
from engine.capture.echo import EchoCanceller, FarEnd, native_constants
from engine.server.vad import ServerVad

pytestmark = pytest.mark.timeout(60)

RATE = 24000
MS = 24                        # frames per ms
BASE_NS = 10**12               # CLOCK_MONOTONIC of simulated time 0


@dataclass
class Room:
    """Playback keeps a device buffer of ``out_latency_ms`` full with 10 ms blocks (PortAudio calls
    its callback whenever a block fits); the device plays it at real pace, and nothing while it is
    empty. The mic hears the speaker ``echo_delay_ms`` later through a short echo path, and its
    20 ms blocks reach the capture callback ``in_latency_ms`` after their last frame, with ADC
    times that jitter by ``adc_jitter_ms``."""
    out_latency_ms: int = 50
    in_latency_ms: int = 10
    echo_delay_ms: int = 40
    echo_gain: float = 0.2     # -14 dB
    adc_jitter_ms: float = 1.0
    stalls: list[tuple[float, int]] = field(default_factory=list)   # (at s, ms): no playback callbacks


@dataclass
class Replay:
    far_handed: np.ndarray     # the reference the canceller got, mic frame by mic frame
    mic: np.ndarray
    out: np.ndarray            # what the capture process sends to the API
    canceller: Any             # EchoCanceller, or the native backend's NativeCapture (its statistics' face)
    far_end: FarEnd
    energies: np.ndarray       # per mic block: the canceller's near and out energy so far (far end active)

    def erle_db(self, from_s: float, to_s: float) -> float:
        """AEC3's echo return loss enhancement over a stretch (before the guard)."""
        a, b = int(from_s * RATE) // 480, int(to_s * RATE) // 480
        near, out = self.energies[b] - self.energies[a]
        return float(10 * np.log10(near / max(out, 1.0)))


def replay(room: Room, speech: np.ndarray, ring: Ring, mic_ring: Ring | None = None) -> Replay:
    """The room in simulated time; with ``mic_ring``, the capture is the native backend's C step (the
    mic's blocks pushed with their ADC times, one step each) instead of EchoCanceller.process."""
    rng = np.random.default_rng(7)
    total_ms = len(speech) // MS + 500
    played = np.zeros(total_ms * MS + RATE)          # what the speaker played, by frame of time
    ir = np.zeros(room.echo_delay_ms * MS + 300)
    d = room.echo_delay_ms * MS
    ir[d], ir[d + 72], ir[d + 170], ir[d + 260] = 1.0, 0.45, -0.3, 0.15
    ir *= room.echo_gain
    taps = np.flatnonzero(ir)
    noise = rng.standard_normal(len(played)) * 3.0
    far_end = FarEnd(ring)
    canceller: Any = EchoCanceller() if mic_ring is None else native.NativeCapture(
        mic_ring, RATE, 480, aec=True, guard_db=-6.0, far_adc=True, echo=native_constants())
    rendered = 0                                      # speech frames handed to the device
    queue_end = 0                                     # frame of time when the device's buffer runs out
    next_due_ns: int | None = None
    run_index = 0
    mic_at = 0                                        # first frame of time of the next mic block
    handed, mics, outs, energies = [], [], [], []
    for ms in range(total_ms):
        now = ms * MS
        if not any(at * 1000 <= ms < at * 1000 + length for at, length in room.stalls):
            while queue_end - now <= (room.out_latency_ms - 10) * MS:     # the playback callback
                block = np.zeros(240, dtype=np.int16)
                piece = speech[rendered:rendered + 240]
                block[:len(piece)] = piece
                rendered += 240
                start = max(queue_end, now)
                due_ns = BASE_NS + start * 10**9 // RATE
                if next_due_ns is None or abs(due_ns - next_due_ns) > 2_000_000:
                    run_index = ring.write_index
                next_due_ns = due_ns + 240 * 10**9 // RATE
                ring.stamp_due(ring.write_index, due_ns, run_index)
                ring.write(block)
                played[start:start + 240] = block
                queue_end = start + 240
        while now >= mic_at + 480 + room.in_latency_ms * MS:                # the capture callback
            a, b = mic_at, mic_at + 480
            echo = np.zeros(480)
            for k in taps:
                if b - k > 0:
                    src = played[max(0, a - k):b - k]
                    echo[480 - len(src):] += ir[k] * src
            mic = np.clip(echo + noise[a:b], -32768, 32767).astype(np.int16)
            adc_ns = BASE_NS + a * 10**9 // RATE + int(rng.normal(0, room.adc_jitter_ms) * 1e6)
            if mic_ring is None:
                far = far_end.take(480, adc_ns)
                outs.append(canceller.process(mic, far, far_end.uncertain).copy())
                handed.append(far.copy())
            else:
                def keep(raw: np.ndarray, far: np.ndarray, sent: np.ndarray | None) -> None:
                    handed.append(far.copy())
                    outs.append(sent.copy() if sent is not None else raw.copy())
                canceller.push(mic, adc_ns)
                canceller.step(far_end, keep)
            energies.append((canceller.near_energy, canceller.out_energy))
            mics.append(mic)
            mic_at = b
    return Replay(np.concatenate(handed), np.concatenate(mics), np.concatenate(outs), canceller, far_end,
                  np.array(energies))


def echo_delay_ms(r: Replay, from_s: float, to_s: float) -> float:
    """How far (ms) the reference handed to the canceller leads the echo in the mic over a stretch."""
    a, b = int(from_s * RATE), int(to_s * RATE)
    lags = 300 * MS
    c = np.correlate(r.far_handed[a - lags:b].astype(np.float64), r.mic[a:b].astype(np.float64), mode="valid")
    return (lags - int(np.argmax(np.abs(c)))) / MS


def speech_heard(out: np.ndarray) -> list[int]:
    """Where the server's VAD (the local server's, -40 dBFS) starts speech in what was sent (ms)."""
    return [e.ms for e in ServerVad().feed(out) if e.kind == "started"]


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    from engine.server.voice import synthesize
    reply = synthesize("The sea is wide and the ships are many, and every sailor knows the way home.", "marin", 1.0)
    return np.concatenate([reply, reply])


@pytest.fixture
def ring(request: pytest.FixtureRequest) -> Iterator[Ring]:
    name = f"realtalk-test-{os.getpid()}-{request.node.name[:30]}"
    r = Ring.create(name, 32768, with_eventfd=False)
    yield r
    r.close()
    Path("/dev/shm", name).unlink(missing_ok=True)


@pytest.fixture
def mic_ring(request: pytest.FixtureRequest) -> Iterator[Ring]:
    name = f"realtalk-test-{os.getpid()}-mic-{request.node.name[:26]}"
    r = Ring.create(name, 32768, with_eventfd=True)
    yield r
    r.close()
    Path("/dev/shm", name).unlink(missing_ok=True)


@pytest.mark.parametrize("capture", ["python", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason=f"{native.unavailable_reason()}"))])
@pytest.mark.parametrize("stall_ms", [60, 120, 250, 500])
def test_a_playback_stall_leaves_the_echo_delay_as_it_was_and_nothing_passes_for_speech(
        stall_ms: int, capture: str, speech: np.ndarray, ring: Ring, mic_ring: Ring) -> None:
    r = replay(Room(stalls=[(3.3, stall_ms)]), speech, ring, mic_ring if capture == "native" else None)
    stats = r.canceller.stats()
    before, after = echo_delay_ms(r, 1.5, 3.2), echo_delay_ms(r, 4.5, 7.0)
    assert abs(after - before) <= 1.0, f"the stall moved the echo's delay from {before} to {after} ms"
    assert speech_heard(r.out) == [], "the model's own echo reached the API as speech"
    assert stats["talkers"] == 0
    assert r.far_end.gap_frames > 0                     # the speaker ran dry, and the far end knew
    # a stall the speaker rode out but for a few ms is no guess; a longer one is, and the guard held
    assert stats["guard_holds"] >= (1 if stall_ms >= 120 else 0)
    erle_before, erle_after = r.erle_db(1.5, 3.2), r.erle_db(4.5, 7.0)
    assert erle_after >= erle_before - 3, f"AEC3 cancels less after the stall: {erle_before:.1f} -> {erle_after:.1f} dB"
