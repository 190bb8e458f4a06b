"""Connection failures the realtime process publishes (engine.error, source socket) are on the
engine's terminal at once, with their message."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.supervisor.process import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_a_connection_failure_is_printed_on_the_terminal(runtime_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "dead.yaml"
    cfg.write_text(f"backend: openai\nopenai_url: ws://127.0.0.1:{free_port()}/v1/realtime\n")
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-terminal"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--config", str(cfg), "--text-only"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    lines: list[str] = []
    printed = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "socket error" in line:
                printed.set()
    t = threading.Thread(target=read, daemon=True)
    t.start()
    started = time.monotonic()
    try:
        assert printed.wait(15), "".join(lines)
        assert time.monotonic() - started < 10
        line = next(line for line in lines if "socket error" in line)
        assert "connect" in line.lower() and "refused" in line.lower(), line
    finally:
        proc.terminate()
        proc.wait(15)
        t.join(2)
