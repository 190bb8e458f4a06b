"""Benchmarks. Each prints one JSON object (``--json``) with a key per figure, measured
side by side with its reference in the same run.

    python bench/run.py core [--json] [--backend native|pyaudio|both]
                                           rings, bus, engine CPU (each audio backend, the floor beside it),
                                           engine start time (issues 3, 25)
    python bench/run.py server [--json]    local server: first delta, 20 concurrent sessions (issue 2)
    python bench/run.py conversation [--json] [--interruptions N] [--double-talk-trials N] [--stall-replies N]
                                     [--first-delta-turns N] [--backend ...]
                                           engine vs an openai-SDK + PyAudio baseline (issue 4), double talk,
                                           a reply's first delta to the device clean and at 30 ms jitter (issue 25)
    python bench/run.py faults [--json] [--soak-minutes N] [--fuzz N]
                                           kills, socket drops, fuzz, slow subscriber, soak (issue 15)
    python bench/run.py phone [--json] [--first-delta-turns N]
                                           phone calls at once (1-40) in three process layouts, truncation vs the SDK
                                           sample (issue 13), a reply's first delta to the phone's playout clean and
                                           at 30 ms jitter (issue 25); bench/phone.py has the options
    python bench/run.py sip [--json]       engine sip: webhook -> accept at 1, 10, 50 calls together, CPU and memory
                                           per talking call (issue 22)
    python bench/run.py console [--json] [--minutes N] [--closed-minutes N]
                                           the console: CPU closed vs open, underruns, bus -> page, page heap (issue 11)
    python bench/run.py asr [--json]       the local server's recogniser on espeak-ng speech: word accuracy, free
                                           decoding vs expected phrases (issue 23); bench/asr.py has the options
    python bench/run.py live [--json] [--yields N] [--utterances N]
                                           the engine on GPT-Live: latency, yield time, underruns vs an SDK
                                           baseline, CPU beside the floor (issue 21)
    python bench/run.py jitter [--json] [--turns N] [--out DIR]
                                           the adaptive jitter buffer against the fixed prebuffer, clean and at
                                           30 ms jitter, and a plot of its target (issue 25)

Every figure's definition: bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # `python bench/run.py` from anywhere

from bench.common import cpu_window, paced, pct, start_engine, stop_engine, vaudio, vaudio_env  # noqa: E402

FRAME = 480  # 20 ms at 24 kHz
FLOOD_RUNS = 5  # bus throughput: the median of this many floods
FLOOD_WAIT_S = 5.0  # a flood ends at its end marker, or this long after its last message
CPU_WINDOWS = 3     # the real path's CPU: the median of this many windows, engine and floor measured together
CPU_WINDOW_S = 6.0


# ------------------------------------------------------------------ rings
FLOOD_BLOCKS = 400_000
WAKE_BLOCKS = 2500
WAKE_HZ = 500.0


def _ring_flood(name: str, fd: int, frames: int) -> None:
    from engine.audio.ring import Ring
    ring = Ring.attach(name, fd)
    data = np.ones(FRAME, dtype=np.int16)
    sent = 0
    while sent < frames:
        if ring.write_available >= FRAME:
            ring.write(data)
            sent += 1
        else:
            os.sched_yield()  # full: let the reader run if it shares this core


def _ring_paced(name: str, fd: int, count: int, hz: float) -> None:
    from engine.audio.ring import Ring
    ring = Ring.attach(name, fd)
    data = np.zeros(FRAME, dtype=np.int16)
    for _ in paced(count, hz):
        stamp = time.monotonic_ns()
        data[:4] = np.frombuffer(np.int64(stamp).tobytes(), dtype=np.int16)
        ring.write(data)


def _stamp_of(block: np.ndarray) -> int:
    return int(np.frombuffer(block[:4].tobytes(), dtype=np.int64)[0])


def bench_engine_ring() -> dict[str, Any]:
    from engine.audio.ring import Ring
    ctx = mp.get_context("fork")
    name = f"realtalk-bench-{os.getpid()}"
    ring = Ring.create(name, 1 << 14)
    p = ctx.Process(target=_ring_flood, args=(name, ring.data_fd, FLOOD_BLOCKS))
    out = np.zeros(1 << 14, dtype=np.int16)
    t0 = time.perf_counter()
    p.start()
    got = 0
    while got < FLOOD_BLOCKS * FRAME:
        ring.wait_readable(1.0)
        got += ring.read_into(out)
    elapsed = time.perf_counter() - t0
    p.join()
    p = ctx.Process(target=_ring_paced, args=(name, ring.data_fd, WAKE_BLOCKS, WAKE_HZ))
    p.start()
    lat_us: list[float] = []
    buf = np.zeros(FRAME, dtype=np.int16)
    while len(lat_us) < WAKE_BLOCKS:
        if not ring.wait_readable(2.0) or ring.overrun_frames:
            break  # an overrun (the reader stalled a whole ring's worth) leaves part frames: stop there
        while ring.read_available >= FRAME:
            ring.read_into(buf)
            lat_us.append((time.monotonic_ns() - _stamp_of(buf)) / 1000)
    p.join()
    overruns = ring.overrun_frames
    ring.unlink()
    return {"blocks_per_s": FLOOD_BLOCKS / elapsed, "wake_us": lat_us, "overrun_frames": overruns}


# the references: the same two processes, the same 20 ms blocks, the same reader loop shape
def _shm_writer(shm_name: str, efd: int, count: int, hz: float) -> None:
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(shm_name)
    idx = np.ndarray((2,), dtype=np.int64, buffer=shm.buf)           # [write, read] in blocks
    data = np.ndarray((SHM_BLOCKS, FRAME), dtype=np.int16, buffer=shm.buf, offset=16)
    block = np.ones(FRAME, dtype=np.int16)
    ticks = paced(count, hz) if hz else range(count)
    for _ in ticks:
        while idx[0] - idx[1] >= SHM_BLOCKS:
            os.sched_yield()
        if hz:
            block[:4] = np.frombuffer(np.int64(time.monotonic_ns()).tobytes(), dtype=np.int16)
        data[idx[0] % SHM_BLOCKS] = block
        idx[0] += 1
        os.eventfd_write(efd, 1)   # a system call per block: the plain way
    del idx, data
    shm.close()


SHM_BLOCKS = (1 << 14) // FRAME


def bench_shm_eventfd() -> dict[str, Any]:
    """A plain SPSC ring: multiprocessing.shared_memory, two indices, an eventfd write per block."""
    from multiprocessing import shared_memory
    ctx = mp.get_context("fork")
    shm = shared_memory.SharedMemory(create=True, size=16 + SHM_BLOCKS * FRAME * 2)
    idx = np.ndarray((2,), dtype=np.int64, buffer=shm.buf)
    data = np.ndarray((SHM_BLOCKS, FRAME), dtype=np.int16, buffer=shm.buf, offset=16)
    out = np.zeros(FRAME, dtype=np.int16)
    result: dict[str, Any] = {}
    for hz, count in ((0.0, FLOOD_BLOCKS), (WAKE_HZ, WAKE_BLOCKS)):
        idx[:] = 0
        efd = os.eventfd(0)
        p = ctx.Process(target=_shm_writer, args=(shm.name, efd, count, hz))
        t0 = time.perf_counter()
        p.start()
        got, lat = 0, []
        while got < count:
            os.eventfd_read(efd)
            while idx[1] < idx[0]:
                np.copyto(out, data[idx[1] % SHM_BLOCKS])
                idx[1] += 1
                got += 1
                if hz:
                    lat.append((time.monotonic_ns() - _stamp_of(out)) / 1000)
        elapsed = time.perf_counter() - t0
        p.join()
        os.close(efd)
        if hz:
            result["wake_us"] = lat
        else:
            result["blocks_per_s"] = count / elapsed
    del idx, data
    shm.close()
    shm.unlink()
    return result


def _pipe_writer(conn: Any, count: int, hz: float) -> None:
    block = np.ones(FRAME, dtype=np.int16)
    for _ in (paced(count, hz) if hz else range(count)):
        if hz:
            block[:4] = np.frombuffer(np.int64(time.monotonic_ns()).tobytes(), dtype=np.int16)
        conn.send_bytes(block.tobytes())
    conn.close()


def bench_pipe() -> dict[str, Any]:
    """multiprocessing.Pipe: one send_bytes per 20 ms block, the reader blocks in recv_bytes_into."""
    ctx = mp.get_context("fork")
    out = bytearray(FRAME * 2)
    view = np.frombuffer(out, dtype=np.int16)
    result: dict[str, Any] = {}
    for hz, count in ((0.0, FLOOD_BLOCKS), (WAKE_HZ, WAKE_BLOCKS)):
        rx, tx = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_pipe_writer, args=(tx, count, hz))
        t0 = time.perf_counter()
        p.start()
        tx.close()
        lat = []
        for _ in range(count):
            rx.recv_bytes_into(out)
            if hz:
                lat.append((time.monotonic_ns() - _stamp_of(view)) / 1000)
        elapsed = time.perf_counter() - t0
        p.join()
        rx.close()
        if hz:
            result["wake_us"] = lat
        else:
            result["blocks_per_s"] = count / elapsed
    return result


def bench_ring() -> dict[str, Any]:
    """Two processes move 20 ms blocks (480 int16 frames): flat out (blocks per second), and paced
    at 500 Hz (wake-up latency: the writer's stamp to the reader holding the block). The engine's
    ring against a plain shared-memory ring with an eventfd write per block, and a Pipe."""
    out: dict[str, Any] = {}
    for key, fn in (("ring", bench_engine_ring), ("ring_reference_shm_eventfd", bench_shm_eventfd),
                    ("ring_reference_pipe", bench_pipe)):
        r = fn()
        out[f"{key}_blocks_20ms_per_s"] = round(r["blocks_per_s"])
        out[f"{key}_wake_p50_us"] = round(pct(r["wake_us"], 50), 1)
        out[f"{key}_wake_p99_us"] = round(pct(r["wake_us"], 99), 1)
        if "overrun_frames" in r:
            out["ring_wake_overrun_frames"] = r["overrun_frames"]
    return out


# ------------------------------------------------------------------ bus
def _bus_pub(endpoint: str, mode: str, count: int, hz: float, join_endpoint: str) -> None:
    from bus import Publisher
    pub = Publisher(endpoint, "bench", bind=endpoint == join_endpoint)  # same endpoint: a direct pair
    pub.join(join_endpoint)
    payload = {"text": "x" * 950}
    if mode == "flood":
        for _ in range(count):
            pub.publish("bench.flood", payload)
        pub.publish("bench.end", {})
    elif mode == "raw":  # encoded once: what the sockets and the broker carry, without msgpack
        from bus import encode
        frames = encode("bench.flood", payload, "bench", 1)
        for _ in range(count):
            pub.send_raw(frames)
        pub.publish("bench.end", {})
    else:
        for _ in paced(count, hz):
            pub.publish("bench.paced", payload)
        pub.publish("bench.end", {})
    time.sleep(0.5)
    pub.close()


def _bus_measure(pub_ep: str, sub_ep: str) -> dict[str, Any]:
    import zmq
    from bus import Subscriber
    ctx = mp.get_context("fork")
    sub = Subscriber(sub_ep, ["bench."])
    n = 200_000
    rates, delivered = [], []
    for _ in range(FLOOD_RUNS):  # on 2 cores the six threads of a flood place differently run to run
        p = ctx.Process(target=_bus_pub, args=(pub_ep, "flood", n, 0, sub_ep))
        p.start()
        got, t0 = 0, None
        while True:
            msg = sub.recv(timeout_ms=int(FLOOD_WAIT_S * 1000))
            if msg is None or msg[0] == "bench.end":
                break
            if msg[0] == "bench.flood":
                if t0 is None:
                    t0 = time.perf_counter()
                got += 1
        # an end marker dropped at a full queue ends the flood by the wait: that wait is not the bus's
        waited = FLOOD_WAIT_S if msg is None else 0.0
        rates.append(got / (time.perf_counter() - waited - t0) if t0 else 0.0)
        delivered.append(got / n)
        p.join()
    rate = statistics.median(rates)
    # the same floods with frames encoded once, read without decoding: the bus itself. The loop is
    # written out, not shared with the one above: at ~200k msg/s a function call per message
    # reads a third lower
    raw_rates, raw_delivered = [], []
    sock = sub.socket  # its receive timeout is FLOOD_WAIT_S, left by the recv calls above
    for _ in range(FLOOD_RUNS):
        p = ctx.Process(target=_bus_pub, args=(pub_ep, "raw", n, 0, sub_ep))
        p.start()
        got, t0, waited = 0, None, 0.0
        while True:
            try:
                topic = sock.recv()
                sock.recv()
            except zmq.Again:
                waited = FLOOD_WAIT_S   # the end marker was dropped (the broker's queue was full)
                break
            if topic == b"bench.end":
                break
            if topic == b"bench.flood":
                t0 = t0 or time.perf_counter()
                got += 1
        raw_rates.append(got / (time.perf_counter() - waited - t0) if t0 else 0.0)
        raw_delivered.append(got / n)
        p.join()
    p = ctx.Process(target=_bus_pub, args=(pub_ep, "paced", 3000, 1000.0, sub_ep))
    p.start()
    lat = []
    while True:
        msg = sub.recv(timeout_ms=5000)
        if msg is None or msg[0] == "bench.end":
            break
        if msg[0] == "bench.paced":
            lat.append((time.monotonic_ns() - msg[1]["mono_ns"]) / 1000)
    p.join()
    sub.close()
    return {"msgs_per_s": round(rate), "runs": [round(r) for r in rates],
            "raw_msgs_per_s": round(statistics.median(raw_rates)), "raw_runs": [round(r) for r in raw_rates],
            "raw_delivered": round(min(raw_delivered), 3),
            "delivered": round(min(delivered), 3),
            "p50_us": round(pct(lat, 50), 1),
            "p99_us": round(pct(lat, 99), 1)}


def _measure_through(forwarder: Any, pub_ep: str, sub_ep: str) -> dict[str, float]:
    """Run ``forwarder(pub_ep, sub_ep)`` in a process and measure the bus through it."""
    proc = mp.get_context("fork").Process(target=forwarder, args=(pub_ep, sub_ep))
    proc.start()
    time.sleep(0.2)
    try:
        return _bus_measure(pub_ep, sub_ep)
    finally:
        proc.terminate()
        proc.join()


def bench_bus() -> dict[str, Any]:
    from bus.broker import run_broker
    tmp = tempfile.mkdtemp(prefix="rtbench")
    pub_ep, sub_ep = f"ipc://{tmp}/p.sock", f"ipc://{tmp}/s.sock"
    via = _measure_through(run_broker, pub_ep, sub_ep)
    # reference: libzmq's own C proxy (zmq.proxy), the fastest forwarding ZeroMQ offers,
    # measured by the same publisher and subscriber code
    c_proxy = _measure_through(_c_proxy, f"ipc://{tmp}/rp.sock", f"ipc://{tmp}/rs.sock")
    # reference: a direct PUB -> SUB pair, no broker at all
    direct = _bus_measure(f"ipc://{tmp}/d.sock", f"ipc://{tmp}/d.sock")
    return {"bus_broker_msgs_per_s": via["msgs_per_s"], "bus_broker_msgs_per_s_runs": via["runs"],
            "bus_broker_raw_frames_msgs_per_s": via["raw_msgs_per_s"], "bus_broker_raw_frames_runs": via["raw_runs"],
            "bus_broker_raw_frames_delivered_fraction": via["raw_delivered"],
            "bus_reference_direct_raw_frames_msgs_per_s": direct["raw_msgs_per_s"],
            "bus_broker_delivered_fraction": via["delivered"],
            "bus_broker_p50_us_at_1khz": via["p50_us"], "bus_broker_p99_us_at_1khz": via["p99_us"],
            "bus_reference_c_proxy_msgs_per_s": c_proxy["msgs_per_s"], "bus_reference_c_proxy_msgs_per_s_runs": c_proxy["runs"],
            "bus_reference_c_proxy_p99_us_at_1khz": c_proxy["p99_us"],
            "bus_reference_direct_msgs_per_s": direct["msgs_per_s"], "bus_reference_direct_msgs_per_s_runs": direct["runs"],
            "bus_reference_direct_p99_us_at_1khz": direct["p99_us"]}


def _c_proxy(pub_ep: str, sub_ep: str) -> None:
    import zmq
    ctx = zmq.Context()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    for s in (xsub, xpub):
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
    xsub.bind(pub_ep)
    xpub.bind(sub_ep)
    zmq.proxy(xsub, xpub)


# ------------------------------------------------------------------ engine
def _devices_logged(conn: dict[str, Any]) -> dict[str, Any]:
    """The session's ``capture.device`` and ``playback.device`` (from its event log: they went out
    before the bench subscribed), without the bus header."""
    out: dict[str, Any] = {}
    path = Path(conn.get("session_dir") or "") / "events.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:   # the live log's last line may be cut off mid-write
            continue
        if ev.get("topic") in ("capture.device", "playback.device") and ev["topic"] not in out:
            out[ev["topic"]] = {k: v for k, v in ev["body"].items() if k not in ("v", "ts", "mono_ns", "pub", "seq")}
    return out


#: the audio backends the engine's device figures are measured on; the first one's figures keep their
#: plain names, every other one's carry its name as a suffix (``..._pyaudio``)
BACKENDS = ("native", "pyaudio")


def backend_suffix(backend: str, backends: tuple[str, ...]) -> str:
    """``""`` for the first backend measured, ``_<backend>`` for the others."""
    return "" if backend == backends[0] else f"_{backend}"


def bench_engine(backends: tuple[str, ...] = BACKENDS) -> dict[str, Any]:
    from engine.server.voice import synthesize
    import wave
    tmp = Path(tempfile.mkdtemp(prefix="rtbench"))
    env = dict(os.environ, REALTALK_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"))
    env.pop("OPENAI_API_KEY", None)
    outside: list[float] = []
    inside: list[int] = []
    for _ in range(3):
        proc, ms, own = start_engine(["--text-only"], env)
        outside.append(round(ms, 1))
        inside.append(own)
        stop_engine(proc)
    result: dict[str, Any] = {"engine_start_ready_ms": statistics.median(outside), "engine_start_ready_ms_runs": outside,
                              "engine_start_ready_ms_inside_supervisor": statistics.median(inside)}
    # the real path: virtual PulseAudio devices, the device at 48 kHz (soxr both ways), echo
    # cancellation (AEC3) on with an echo path from the speaker to the mic, a long reply; once per
    # audio backend, each with the floor beside it in its own windows
    vaudio_env()
    env = dict(os.environ, REALTALK_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"))
    env.pop("OPENAI_API_KEY", None)
    result["engine_cpu_backends"] = list(backends)
    for backend in backends:
        figures = _real_path_cpu(tmp, env, backend)
        result.update({k + backend_suffix(backend, backends): v for k, v in figures.items()})
    # the old figure's path, for comparison: a WAV mic and a null speaker (no device, AEC3 or soxr)
    wav = tmp / "q.wav"
    scen = tmp / "s.yaml"
    pcm = np.concatenate([synthesize("Tell me a long story about the sea, the ships and the sailors.", "alloy", 1.0),
                          np.zeros(24000, dtype=np.int16)])
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm.tobytes())
    proc, _, _ = start_engine(["--mic", str(wav), "--speaker", "null", "--scenario", str(scen)], env)
    conn = json.loads((tmp / "run" / "engine.json").read_text())
    time.sleep(len(pcm) / 24000 + 1.0)  # the question has been sent; the reply is streaming
    by_process, _, _ = cpu_window(proc, conn, 8.0)
    stop_engine(proc)
    result["engine_cpu_percent_wav_mic_null_speaker"] = round(sum(by_process.values()), 2)
    return result


def _real_path_cpu(tmp: Path, env: dict[str, str], backend: str) -> dict[str, Any]:
    """The real path's CPU figures with ``audio.backend: BACKEND``, the floor beside it."""
    result: dict[str, Any] = {}
    scen = tmp / "s.yaml"
    scen.write_text('default_reply: "' + "The sea is wide and the ships are many. " * 16 + '"\n')   # ~38 s
    cfg = tmp / "real.yaml"
    cfg.write_text(f"audio: {{backend: {backend}, mic: vmic, speaker: vspk, echo: aec, device_rate_hz: 48000}}\n"
                   f"local_server: {{asr: false, scenario: {scen}}}\nsession: {{turn_detection: null, transcription: null}}\n")
    vaudio("echo-on", "60%")
    try:
        proc, ms, _ = start_engine(["--config", str(cfg)], env)
        result["engine_start_ready_ms_devices"] = round(ms, 1)
        conn = json.loads((tmp / "run" / "engine.json").read_text())
        from bus import Publisher, Subscriber
        sub = Subscriber(conn["subscribe"], ["playout.", "playback.device", "capture.", "latency.mic"])
        pub = Publisher(conn["publish"], "bench")
        pub.join(conn["subscribe"])
        pub.publish("cmd.say", {"text": "Tell me about the sea.", "id": f"cpu-{time.monotonic_ns()}"})
        log: list[tuple[float, str, dict[str, Any]]] = []   # (sent at: the message's mono_ns, in s), topic, body

        def pump(until: float) -> None:
            while time.monotonic() < until:
                msg = sub.recv(timeout_ms=50)
                if msg is not None:
                    log.append((msg[1].get("mono_ns", time.monotonic_ns()) / 1e9, *msg))
        pump(time.monotonic() + 1.5)
        # the floor (bench/floor.py: the same devices, rate and periods, PyAudio + soxr + AEC3 and
        # nothing of the engine) runs beside the engine and is measured in the same windows: this
        # machine's speed moves by a quarter from minute to minute, a window apart it moves too
        from bench.floor import figures, running
        windows: list[tuple[dict[str, float], dict[str, float], float, float]] = []
        # with the native backend, also the least a native engine of this design could cost (the
        # devices through libpulse in C, AEC3 alone, the C link): "input_c", "output_c", "aec3"
        with running(48000, 20, 10, env, link=True, native=backend == "native") as floor_pids:
            for _ in range(CPU_WINDOWS):
                by_name, t0, t1 = cpu_window(proc, conn, CPU_WINDOW_S, floor_pids)
                windows.append(({k: v for k, v in by_name.items() if k not in floor_pids},
                                {k: by_name[k] for k in floor_pids}, t0, t1))
        pump(time.monotonic() + 0.5)
        started = [t for t, topic, _ in log if topic == "playout.started"]
        ended = [t for t, topic, _ in log if topic in ("playout.stopped", "playout.interrupted", "playout.underrun")]
        devices = _devices_logged(conn)
        totals = [round(sum(w[0].values()), 2) for w in windows]
        floor_figures = [figures(w[1]) for w in windows]
        floors = [f["floor_cpu_percent_of_one_core"] for f in floor_figures]
        above = [round(t - f, 2) for t, f in zip(totals, floors)]
        mid = sorted(range(len(windows)), key=lambda i: totals[i])[len(windows) // 2]   # the median window
        first_t0, last_t1 = windows[0][2], windows[-1][3]
        result.update({
            "engine_cpu_percent_of_one_core_streaming": statistics.median(totals),
            "engine_cpu_percent_of_one_core_streaming_runs": totals,
            "engine_cpu_percent_by_process": windows[mid][0],
            "engine_cpu_window_s": round(windows[mid][3] - windows[mid][2], 2),
            "engine_cpu_windows": len(windows),
            # the check: a reply started before the first window and neither stopped nor broke up in any
            "engine_cpu_reply_streaming_whole_window": bool(started and started[0] < first_t0
                                                           and not any(first_t0 <= t <= last_t1 for t in ended)),
            # when it is false, why: what ended or broke the reply inside the windows (topic, s into them)
            "engine_cpu_reply_broken_by": [(topic, round(t - first_t0, 2)) for t, topic, _ in log
                                           if topic in ("playout.stopped", "playout.interrupted", "playout.underrun")
                                           and first_t0 <= t <= last_t1],
            "engine_cpu_path": f"audio.backend {backend} on PulseAudio null sinks, device 48 kHz (soxr), echo aec, "
                               "echo path 60 %",
            "engine_cpu_devices": devices,
        })
        result.update(floor_figures[mid])
        # the whole floor, the links' floors and the native engine's least: their medians over the
        # windows, and each window's (the C ones only where gcc built them)
        for key in ("floor_cpu_percent_of_one_core", "floor_cpu_percent_link_python_websockets",
                    "floor_cpu_percent_link_c_websocket", "floor_cpu_percent_devices_libpulse_c",
                    "floor_cpu_percent_aec3_python_call_20ms", "floor_cpu_percent_native_engine_least"):
            runs = [f[key] for f in floor_figures if key in f]
            if runs:
                result[key] = statistics.median(runs)
                result[key + "_runs"] = runs
        result["engine_cpu_percent_above_floor"] = statistics.median(above)
        result["engine_cpu_percent_above_floor_runs"] = above
        sub.close()
        pub.close()
        stop_engine(proc)
    finally:
        vaudio("echo-off")
    return result


# ------------------------------------------------------------------ local server
def _serve(port_q: Any, speed: float) -> None:
    from engine.server.app import ServerConfig, serve_forever

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        task = loop.create_task(serve_forever(ServerConfig(port=0, speed=speed, asr=False), ready))
        port_q.put(await ready)
        await task
    asyncio.run(main())


async def _first_delta(url: str, n: int) -> list[float]:
    import websockets
    out = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        for i in range(n):
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                      "content": [{"type": "input_text", "text": f"Hello number {i}"}]}}))
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "response.create"}))
            first = None
            while True:
                ev = json.loads(await ws.recv())
                if ev["type"] == "response.output_audio.delta" and first is None:
                    first = time.perf_counter() - t0
                if ev["type"] == "response.done":
                    break
            if first is None:
                raise RuntimeError(f"response {i} of the local server had no audio delta")
            out.append(first * 1000)
    return out


