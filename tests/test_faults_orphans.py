"""A supervisor that dies (SIGKILL) takes its children with it; what it left in the runtime
directory is cleaned by the next `engine start`; `engine stop` on a stale file kills nothing
it did not start."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine.supervisor.process import proc_start_ticks

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_children_die_with_a_killed_supervisor_and_the_next_start_cleans_up(start_engine: Any) -> None:
    eng = start_engine("--text-only")
    conn = eng.conn
    children = [(c["name"], c["pid"]) for c in conn["children"]]
    assert {n for n, _ in children} >= {"broker", "server", "realtime", "playback"}
    rings = list(conn["ring_names"].values())
    assert rings and all((Path("/dev/shm") / r).exists() for r in rings)
    os.kill(eng.proc.pid, signal.SIGKILL)
    eng.proc.wait(5)
    killed_at = time.monotonic()
    alive = children
    while alive and time.monotonic() - killed_at < 1.0:
        alive = [(n, p) for n, p in alive if proc_start_ticks(p) is not None]
        time.sleep(0.02)   # polling /proc: they are not our children, no event says they ended
    assert not alive, f"children still running 1 s after the supervisor died: {alive}"
    # the stale runtime directory: engine.json, rings and sockets of a dead engine
    assert (eng.runtime / "engine.json").exists()
    status = eng.cli("status")
    assert status.returncode != 0 and "not running" in status.stderr, status.stdout + status.stderr
    second = start_engine("--text-only")
    assert any("cleaned the runtime directory" in line for line in second.lines), second.lines
    assert not [r for r in rings if (Path("/dev/shm") / r).exists()]
    assert second.conn["pid"] == second.proc.pid
    assert second.stop() == 0


@pytest.mark.parametrize("with_identity", [True, False])
def test_stop_with_a_stale_file_never_kills_an_unrelated_process(runtime_dir: Path, with_identity: bool) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        stale: dict[str, Any] = {"pid": bystander.pid, "publish": f"ipc://{runtime_dir}/bus-publish.sock",
                                 "subscribe": f"ipc://{runtime_dir}/bus-subscribe.sock", "state": "ready",
                                 "backend": "local", "model": "gpt-realtime", "children": []}
        if with_identity:   # the pid was reused: its start time is not the recorded one
            ticks = proc_start_ticks(bystander.pid)
            assert ticks is not None
            stale["pid_start_ticks"] = ticks - 1
            stale["children"] = [{"name": "realtime", "pid": bystander.pid, "start_ticks": ticks - 1}]
        (runtime_dir / "engine.json").write_text(json.dumps(stale))
        (runtime_dir / "engine.json").chmod(0o600)   # the user's own private file, as the engine writes it
        out = subprocess.run([sys.executable, "-m", "engine.api.cli", "stop"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "not running" in out.stdout
        assert bystander.poll() is None, "engine stop killed a process it did not start"
        assert not (runtime_dir / "engine.json").exists()
    finally:
        bystander.kill()
        bystander.wait()
