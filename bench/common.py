"""What the benchmarks share: pacing, percentiles, starting and stopping an engine, CPU windows,
the virtual audio devices. Every bench module imports from here; none imports bench.run (the
dispatcher), so bench/ has no import circle."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def paced(count: int, hz: float):
    """Yield ``count`` times, ``hz`` times a second, on a fixed schedule (no drift)."""
    period = 1.0 / hz
    t = time.monotonic()
    for _ in range(count):
        t += period
        while time.monotonic() < t:
            time.sleep(max(0.0, t - time.monotonic() - 0.0002))
        yield


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q / 100 * len(v)))]


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total


def cpu_ticks() -> tuple[int, int]:
    """(steal, all) CPU time of the whole machine so far, in clock ticks (``/proc/stat``'s cpu line):
    steal is the time the hypervisor ran someone else while this machine had work."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return fields[7], sum(fields)


def steal_percent_since(start: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time stolen by the hypervisor since ``start`` (``cpu_ticks()``),
    in %; a tail figure of a few ms moves with it (bench/README.md)."""
    steal, total = cpu_ticks()
    return round(100 * (steal - start[0]) / (total - start[1]), 1) if total > start[1] else None


def start_engine(args: list[str], env: dict[str, str], timeout_s: float = 60) -> tuple[subprocess.Popen, float, int]:
    """Exec ``engine start ARGS``; (the process, ms from the exec until "ready in" on its stdout,
    the supervisor's own "ready in" figure). Raises RuntimeError if it exits or times out first."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", *args],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    deadline = t0 + timeout_s
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"ready in (\d+) ms", line)
        if m:
            outside = (time.monotonic() - t0) * 1000
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, outside, int(m.group(1))
    proc.kill()
    proc.wait()
    raise RuntimeError(f"engine start {' '.join(args)} was not ready within {timeout_s} s")


def stop_engine(proc: subprocess.Popen) -> None:
    proc.send_signal(2)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def local_server(scenario: Path) -> Iterator[str]:
    """`engine serve` (the local server alone, no recogniser) with ``scenario`` on a free port, once
    it listens: its base URL (``ws://127.0.0.1:PORT/v1``, what the SDK baselines connect to). Killed
    at the end."""
    from engine.supervisor.rundir import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "serve", "--port", str(port), "--scenario",
                               str(scenario), "--no-asr"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=str(REPO))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"ws://127.0.0.1:{port}/v1"
    finally:
        server.kill()
        server.wait()


def played_channel(record_dir: Path) -> np.ndarray:
    """What playback handed to the device in a session recorded under ``record_dir`` (``record:``):
    the right channel of its conversation.wav."""
    path = next(record_dir.glob("*/conversation.wav"))
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.reshape(-1, 2)[:, 1].copy()


def cpu_window(proc: subprocess.Popen, conn: dict[str, Any], seconds: float,
                also: dict[str, int] | None = None) -> tuple[dict[str, float], float, float]:
    """% of one core of each engine process (and of each of ``also``, name -> pid, in the same
    window) over ``seconds``; (by name, window start, window end) in monotonic seconds."""
    names = {c["pid"]: c["name"] for c in conn["children"] if c["name"] != "server"}   # the server stands in for OpenAI
    names[proc.pid] = "supervisor"
    names.update({pid: name for name, pid in (also or {}).items()})
    t0 = time.monotonic()
    before = {p: cpu_ns(p) for p in names}
    time.sleep(seconds)
    t1 = time.monotonic()
    by_process = {names[p]: round(100 * (cpu_ns(p) - before[p]) / 1e9 / (t1 - t0), 2) for p in names}
    return by_process, t0, t1


def vaudio(*args: str) -> str:
    """Run ``tools/vaudio.sh ARGS``; its output."""
    return subprocess.run(["bash", str(REPO / "tools" / "vaudio.sh"), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def vaudio_env() -> dict[str, str]:
    out = vaudio("start")
    env = dict(part.split("=", 1) for part in out.strip().split()[1:])
    os.environ.update(env)
    return env


class BusLog:
    """A bench engine's bus, logged: ``self.sub`` (a :class:`bus.Subscriber`) and ``self.log``
    (every message received, in order) are set by the class that mixes this in."""

    sub: Any
    log: list[tuple[str, dict[str, Any]]]

    def wait(self, topic: str, timeout: float = 20, where: Callable[[dict[str, Any]], bool] | None = None,
             since: int | None = None) -> dict[str, Any]:
        """The first ``topic`` message (logged from index ``since``, else from now) ``where`` accepts."""
        if since is not None:
            for t, b in self.log[since:]:
                if t == topic and (where is None or where(b)):
                    return b
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self.sub.recv(timeout_ms=100)
            if msg is None:
                continue
            self.log.append(msg)
            if msg[0] == topic and (where is None or where(msg[1])):
                return msg[1]
        raise TimeoutError(f"no {topic} within {timeout} s")

    def pump(self, seconds: float) -> None:
        """Log what comes for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = self.sub.recv(timeout_ms=50)
            if msg is not None:
                self.log.append(msg)
