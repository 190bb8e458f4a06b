"""Bench: phone calls at once through `engine phone` (one asyncio process, a core per call) with the
fake Twilio phone, local server at real time. Prints JSON.

    python bench/phone.py [--calls 1,5,10,20] [--seconds 8]

Per level: every call dials, asks for a reply (cmd.say) and listens at real pace. Figures: the phone
process's CPU (per call), the fake phones' media frames sent more than 20 ms late (the load on the
machine shows there first), the replies' frames played, and the bridge's own p99 latencies from
phone.call.ended (frame in -> API socket queue, API delta -> media frames queued).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus import Publisher, Subscriber  # noqa: E402
from engine.phone.simulator import FakePhone  # noqa: E402


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def level(url: str, n: int, seconds: float, pub: Publisher, msgs: list[Any], phone_pid: int) -> dict[str, Any]:
    phones = [FakePhone(url, custom_parameters={"n": str(i)}) for i in range(n)]
    await asyncio.gather(*(p.dial() for p in phones))
    await asyncio.sleep(1.0)
    c0, t0 = cpu_s(phone_pid), time.monotonic()
    for p in phones:
        pub.publish("cmd.say", {"text": "Please tell me about the weather on the coast this weekend",
                                "phone_call_id": p.call_sid, "id": "b-" + p.call_sid})
    await asyncio.sleep(seconds)
    cpu, wall = cpu_s(phone_pid) - c0, time.monotonic() - t0
    await asyncio.gather(*(p.hang_up() for p in phones))
    ids = {p.call_sid for p in phones}
    deadline = time.monotonic() + 10
    ended: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(ended) < n:
        ended = [b for t, b in list(msgs) if t == "phone.call.ended" and b.get("phone_call_id") in ids]
        await asyncio.sleep(0.1)

    def worst(key: str) -> float | None:
        vals = [e[key] for e in ended if e.get(key) is not None]
        return max(vals) if vals else None
    return {"calls": n, "cpu_percent": round(100 * cpu / wall, 1), "cpu_percent_per_call": round(100 * cpu / wall / n, 2),
            "phone_late_frames": sum(p.late_frames for p in phones),
            "reply_frames_played_min": min(p.played_frames for p in phones),
            "in_latency_p99_ms_max": worst("in_latency_p99_ms"), "out_latency_p99_ms_max": worst("out_latency_p99_ms"),
            "calls_ended": len(ended)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", default="1,5,10,20")
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-phone-"))
    run = tmp / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "REALTALK_RUNTIME_DIR": str(run), "XDG_DATA_HOME": str(tmp / "data")}
    env.pop("OPENAI_API_KEY", None)
    os.environ.update({k: env[k] for k in ("REALTALK_RUNTIME_DIR", "XDG_DATA_HOME")})
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "phone", "--backend", "local", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp))
    url = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"phone calls at (ws://\S+)", line)
        if m:
            url = m.group(1)
            break
    conn = json.loads((run / "engine.json").read_text())
    phone_pid = next(c["pid"] for c in conn["children"] if c["name"] == "phone")
    sub = Subscriber(conn["subscribe"], ["phone.call.ended"])
    pub = Publisher(conn["publish"], "bench-phone")
    pub.join(conn["subscribe"])
    msgs: list[Any] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            m = sub.recv(timeout_ms=100)
            if m:
                msgs.append(m)
    threading.Thread(target=reader, daemon=True).start()
    out: dict[str, Any] = {"layout": "one phone process (asyncio), a RealtimeCore per call", "levels": []}
    try:
        for n in [int(x) for x in args.calls.split(",")]:
            out["levels"].append(asyncio.run(level(url, n, args.seconds, pub, msgs, phone_pid)))
    finally:
        stop.set()
        proc.send_signal(2)
        proc.wait(20)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