async def _session(url: str, speech: np.ndarray, late: list[float], deltas: list[int]) -> None:
    import websockets
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}}))
        mic = np.concatenate([speech, np.zeros(24000 * 4, dtype=np.int16)])

        async def send_mic() -> None:
            t = time.monotonic()
            for i in range(0, len(mic), FRAME):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(mic[i:i + FRAME].tobytes()).decode()}))
                t += 0.02
                await asyncio.sleep(max(0.0, t - time.monotonic()))
        sender = asyncio.create_task(send_mic())
        start, audio_ms = None, 0.0
        while True:
            ev = json.loads(await ws.recv())
            if ev["type"] == "response.output_audio.delta":
                now = time.monotonic()
                if start is None:
                    start = now
                else:
                    late.append((now - (start + audio_ms / 1000)) * 1000)
                audio_ms += len(base64.b64decode(ev["delta"])) / 48
                deltas[0] += 1
            elif ev["type"] == "response.done":
                break
        await sender


def bench_server() -> dict[str, Any]:
    from engine.server.voice import synthesize
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_serve, args=(q, 1.0))
    p.start()
    url = q.get(timeout=30) + "?model=gpt-realtime"
    firsts = asyncio.run(_first_delta(url, 20))
    speech = synthesize("Hello, what is the weather like today?", "alloy", 1.0)
    late: list[float] = []
    deltas = [0]

    async def many() -> None:
        await asyncio.gather(*[_session(url, speech, late, deltas) for _ in range(20)])
    t0 = time.monotonic()
    asyncio.run(many())
    wall = time.monotonic() - t0
    p.terminate()
    p.join()
    return {"server_first_audio_delta_p50_ms": round(pct(firsts, 50), 1),
            "server_first_audio_delta_max_ms": round(max(firsts), 1),
            "server_concurrent_sessions": 20, "server_concurrent_deltas": deltas[0],
            "server_deltas_over_20ms_late": sum(1 for x in late if x > 20),
            "server_delta_lateness_p99_ms": round(pct(late, 99), 1), "server_concurrent_wall_s": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("suite", choices=["core", "server", "conversation", "faults", "console", "phone", "asr", "sip",
                                       "live", "jitter"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", choices=["native", "pyaudio", "both"], default="both",
                    help="core, conversation: the audio backend(s) the engine's figures are measured on")
    ap.add_argument("--interruptions", type=int, default=200)
    ap.add_argument("--soak-minutes", type=float, default=30.0, help="faults: the soak's length")
    ap.add_argument("--fuzz", type=int, default=10_000, help="faults: fuzzed bus messages")
    ap.add_argument("--double-talk-trials", type=int, default=5, help="per level and guard setting; 0: skip")
    ap.add_argument("--stall-replies", type=int, default=10, help="conversation: replies per playback stall length; 0: skip")
    ap.add_argument("--minutes", type=float, default=10.0, help="console: minutes of events with the page open")
    ap.add_argument("--turns", type=int, default=12, help="jitter: replies per session (after a warm-up)")
    ap.add_argument("--first-delta-turns", type=int, default=None,
                    help="conversation (default 5 per link and backend), phone (10 per link and hold): replies "
                         "per session of the first delta's wait, after a warm-up; 0: skip")
    ap.add_argument("--out", default=None, help="jitter: where the target plot (PNG) and its CSVs go")
    ap.add_argument("--closed-minutes", type=float, default=None, help="console: minutes of turns before it opens")
    ap.add_argument("--yields", type=int, default=20, help="live: times the user talks over the model")
    ap.add_argument("--utterances", type=int, default=10, help="live: utterances at 30 ms jitter, engine and baseline")
    args = ap.parse_args()
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    if args.suite == "core":
        from bench.capture_step import run as run_capture_step
        result = {**bench_ring(), **bench_bus(), **run_capture_step(), **bench_engine(backends)}
    elif args.suite == "conversation":
        from bench.conversation import FIRST_DELTA_TURNS, run
        result = run(args.interruptions, args.double_talk_trials, backends, args.stall_replies,
                     FIRST_DELTA_TURNS if args.first_delta_turns is None else args.first_delta_turns)
    elif args.suite == "console":
        from bench.console import run as run_console
        result = run_console(args.minutes, args.closed_minutes)
    elif args.suite == "phone":
        from bench.phone import FIRST_DELTA_TURNS as PHONE_TURNS, run as run_phone
        result = run_phone(PHONE_TURNS if args.first_delta_turns is None else args.first_delta_turns)
    elif args.suite == "jitter":
        from bench.jitter import run as run_jitter
        result = run_jitter(args.turns, Path(args.out) if args.out else None)
    elif args.suite == "sip":
        from bench.sip import run as run_sip
        result = run_sip()
    elif args.suite == "asr":
        from bench.asr import run as run_asr
        result = run_asr(["marin", "alloy", "cedar", "ash"])
    elif args.suite == "live":
        from bench.live import run as run_live
        result = run_live(args.yields, args.utterances)
    elif args.suite == "faults":
        from bench.faults import run as run_faults
        result = run_faults(args.soak_minutes, args.fuzz)
    else:
        result = bench_server()
    print(json.dumps(result, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
