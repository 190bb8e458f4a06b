"""`engine serve` as a process: a busy port fails at once with a clear message, and
SIGTERM/SIGINT stop it promptly (issue 15 point 13)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.timeout(60)


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "engine.api.cli", "serve", "--no-asr", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def _ready_url(proc: subprocess.Popen[str]) -> str:
    """The ws:// URL from the server's 'listening on' line (blocks until it is printed)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
    return line.split("listening on ")[1].split("?")[0]


def _once_it_handles_sigterm(proc: subprocess.Popen[str], timeout_s: float = 15) -> bool:
    """True once the process has its SIGTERM handler (``SigCgt`` in /proc: the server sets it first
    thing in its start-up), False if it exited before."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:   # it is gone (poll() will say so)
            continue
        caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
        if caught >> (signal.SIGTERM - 1) & 1:
            return True
        assert time.monotonic() < deadline, f"engine serve set no SIGTERM handler within {timeout_s} s"
        time.sleep(0.0002)   # polling /proc (no event says a handler is set), often: the busy port's window is short
    return False


def _ended(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """Its stderr once it has exited within ``timeout_s`` of the signal, without a traceback; the
    test fails (and the process is killed) if it did not."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"engine serve did not stop within {timeout_s} s of SIGTERM; stderr: {err[-2000:]}")
    assert "Traceback" not in err, err
    return err


@pytest.mark.e2e
def test_busy_port_exits_at_once_naming_the_port(busy_port: int) -> None:
    t0 = time.monotonic()
    proc = _serve("--port", str(busy_port))
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"engine serve --port {busy_port} (in use) did not exit")
    assert proc.returncode not in (0, None)
    assert time.monotonic() - t0 < 10
    assert str(busy_port) in err and "already in use" in err and "--port 0" in err, err
    assert "Traceback" not in err, err


@pytest.mark.e2e
def test_busy_port_with_sigterm_before_exit_never_hangs(busy_port: int) -> None:
    """Even a SIGTERM racing the failed bind ends the process."""
    raced = 0
    for _ in range(5):   # the window between the handler and the failed bind is short: until one lands in it
        proc = _serve("--port", str(busy_port))
        if _once_it_handles_sigterm(proc):   # the signal races the bind, which fails at once
            proc.send_signal(signal.SIGTERM)
            raced += 1
        err = _ended(proc, 15)
        # stopped by its handler (or by the signal once it was stopping), or it failed the bind first and
        # said so; never a crash, never a traceback
        assert proc.returncode in (0, 2, -signal.SIGTERM), (proc.returncode, err)
        assert proc.returncode != 2 or "already in use" in err, err
        if raced:
            break
    assert raced, "the process always exited before its SIGTERM handler could be seen: nothing raced"


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_serving_server_mid_response(sig: int) -> None:
    import websocket
    proc = _serve("--port", "0", "--speed", "1")
    try:
        url = _ready_url(proc)
        ws = websocket.create_connection(url + "?model=gpt-realtime", timeout=10)
        assert json.loads(ws.recv())["type"] == "session.created"
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "say something long enough to still be speaking " * 3}]}}))
        ws.send(json.dumps({"type": "response.create"}))
        while json.loads(ws.recv())["type"] != "response.output_audio.delta":
            pass
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 3.0
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        ws.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.e2e
def test_signal_during_start_up_stops_it() -> None:
    proc = _serve("--port", "0")
    # in its own start-up (binding, warming the voice): before that, the signal's default action stops it
    _once_it_handles_sigterm(proc)
    proc.send_signal(signal.SIGTERM)
    err = _ended(proc, 10)
    assert proc.returncode == 0, (proc.returncode, err)   # by its handler, cleanly
