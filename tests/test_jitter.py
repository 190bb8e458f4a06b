"""The adaptive jitter buffer's target, fed arrival schedules. Pure."""
from __future__ import annotations

import random

import pytest

from engine.realtime.jitter import BUCKET_MS, JITTER_FLOOR_MS, MARGIN_MS, MIN_DELTAS, JitterEstimator

DELTA_S = 0.1   # 100 ms of audio a delta


def reply(est: JitterEstimator, t0: float, deltas: int, delays_s: list[float], speed: float = 1.0) -> float:
    """One stream: delta i due at t0 + i * DELTA_S / speed, arriving delays_s[i] late; returns its end."""
    est.stream_started()
    for i in range(deltas):
        est.delta(t0 + i * DELTA_S / speed + delays_s[i], DELTA_S)
    return t0 + deltas * DELTA_S / speed + 1.0


def test_without_history_the_configured_start_is_the_target() -> None:
    """And the estimate says it has measured nothing (the realtime process then leaves the speaker
    ring's target at 0: playback waits its own configured prebuffer)."""
    est = JitterEstimator(60)
    assert est.target_ms() == 60 and not est.measured
    reply(est, 0.0, MIN_DELTAS - 1, [0.0] * 50)
    assert est.target_ms() == 60 and not est.measured
    est.delta(10.0, DELTA_S)
    assert est.measured and est.target_ms() < 60


def test_a_clean_link_brings_the_target_down_to_the_margin() -> None:
    est = JitterEstimator(60)
    t = 0.0
    for _ in range(5):
        t = reply(est, t, 30, [0.0] * 30)
    assert est.target_ms() == pytest.approx(JITTER_FLOOR_MS + MARGIN_MS)   # the floor (above the first bucket) + a period


def test_a_server_sending_ahead_of_real_time_waits_only_the_floor() -> None:
    est = JitterEstimator(60)
    t = 0.0
    for _ in range(5):
        t = reply(est, t, 30, [0.0] * 30, speed=4.0)
    assert est.quantile_ms() <= BUCKET_MS and est.target_ms() == JITTER_FLOOR_MS + MARGIN_MS


def test_jitter_raises_the_target_to_what_covers_nearly_every_delta() -> None:
    rng = random.Random(7)
    est = JitterEstimator(60)
    t = 0.0
    delays: list[float] = []
    for _ in range(30):
        d = [max(0.0, rng.gauss(0, 0.030)) for _ in range(30)]
        delays.append(max(x - d[0] for x in d))
        t = reply(est, t, 30, d)
    target = est.target_ms()
    assert 60 <= target <= 90, target          # sigma 30 ms: the goal is a start delay of at most 90 ms
    late = sum(1 for worst in delays if worst * 1000 > target)
    assert late <= 3, (late, target)             # almost every reply's latest delta is covered


def test_a_late_first_delta_does_not_make_the_rest_look_late_for_long() -> None:
    """Relative delays are against the window's earliest schedule, not the first delta alone."""
    est = JitterEstimator(60)
    est.stream_started()
    est.delta(0.05, DELTA_S)                     # the first delta 50 ms late
    assert est.delta(0.1, DELTA_S) == 0.0        # the second on time: it is not late
    assert est.delta(0.28, DELTA_S) == pytest.approx(80, abs=0.01)


def test_a_continuous_track_is_immune_to_clock_drift() -> None:
    est = JitterEstimator(60)
    est.stream_started()
    drift = 1.0005     # the server's clock runs 500 ppm fast: its deltas come ever earlier by ours
    for i in range(6000):  # ten minutes of 100 ms deltas
        est.delta(i * DELTA_S / drift, DELTA_S)
    assert est.max_delay_ms < 1


def test_after_jitter_a_clean_link_slowly_brings_the_target_back_down() -> None:
    """Decay: the histogram forgets (a half-life of about 500 deltas), so after the jitter stops the
    target comes back to the margin, over minutes of audio, not at the first clean reply."""
    rng = random.Random(3)
    est = JitterEstimator(60)
    t = 0.0
    for _ in range(30):
        t = reply(est, t, 30, [max(0.0, rng.gauss(0, 0.030)) for _ in range(30)])
    jittery = est.target_ms()
    assert jittery >= 60
    t = reply(est, t, 30, [0.0] * 30)
    assert est.target_ms() >= jittery - 10          # one clean reply: hardly any change
    for _ in range(100):                             # 300 s of clean audio
        t = reply(est, t, 30, [0.0] * 30)
    assert est.target_ms() == pytest.approx(JITTER_FLOOR_MS + MARGIN_MS)


def test_one_late_delta_does_not_move_the_target() -> None:
    """An outlier beyond the quantile is the time-stretcher's, and the players' growth after an
    underrun (tests/test_playback.py), not a latency every later reply pays."""
    est = JitterEstimator(60)
    t = 0.0
    for _ in range(5):
        t = reply(est, t, 30, [0.0] * 30)
    low = est.target_ms()
    t = reply(est, t, 30, [0.0] * 10 + [0.2] + [0.0] * 19)
    assert est.max_delay_ms >= 190 and est.target_ms() == low


def test_the_target_in_frames_is_never_zero() -> None:
    """0 in the ring's target_frames means "no target" (fixed): an estimate is at least a frame."""
    est = JitterEstimator(0)
    assert est.target_ms() == 0 and est.target_frames(24000) == 1
    assert JitterEstimator(80).target_frames(24000) == 1920 and JitterEstimator(80).target_frames(8000) == 640


def test_a_phone_call_covers_more_of_the_tail_and_adds_no_device_period() -> None:
    """The phone's estimator (engine/phone/bridge.py): PHONE_QUANTILE of the delays, no margin."""
    from engine.realtime.jitter import PHONE_QUANTILE, QUANTILE
    rng = random.Random(11)
    speaker, phone = JitterEstimator(60), JitterEstimator(60, margin_ms=0.0, quantile=PHONE_QUANTILE)
    t = 0.0
    for _ in range(30):
        d = [max(0.0, rng.gauss(0, 0.030)) for _ in range(30)]
        reply(speaker, t, 30, d)
        t = reply(phone, t, 30, d)
    assert PHONE_QUANTILE >= QUANTILE
    assert phone.target_ms() == phone.quantile_ms(PHONE_QUANTILE)
    assert speaker.target_ms() == speaker.quantile_ms(QUANTILE) + MARGIN_MS
    clean = JitterEstimator(60, margin_ms=0.0)
    reply(clean, 0.0, 30, [0.0] * 30)
    assert clean.target_ms() == JITTER_FLOOR_MS
