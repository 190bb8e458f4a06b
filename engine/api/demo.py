"""``engine demo``: a spoken conversation on virtual devices with the local server.

Brings up PulseAudio null sinks when no sound server is reachable, starts the engine
(real PyAudio capture and playback on the virtual mic and speaker), speaks a question
into the virtual mic with espeak-ng, prints the conversation and its cost as it comes
over the bus, records what the virtual speaker played, and stops everything.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

from bus import Subscriber
from bus.runtime import connection_file, read_connection
from engine.pcm import CHANNELS, RATE_HZ, SAMPLE_WIDTH_BYTES

#: the local server's script for the demo (package data: `engine demo` runs from an installed package too)
SCENARIO = Path(__file__).with_name("demo.yaml")
#: starts virtual devices when no sound server is reachable; only in a clone of the repository
VAUDIO = Path(__file__).resolve().parents[2] / "tools" / "vaudio.sh"


def _ensure_devices() -> None:
    if subprocess.run(["pactl", "info"], capture_output=True).returncode == 0 and os.environ.get("PULSE_SERVER"):
        return
    if not VAUDIO.exists():
        raise SystemExit("engine demo: no virtual audio devices are up (PULSE_SERVER unset or not answering), and "
                         "tools/vaudio.sh, which starts them, comes with the repository, not the package: "
                         "run bash tools/demo.sh from a clone")
    out = subprocess.run(["bash", str(VAUDIO), "start"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"engine demo: cannot start virtual audio devices: {out.stderr.strip()}")
    for part in out.stdout.split()[1:]:
        k, _, v = part.partition("=")
        os.environ[k] = v
    print("demo: virtual audio devices are up (PulseAudio null sinks: mic 'vmic', speaker 'vspk')")


def run_demo(args: argparse.Namespace) -> int:
    from engine.server.voice import synthesize
    _ensure_devices()
    runs = Path.cwd() / "runs"
    runs.mkdir(exist_ok=True)
    question_wav = runs / "demo-question.wav"
    pcm = synthesize(args.question, "alloy", 1.0)
    with wave.open(str(question_wav), "wb") as w:
        w.setnchannels(CHANNELS)
        w.setsampwidth(SAMPLE_WIDTH_BYTES)
        w.setframerate(RATE_HZ)
        pad = np.zeros(4800, dtype=np.int16)
        w.writeframes(np.concatenate([pad, pcm, pad]).tobytes())
    reply_wav = runs / "demo-reply.wav"
    engine = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--mic", "vmic",
                               "--speaker", "vspk", "--scenario", str(SCENARIO),
                               "--speed", str(args.speed)], stdout=subprocess.PIPE, text=True)
    recorder = None
    try:
        assert engine.stdout is not None
        for line in engine.stdout:
            print(line, end="")
            if "ready in" in line:
                break
        else:
            print("demo: the engine did not start", file=sys.stderr)
            return 1
        conn = read_connection(connection_file())   # this user's own private file only (bus/runtime.py)
        sub = Subscriber(conn["subscribe"], ["user.", "model.transcript.done", "cost.session", "response.done",
                                             "playback.", "playout.", "engine.error"])
        recorder = subprocess.Popen(["parecord", "--device=spk.monitor", f"--rate={RATE_HZ}", f"--channels={CHANNELS}",
                                     "--format=s16le", "--file-format=wav", str(reply_wav)])
        time.sleep(0.3)
        print(f"\nYOU (spoken into the virtual mic): {args.question}")
        subprocess.run(["paplay", "--device=micsink", str(question_wav)], check=True)
        deadline = time.monotonic() + 60
        answered = False
        while time.monotonic() < deadline:
            msg = sub.recv(timeout_ms=200)
            if msg is None:
                continue
            topic, body = msg
            if topic == "user.speech.started":
                print("      (the server heard speech start)")
            elif topic == "user.transcript.done":
                print(f"USER transcript (offline recogniser, rough): {body['text']}")
            elif topic == "model.transcript.done":
                print(f"MODEL: {body['text']}")
            elif topic == "cost.session":
                print(f"COST so far: ${body['usd']:.5f} (as OpenAI would bill gpt-realtime)")
            elif topic == "engine.error":
                print(f"ERROR: {body.get('message')}")
            elif topic == "response.done":
                answered = True
            elif topic == "playout.stopped" and answered:
                break
        time.sleep(0.5)
        return 0 if answered else 1
    finally:
        if recorder is not None:
            recorder.terminate()
            recorder.wait()
        engine.send_signal(2)
        try:
            out, _ = engine.communicate(timeout=15)
            print(out, end="")
        except subprocess.TimeoutExpired:
            engine.kill()
        if reply_wav.exists():
            print(f"\ndemo: the speaker's output was recorded to {reply_wav}")
