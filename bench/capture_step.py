"""The capture chunk on the native backend, without a device: where a 20 ms chunk's CPU goes, and
what moving the echo canceller's call out of Python could save (issue 25: "echo cancellation and
resampling run natively too, or in one batched Python call per 20 ms at most: measure both, and
keep what is cheaper").

The native backend makes ONE Python call per chunk (``NativeCapture.step``, from the capture
worker thread): C resamples (libsoxr, four streams), calls the AEC3 binding (pywebrtc-audio's
``process``: C++ behind a Python method), keeps the statistics and the guard, and writes the mic
ring. It reads the far end from FarEnd's twin in C (NativeFarEnd, as the
capture process hands it over), with no Python call. A fully native path would make the same AEC3
computation from a C thread (the same cache misses, the same wake-up per chunk), with no Python
around it: what only the batched call pays is the worker's Python loop and its wake-up and the
AEC3 binding's fixed cost per call. That is what this measures, all in the worker thread's CPU time;
every figure is defined in bench/README.md."""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, TypedDict

import numpy as np

DEVICE_RATE_HZ = 48000
CHUNK_FRAMES = DEVICE_RATE_HZ // 50          #: 20 ms, the capture period
CHUNKS = 1000                                #: 20 s of audio
WARMUP_CHUNKS = 100
AEC_RATES_HZ = (32000, 48000, 16000)         #: AEC3's rates, the engine's (echo.AEC_RATE_HZ) first
FIT_BLOCKS = (1, 2, 4, 8, 16)
FIT_REPS = 300


