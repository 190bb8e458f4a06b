"""``python bench/run.py sip``: ``engine sip`` answering calls from the local server's SIP stand-in.

- At 1, 10 and 50 calls arriving together (the stand-in rings them all at once, both webhooks
  each): the webhook -> accept latency of each call, from the instant the stand-in began posting
  its first webhook to the instant the accept request reached it (both on the stand-in's clock),
  p50 and p99; and calls accepted per second, N over the time from the first call's first webhook
  to the last call's accept.
- While TALK_CALLS calls talk (each caller says a line, waits for the reply, again, for the
  window): the CPU of the ``engine sip`` process in % of one core and its PSS, each over the
  same process idle, divided by the calls. No audio passes through it: the audio is between the
  caller and the API.

Definitions: bench/README.md ("sip").
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, cpu_ns, pct, stop_engine

LEVELS = (1, 10, 50)
TALK_CALLS = 20
TALK_WINDOW_S = 10.0
SERVER_SPEED = 4.0


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` (``/proc/PID/smaps_rollup``), kB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class SipEngine:
    """``engine sip --port 0 --backend local`` in a process of its own, with its runtime dir."""

    def __init__(self, tmp: Path, speed: float) -> None:
        self.env = {**os.environ, "OPENAI_WEBHOOK_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
                    "XDG_RUNTIME_DIR": str(tmp / "run"), "PYTHONUNBUFFERED": "1"}
        (tmp / "run").mkdir(mode=0o700)
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "sip", "--port", "0", "--backend",
                                      "local", "--speed", str(speed)], stdout=subprocess.PIPE, text=True,
                                     env=self.env, cwd=str(REPO))
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        self.url = ""
        while time.monotonic() < deadline and not self.url:
            if not sel.select(timeout=0.5):
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"SIP webhooks at (\S+)", self.proc.stdout.readline())
            if m:
                self.url = m.group(1)
        if not self.url:
            self.close()
            raise RuntimeError("engine sip was not ready within 60 s")
        status = self.status()
        self.base = "http://" + status["server_url"].removeprefix("ws://").removesuffix("/realtime")
        self.sip_pid = next(c["pid"] for c in status["children"] if c["name"] == "sip")
        from bus.runtime import read_connection   # the local server's key: in the private connection file only
        self.auth = {"authorization": f"Bearer {read_connection()['server_key']}"}

    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "engine.api.cli", "status", "--json"], env=self.env,
                             capture_output=True, text=True, cwd=str(REPO), timeout=30)
        return dict(json.loads(out.stdout))

    def close(self) -> None:
        stop_engine(self.proc)


async def _post(eng: SipEngine, url: str, body: Any = None) -> Any:
    from engine.httpio import request
    resp = await request("POST", url, json_body=body, headers=eng.auth, timeout_s=30)
    return resp.parsed()


async def _get(eng: SipEngine, url: str) -> Any:
    from engine.httpio import request
    return (await request("GET", url, headers=eng.auth, timeout_s=30)).parsed()


async def level(eng: SipEngine, n: int) -> dict[str, Any]:
    """N calls rung at once; each call's webhook -> accept latency; then all hung up."""
    script = [{"pause_ms": 600_000}]
    ids = await asyncio.gather(*[_post(eng, f"{eng.base}/x/sip/calls", {"webhook_url": eng.url, "script": script,
                                                                    "ring_timeout_s": 60})
                                 for _ in range(n)])
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reports = await asyncio.gather(*[_get(eng, f"{eng.base}/x/sip/calls/{i['call_id']}") for i in ids])
        if all(r["phase"] != "ringing" for r in reports):
            break
        await asyncio.sleep(0.05)
    lat = [r["webhook_to_accept_ms"] for r in reports if r.get("webhook_to_accept_ms") is not None]
    accepted = [r for r in reports if r["phase"] == "answered"]
    own = [c["accept_ms"] for c in eng.status()["sip"]["calls"]]   # engine sip's own: webhook in -> accept answered
    for r in accepted:
        kind = "realtime/calls" if r["api"] == "realtime" else "live/sessions"
        rid = r["call_id"] if r["api"] == "realtime" else r["session_id"]
        await _post(eng, f"{eng.base}/{kind}/{rid}/hangup")
    firsts = [r["first_webhook_mono_s"] for r in reports if r.get("first_webhook_mono_s") is not None]
    asks = [r["accept_asked_mono_s"] for r in accepted if r.get("accept_asked_mono_s") is not None]
    span_s = max(asks) - min(firsts) if asks and firsts else 0.0   # the stand-in's clock: first webhook -> last accept
    return {f"sip_accept_at_{n}_p50_ms": round(pct(lat, 50), 1), f"sip_accept_at_{n}_p99_ms": round(pct(lat, 99), 1),
            f"sip_accept_at_{n}_max_ms": round(max(lat), 1) if lat else None,
            f"sip_accepted_at_{n}": len(accepted),
            f"sip_own_accept_at_{n}_p50_ms": round(pct(own, 50), 1), f"sip_own_accept_at_{n}_p99_ms": round(pct(own, 99), 1),
            f"sip_calls_accepted_per_s_at_{n}": round(len(accepted) / span_s, 1) if span_s else None}


