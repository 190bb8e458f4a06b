"""The floor under the engine's CPU figure: what the parts the engine must use cost with none
of the engine's own code. Two processes, as capture and playback are two: a PyAudio input
stream on the mic and a PyAudio output stream on the speaker, at the engine's device rate and
periods, whose callbacks do only what no engine can leave out (the mic's: soxr to AEC3's rate
and one AEC3 call per block, with a speech-like far end; the speaker's: hand over silence).
Same CPU measure as the engine's figure (``bench.run._cpu_ns``). Definitions: bench/README.md.

Beside it, on request, the link's floor: the least a Python API link does on the same socket
stack as the engine's (asyncio ``websockets``, no compression): one ``input_audio_buffer.append``
of 20 ms sent every 20 ms, and one 100 ms audio delta a tenth of a second received and decoded,
over loopback TCP from a server process (not measured, as the engine's local server is not).

    python -m bench.floor input RATE_HZ PERIOD_MS     # one side, until stdin closes
    python -m bench.floor link-server                 # prints its port
    python -m bench.floor link PORT                   # the link's floor, until stdin closes

And the same link in C (bench/link_floor.c, built with gcc when it runs), to show what a native
API link could cost at best: the same appends, the same deltas decoded, a plain WebSocket.

And, on request, the least a native engine of this design could cost: the devices through libpulse
in C as the native backend opens them (bench/device_floor.c, built with gcc when it runs; nothing
behind the callbacks), and AEC3 alone through its only binding (pywebrtc-audio: one Python call on
a chunk's two 10 ms blocks, woken every 20 ms, as the capture worker makes it):

    python -m bench.floor aec3                        # until stdin closes
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent


def _side(kind: str, rate_hz: int, period_ms: int) -> None:
    import numpy as np
    import pyaudio
    from engine.audio.devices import find_device, open_pyaudio, resample_stream
    from engine.audio.ring import SampleFifo
    from engine.capture.echo import AEC_RATE_HZ
    pa = open_pyaudio()
    frames = rate_hz * period_ms // 1000
    if kind == "input":
        from pywebrtc_audio import EchoCanceller
        aec = EchoCanceller(sample_rate=AEC_RATE_HZ, num_channels=1, stream_delay_ms=0)
        to_aec = resample_stream(rate_hz, AEC_RATE_HZ)
        block = AEC_RATE_HZ // 100
        t = np.arange(AEC_RATE_HZ * 2) / AEC_RATE_HZ   # a far end that is never silent: 2 s of a swept tone
        sweep = (6000 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.int16)
        far = np.concatenate([sweep, sweep[:AEC_RATE_HZ]])   # a slice from anywhere in the sweep, up to 1 s long
        near_fifo = SampleFifo(AEC_RATE_HZ)   # the resampler's bursts, waiting for whole 10 ms blocks
        pos = [0]

        def callback(in_data: bytes | None, frame_count: int, time_info: Any, status: int) -> tuple[None, int]:
            # every mic frame goes through AEC3, as in the engine: what does not fill a block waits
            near_fifo.push(to_aec.resample_chunk(np.frombuffer(in_data or b"", dtype=np.int16)))
            n = near_fifo.length // block * block
            if n:
                p = pos[0] % len(sweep)
                aec.process(near_fifo.head(n), far[p:p + n])
                near_fifo.drop(n)
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


LINK_CHUNK_S = 0.02            #: the link floor's append: 20 ms, as the engine's mic chunk
LINK_DELTA_S = 0.1             #: its server's audio delta: 100 ms, as the local server's (and OpenAI's)


def _link_server() -> None:
    """A loopback websockets server: reads everything, sends a 100 ms audio delta every 100 ms."""
    import asyncio
    import base64
    import json
    import numpy as np
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed
    pcm = np.random.default_rng(2).normal(0, 1000, int(24000 * LINK_DELTA_S)).astype(np.int16).tobytes()
    delta = json.dumps({"type": "response.output_audio.delta", "response_id": "resp_1", "item_id": "item_1",
                        "output_index": 0, "content_index": 0, "delta": base64.b64encode(pcm).decode()})

    async def session(ws: ServerConnection) -> None:
        async def speak() -> None:
            loop = asyncio.get_running_loop()
            at = loop.time()
            while True:
                at += LINK_DELTA_S
                await asyncio.sleep(at - loop.time())
                await ws.send(delta)
        task = asyncio.create_task(speak())
        try:
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass   # the C link ends by closing its socket, without a close frame
        finally:
            task.cancel()

    async def main() -> None:
        async with serve(session, "127.0.0.1", 0, max_size=None, compression=None, ping_interval=None) as server:
            print(next(iter(server.sockets)).getsockname()[1], flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    asyncio.run(main())


def _link(port: int) -> None:
    """The link's floor (the module docstring): woken by the loop's timer once per chunk (the
    engine's link, by the mic ring's eventfd), the append built as the engine builds it."""
    import asyncio
    import base64
    import json
    import numpy as np
    from websockets.asyncio.client import connect
    from websockets.asyncio.connection import broadcast
    pcm = np.random.default_rng(1).normal(0, 1000, int(24000 * LINK_CHUNK_S)).astype(np.int16).tobytes()

    async def main() -> None:
        async with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None, ping_interval=None) as ws:
            loop = asyncio.get_running_loop()
            next_at = loop.time()

            def send() -> None:
                nonlocal next_at
                broadcast((ws,), '{"type":"input_audio_buffer.append","audio":"'
                          + base64.b64encode(pcm).decode("ascii") + '"}')
                next_at += LINK_CHUNK_S
                loop.call_at(next_at, send)
            loop.call_soon(send)
            done = loop.run_in_executor(None, sys.stdin.read)
            print("ready", flush=True)
            while not done.done():
                recv = asyncio.ensure_future(ws.recv())
                await asyncio.wait((recv, done), return_when=asyncio.FIRST_COMPLETED)
                if recv.done():
                    base64.b64decode(json.loads(recv.result())["delta"])
                else:
                    recv.cancel()
    asyncio.run(main())


def _aec3() -> None:
    """AEC3 alone, as the capture worker calls it: every 20 ms one ``process`` on two 10 ms blocks
    at AEC3's rate (a far end never silent, its echo in the near end), nothing else."""
    import numpy as np
    from pywebrtc_audio import EchoCanceller
    from engine.capture.echo import AEC_RATE_HZ
    aec = EchoCanceller(sample_rate=AEC_RATE_HZ, num_channels=1, stream_delay_ms=0)
    chunk = AEC_RATE_HZ // 50
    t = np.arange(AEC_RATE_HZ * 2) / AEC_RATE_HZ
    far = (6000 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.int16)
    near = (np.roll(far, AEC_RATE_HZ * 60 // 1000) // 3).astype(np.int16)   # its echo, 60 ms later, -10 dB
    done = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        done.set()
    threading.Thread(target=wait_stdin, daemon=True).start()
    print("ready", flush=True)
    at, pos = time.monotonic(), 0
    while not done.is_set():
        aec.process(near[pos:pos + chunk], far[pos:pos + chunk])
        pos = (pos + chunk) % (len(far) - chunk)
        at += 0.02
        time.sleep(max(0.0, at - time.monotonic()))


def _popen(argv: list[str], env: dict[str, str] | None) -> subprocess.Popen[str]:
    """A floor program started with pipes: it prints its port or "ready", and runs until its stdin closes."""
    return subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _start(args: list[str], env: dict[str, str] | None) -> subprocess.Popen[str]:
    return _popen([sys.executable, "-m", "bench.floor", *args], env)


def _build_c(name: str, into: Path, libs: tuple[str, ...] = (), header: str | None = None) -> Path | None:
    """bench/NAME.c built with gcc -O2 (and ``libs``) into ``into``; None without gcc, or without
    ``header`` where one is needed."""
    import shutil
    gcc = shutil.which("gcc")
    if gcc is None or (header is not None and not Path(header).is_file()):
        return None
    exe = into / name
    subprocess.run([gcc, "-O2", "-o", str(exe), str(REPO / "bench" / f"{name}.c"), *libs], check=True, timeout=60)
    return exe


#: the PulseAudio devices under the ALSA names bench/floor.py's sides open (tools/vaudio.sh: vmic, vspk)
PULSE_MIC = os.environ.get("FLOOR_PULSE_MIC", "micsink.monitor")
PULSE_SPEAKER = os.environ.get("FLOOR_PULSE_SPEAKER", "spk")


@contextlib.contextmanager
def running(rate_hz: int, mic_period_ms: int, speaker_period_ms: int,
            env: dict[str, str] | None = None, link: bool = False,
            native: bool = False) -> Iterator[dict[str, int]]:
    """Both sides running (``{"input": pid, "output": pid}``, and with ``link`` the link's floors:
    ``"link"``, and ``"link_c"`` where gcc is; with ``native`` the native engine's least:
    ``"aec3"``, and ``"input_c"``, ``"output_c"`` where gcc and libpulse's headers are) for the
    ``with`` block: started and past their start-up on entry, stopped on exit."""
    import tempfile
    procs = {kind: _start([kind, str(rate_hz), str(period)], env)
             for kind, period in (("input", mic_period_ms), ("output", speaker_period_ms))}
    server = None
    built = tempfile.TemporaryDirectory(prefix="rtfloor")   # the C floors' programs, removed on exit
    try:
        if native:
            procs["aec3"] = _start(["aec3"], env)
            devices = _build_c("device_floor", Path(built.name), ("-lpulse",), "/usr/include/pulse/pulseaudio.h")
            if devices is not None:
                for kind, side, period, device in (("input_c", "mic", mic_period_ms, PULSE_MIC),
                                                   ("output_c", "speaker", speaker_period_ms, PULSE_SPEAKER)):
                    procs[kind] = _popen([str(devices), side, str(rate_hz), str(period), device], env)
        if link:
            server = _start(["link-server"], env)
            port = server.stdout.readline().strip() if server.stdout else ""
            if not port.isdigit():
                raise RuntimeError(f"bench.floor link-server did not start (exit {server.poll()})")
            procs["link"] = _start(["link", port], env)
            c_link = _build_c("link_floor", Path(built.name))
            if c_link is not None:
                procs["link_c"] = _popen([str(c_link), port], env)
        for kind, p in procs.items():
            line = p.stdout.readline() if p.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"bench.floor {kind} did not start (exit {p.poll()})")
        time.sleep(1.0)   # past the streams' start-up
        yield {kind: p.pid for kind, p in procs.items()}
    finally:
        started = [*procs.values(), *([server] if server is not None else [])]
        for p in started:
            if p.stdin:
                p.stdin.close()
        for p in started:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        built.cleanup()


def figures(by_side: dict[str, float]) -> dict[str, float]:
    """The floor's figures from the % of one core of each side over one window (the link's floor,
    when it ran, apart: it is not in ``floor_cpu_percent_of_one_core``)."""
    out = {"floor_cpu_percent_of_one_core": round(by_side["input"] + by_side["output"], 2),
           "floor_cpu_percent_mic_pyaudio_soxr_aec3": round(by_side["input"], 2),
           "floor_cpu_percent_speaker_pyaudio": round(by_side["output"], 2)}
    if "link" in by_side:
        out["floor_cpu_percent_link_python_websockets"] = round(by_side["link"], 2)
    if "link_c" in by_side:
        out["floor_cpu_percent_link_c_websocket"] = round(by_side["link_c"], 2)
    if "aec3" in by_side:
        out["floor_cpu_percent_aec3_python_call_20ms"] = round(by_side["aec3"], 2)
    if "input_c" in by_side and "output_c" in by_side:
        devices = by_side["input_c"] + by_side["output_c"]
        out["floor_cpu_percent_devices_libpulse_c"] = round(devices, 2)
        out["floor_cpu_percent_mic_libpulse_c"] = round(by_side["input_c"], 2)
        out["floor_cpu_percent_speaker_libpulse_c"] = round(by_side["output_c"], 2)
        if "aec3" in by_side and "link_c" in by_side:
            out["floor_cpu_percent_native_engine_least"] = round(devices + by_side["aec3"] + by_side["link_c"], 2)
    return out


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
    if sys.argv[1] == "link-server":
        _link_server()
    elif sys.argv[1] == "link":
        _link(int(sys.argv[2]))
    elif sys.argv[1] == "aec3":
        _aec3()
    else:
        _side(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