def _signals() -> tuple[np.ndarray, np.ndarray]:
    """(far end at 24 kHz, the device's mic at 48 kHz: the far end's echo 60 ms later, −10 dB, and
    a little noise): speech, as the bench's engine runs speak."""
    from engine.codec import resample
    from engine.server.voice import synthesize
    speech = synthesize("The sea is wide and the ships are many. " * 8, "alloy", 1.0).astype(np.float64)
    need = (CHUNKS + 10) * CHUNK_FRAMES // 2
    far = np.resize(speech, need)
    echo = np.concatenate([np.zeros(24000 * 60 // 1000), far])[:need] * 10 ** (-10 / 20)
    rng = np.random.default_rng(5)
    mic24 = (echo + rng.normal(0, 30, need)).clip(-32768, 32767).astype(np.int16)
    return far.astype(np.int16), resample(mic24, 24000, DEVICE_RATE_HZ)


def _worker_chunks() -> dict[str, list[float]]:
    """The capture worker as the process runs it (wait, then one step per chunk, in its own
    thread) while this thread plays the device callback: a chunk every 20 ms, the reference ring
    written as playback writes it. Per chunk: the worker's thread CPU, and the step's parts."""
    from engine.audio import native
    from engine.audio.ring import Ring
    far24, mic48 = _signals()
    tag = f"rtbench-step-{os.getpid()}"
    mic = Ring.create(f"{tag}-mic", 1 << 17, with_eventfd=True)
    ref = Ring.create(f"{tag}-ref", 1 << 17)
    try:
        from engine.capture.echo import far_constants, native_constants
        cap = native.NativeCapture(mic, DEVICE_RATE_HZ, CHUNK_FRAMES, aec=True, guard_db=-6.0, far_adc=True,
                                   echo=native_constants())
        far = native.NativeFarEnd(ref, far_constants())   # as the capture process hands it over
        per: dict[str, list[float]] = {"worker": [], "step": [], "aec_call": [], "far_take": []}
        done = threading.Event()

        def worker() -> None:
            while not done.is_set():
                t0 = time.thread_time_ns()
                if not cap.wait(0.2):
                    continue
                s0, a0, f0 = cap.cpu_split_ns()
                cap.step(far)
                per["worker"].append((time.thread_time_ns() - t0) / 1e3)
                s1, a1, f1 = cap.cpu_split_ns()
                per["step"].append((s1 - s0) / 1e3)
                per["aec_call"].append((a1 - a0) / 1e3)
                per["far_take"].append((f1 - f0) / 1e3)

        th = threading.Thread(target=worker, name="bench-capture-worker")
        th.start()
        t = time.monotonic()
        for i in range(CHUNKS):
            # as playback writes the reference: each block stamped with when it reaches the DAC (one run)
            ref.stamp_due(ref.write_index, time.monotonic_ns() + 20_000_000, 0)
            ref.write(far24[i * CHUNK_FRAMES // 2:(i + 1) * CHUNK_FRAMES // 2])
            cap.push(mic48[i * CHUNK_FRAMES:(i + 1) * CHUNK_FRAMES])
            mic.skip(mic.read_available)
            t += CHUNK_FRAMES / DEVICE_RATE_HZ
            time.sleep(max(0.0, t - time.monotonic()))
        time.sleep(0.1)
        done.set()
        th.join(2.0)
        return {k: v[WARMUP_CHUNKS:] for k, v in per.items()}
    finally:
        for r in (mic, ref):
            r.close()
            r.unlink()


class HeldBack(TypedDict):
    """:func:`mic_held_back_ms`'s figures, ms."""
    mean: float
    max: float
    min: float
    reported_mean: float | None
    reported_max: float | None


def mic_held_back_ms(device_rate_hz: int = DEVICE_RATE_HZ, aec: bool = True, chunks: int = 300) -> HeldBack:
    """What the capture step holds back of the mic: after each 20 ms device chunk it has been handed,
    the chunk's frames (as 24 kHz frames) less what it has written to the mic ring, in ms, over
    ``chunks`` chunks after 50 of warm-up (mean, max, min; and what the step itself reports of the
    same chunks on ``capture.echo``, ``reported_mean``, ``reported_max``). It is the resamplers' blocks and filters
    (device -> 24 kHz; with ``aec``, 24 kHz -> AEC3's rate and back) and AEC3's whole 10 ms blocks:
    time the mic's audio waits in the capture process before the realtime process can send it."""
    from engine.audio import native
    from engine.audio.ring import Ring
    from engine.capture.echo import native_constants
    mic = Ring.create(f"realtalk-bench-held-{os.getpid()}", 1 << 16, with_eventfd=True)
    try:
        cap = native.NativeCapture(mic, device_rate_hz, device_rate_hz // 50, aec=aec, guard_db=-6.0,
                                   echo=native_constants())
        period = device_rate_hz // 50
        pcm = np.random.default_rng(0).normal(0, 2000, period * (chunks + 50)).astype(np.int16)
        held: list[float] = []
        for k in range(chunks + 50):
            cap.push(pcm[k * period:(k + 1) * period])
            cap.step(lambda n: np.zeros(n, dtype=np.int16))
            mic.skip(mic.read_available)
            if k == 49:
                cap.take_held_back()   # what the step reports (capture.echo) starts afresh with the measured chunks
            if k >= 50:
                held.append(((k + 1) * period * 24000 / device_rate_hz - mic.write_index) / 24)
        reported = cap.take_held_back()
        return {"mean": round(float(np.mean(held)), 1), "max": round(max(held), 1), "min": round(min(held), 1),
                "reported_mean": reported["mic_held_back_ms"], "reported_max": reported["mic_held_back_ms_max"]}
    finally:
        mic.close()
        mic.unlink()


def _aec3_fit(rates_hz: tuple[int, ...] = AEC_RATES_HZ) -> dict[int, tuple[dict[int, float], float, float]]:
    """pywebrtc-audio's AEC3 ``process`` called from Python on 1..16 blocks at each of ``rates_hz``,
    interleaved (rates and sizes alike, so each rate sees the same machine): per rate, the median
    µs per call by blocks, and a least-squares line through them (µs per call, µs per block)."""
    from engine.audio.devices import resample_stream
    from pywebrtc_audio import EchoCanceller as WebRtcAec
    far24, mic48 = _signals()
    mic24 = resample_stream(DEVICE_RATE_HZ, 24000).resample_chunk(mic48)
    ends: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for rate in rates_hz:   # both ends at the rate, as the capture step hands them over
        ends[rate] = (resample_stream(24000, rate).resample_chunk(mic24).astype(np.int16),
                      resample_stream(24000, rate).resample_chunk(far24).astype(np.int16))
    aecs: dict[int, Any] = {rate: WebRtcAec(sample_rate=rate, num_channels=1, stream_delay_ms=0) for rate in rates_hz}
    times: dict[int, dict[int, list[float]]] = {rate: {k: [] for k in FIT_BLOCKS} for rate in rates_hz}
    pos = dict.fromkeys(rates_hz, 0)
    for _ in range(FIT_REPS):
        for rate in rates_hz:
            block = rate // 100
            mic, far = ends[rate]
            span = min(len(mic), len(far)) - max(FIT_BLOCKS) * block
            for k in FIT_BLOCKS:
                n = k * block
                near_k, far_k = mic[pos[rate]:pos[rate] + n], far[pos[rate]:pos[rate] + n]
                pos[rate] = (pos[rate] + n) % span
                t0 = time.thread_time_ns()
                aecs[rate].process(near_k, far_k)
                times[rate][k].append((time.thread_time_ns() - t0) / 1e3)
    fits: dict[int, tuple[dict[int, float], float, float]] = {}
    for rate in rates_hz:
        med = {k: statistics.median(v[FIT_REPS // 10:]) for k, v in times[rate].items()}
        per_block, per_call = np.polyfit(np.array(FIT_BLOCKS, dtype=np.float64), np.array(list(med.values())), 1)
        fits[rate] = (med, float(per_call), float(per_block))
    return fits


def run() -> dict[str, Any]:
    per = _worker_chunks()
    med = {k: statistics.median(v) for k, v in per.items()}
    from engine.capture.echo import AEC_RATE_HZ
    fits = _aec3_fit((AEC_RATE_HZ, *[r for r in AEC_RATES_HZ if r != AEC_RATE_HZ]))
    by_blocks, per_call, per_block = fits[AEC_RATE_HZ]
    c_work = med["step"] - med["aec_call"] - med["far_take"]
    # what only the batched call pays: the worker's Python loop and wake-up (its CPU outside the
    # step), the far end's take (C: a microsecond or two), and the binding's fixed cost per call
    # (the line's intercept); a C thread would still wake per chunk, so this is the most a fully
    # native path could save
    python = (med["worker"] - med["step"]) + med["far_take"] + max(per_call, 0.0)
    held_aec, held_plain = mic_held_back_ms(aec=True), mic_held_back_ms(aec=False)
    return {
        "capture_mic_held_back_ms_mean_aec": held_aec["mean"],
        "capture_mic_held_back_ms_max_aec": held_aec["max"],
        "capture_mic_held_back_ms_mean_no_aec": held_plain["mean"],
        "capture_mic_held_back_ms_max_no_aec": held_plain["max"],
        "capture_chunk_worker_cpu_us_p50": round(med["worker"], 1),
        "capture_chunk_step_us_p50": round(med["step"], 1),
        "capture_chunk_aec3_call_us_p50": round(med["aec_call"], 1),
        "capture_chunk_far_take_us_p50": round(med["far_take"], 1),
        "capture_chunk_c_us_p50": round(c_work, 1),
        "capture_chunks_measured": len(per["worker"]),
        "aec3_process_us_by_blocks": {str(k): round(v, 1) for k, v in by_blocks.items()},
        "aec3_per_block_us": round(per_block, 1),
        "aec3_per_call_us": round(per_call, 1),
        "aec3_rate_hz": AEC_RATE_HZ,
        "aec3_per_block_us_by_rate_hz": {str(rate): round(fit[2], 1) for rate, fit in sorted(fits.items())},
        "capture_chunk_batched_call_percent_of_one_core": round(100 * med["worker"] / 20000, 2),
        "capture_chunk_all_native_estimate_percent_of_one_core": round(100 * (med["worker"] - python) / 20000, 2),
        "capture_chunk_python_us": round(python, 1),
        "capture_chunk_python_percent_of_one_core": round(100 * python / 20000, 2),
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run(), indent=1))