async def talking(eng: SipEngine, calls: int, window_s: float) -> dict[str, Any]:
    """CPU and PSS of the sip process idle, then with ``calls`` calls talking."""
    pid = eng.sip_pid
    await asyncio.sleep(1.0)
    c0, t0 = cpu_ns(pid), time.monotonic()
    await asyncio.sleep(window_s / 2)
    idle_cpu = 100 * (cpu_ns(pid) - c0) / 1e9 / (time.monotonic() - t0)
    idle_pss = pss_kb(pid)
    turn = [{"say": "What is the capital of France?"}, {"wait": "reply"}, {"pause_ms": 500}]
    script = [{"pause_ms": 300}, *(turn * 40)]
    ids = await asyncio.gather(*[_post(eng, f"{eng.base}/x/sip/calls", {"webhook_url": eng.url, "script": script})
                                 for _ in range(calls)])
    await asyncio.sleep(2.0)   # accepted and attached
    c1, t1 = cpu_ns(pid), time.monotonic()
    await asyncio.sleep(window_s)
    busy_cpu = 100 * (cpu_ns(pid) - c1) / 1e9 / (time.monotonic() - t1)
    busy_pss = pss_kb(pid)
    reports = await asyncio.gather(*[_get(eng, f"{eng.base}/x/sip/calls/{i['call_id']}") for i in ids])
    for r in reports:
        if r["phase"] == "answered":
            kind = "realtime/calls" if r["api"] == "realtime" else "live/sessions"
            rid = r["call_id"] if r["api"] == "realtime" else r["session_id"]
            await _post(eng, f"{eng.base}/{kind}/{rid}/hangup")
    replies = sum(r["caller"]["heard_replies"] for r in reports)
    return {"sip_talk_calls": calls, "sip_talk_window_s": window_s,
            "sip_talk_calls_answered": sum(1 for r in reports if r["phase"] in ("answered", "ended")),
            "sip_talk_replies_heard": replies,
            "sip_idle_cpu_percent": round(idle_cpu, 2), "sip_talk_cpu_percent": round(busy_cpu, 2),
            "sip_cpu_percent_per_call": round((busy_cpu - idle_cpu) / calls, 3),
            "sip_idle_pss_mb": round(idle_pss / 1024, 1), "sip_talk_pss_mb": round(busy_pss / 1024, 1),
            "sip_pss_mb_per_call": round((busy_pss - idle_pss) / 1024 / calls, 3)}


def run(levels: tuple[int, ...] = LEVELS, talk_calls: int = TALK_CALLS, window_s: float = TALK_WINDOW_S,
        speed: float = SERVER_SPEED) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="realtalk-bench-sip-") as tmp:
        eng = SipEngine(Path(tmp), speed)
        try:
            out: dict[str, Any] = {"sip_server_speed": speed}
            for n in levels:
                out.update(asyncio.run(level(eng, n)))
            out.update(asyncio.run(talking(eng, talk_calls, window_s)))
            return out
        finally:
            eng.close()


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
