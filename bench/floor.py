"""The floor under the engine's CPU figure: what the parts the engine must use cost with none
of the engine's own code. Two processes, as capture and playback are two: a PyAudio input
stream on the mic and a PyAudio output stream on the speaker, at the engine's device rate and
periods, whose callbacks do only what no engine can leave out (the mic's: soxr to AEC3's rate
and one AEC3 call per block, with a speech-like far end; the speaker's: hand over silence).
Same CPU measure as the engine's figure (``bench.run._cpu_ns``). Definitions: bench/README.md.

    python -m bench.floor input RATE_HZ PERIOD_MS     # one side, until stdin closes
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent


def _side(kind: str, rate_hz: int, period_ms: int) -> None:
    import numpy as np
    import pyaudio
    from engine.audio.devices import find_device, open_pyaudio, resample_stream
    from engine.capture.echo import AEC_RATE_HZ
    pa = open_pyaudio()
    frames = rate_hz * period_ms // 1000
    if kind == "input":
        from pywebrtc_audio import EchoCanceller
        aec = EchoCanceller(sample_rate=AEC_RATE_HZ, num_channels=1, stream_delay_ms=0)
        to_aec = resample_stream(rate_hz, AEC_RATE_HZ)
        aec_frames = AEC_RATE_HZ * period_ms // 1000
        t = np.arange(AEC_RATE_HZ * 2) / AEC_RATE_HZ   # a far end that is never silent: 2 s of a swept tone
        far = (6000 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.int16)
        pos = [0]

        def callback(in_data: bytes | None, frame_count: int, time_info: Any, status: int) -> tuple[None, int]:
            near = to_aec.resample_chunk(np.frombuffer(in_data or b"", dtype=np.int16))
            n = len(near) // (AEC_RATE_HZ // 100) * (AEC_RATE_HZ // 100)
            if n:
                p = pos[0] % (len(far) - aec_frames)
                aec.process(near[:n], far[p:p + n])
                pos[0] += n
            return None, pyaudio.paContinue
        dev = find_device(pa, os.environ.get("FLOOR_MIC", "vmic"), "input")
        stream = pa.open(format=pyaudio.paInt16, channels=1, rate=rate_hz, input=True,
                         input_device_index=dev["index"], frames_per_buffer=frames, stream_callback=callback)
    else:
        silence = bytes(2 * frames)

        def play(in_data: Any, frame_count: int, time_info: Any, status: int) -> tuple[bytes, int]:
            return silence if frame_count == frames else bytes(2 * frame_count), pyaudio.paContinue
        dev = find_device(pa, os.environ.get("FLOOR_SPEAKER", "vspk"), "output")
        stream = pa.open(format=pyaudio.paInt16, channels=1, rate=rate_hz, output=True,
                         output_device_index=dev["index"], frames_per_buffer=frames, stream_callback=play)
    print("ready", flush=True)
    sys.stdin.read()   # until the bench closes our stdin
    stream.stop_stream()
    stream.close()
    pa.terminate()


@contextlib.contextmanager
def running(rate_hz: int, mic_period_ms: int, speaker_period_ms: int,
            env: dict[str, str] | None = None) -> Iterator[dict[str, int]]:
    """Both sides running (``{"input": pid, "output": pid}``) for the ``with`` block: started and
    past their streams' start-up on entry, stopped on exit."""
    procs = {kind: subprocess.Popen([sys.executable, "-m", "bench.floor", kind, str(rate_hz), str(period)],
                                    cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
             for kind, period in (("input", mic_period_ms), ("output", speaker_period_ms))}
    try:
        for kind, p in procs.items():
            line = p.stdout.readline() if p.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"bench.floor {kind} did not start (exit {p.poll()})")
        time.sleep(1.0)   # past the streams' start-up
        yield {kind: p.pid for kind, p in procs.items()}
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def figures(by_side: dict[str, float]) -> dict[str, float]:
    """The floor's figures from the % of one core of each side over one window."""
    return {"floor_cpu_percent_of_one_core": round(sum(by_side.values()), 2),
            "floor_cpu_percent_mic_pyaudio_soxr_aec3": round(by_side["input"], 2),
            "floor_cpu_percent_speaker_pyaudio": round(by_side["output"], 2)}


def measure(rate_hz: int, mic_period_ms: int, speaker_period_ms: int, seconds: float,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start both sides, wait until they run, then the CPU window: % of one core per side and in all."""
    from bench.common import cpu_ns
    with running(rate_hz, mic_period_ms, speaker_period_ms, env) as pids:
        before = {k: cpu_ns(pid) for k, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        return figures({k: 100 * (cpu_ns(pid) - before[k]) / 1e9 / wall for k, pid in pids.items()})


if __name__ == "__main__":
    _side(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
