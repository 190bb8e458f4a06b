"""The supervisor's own guarantees: nothing leaks when start() fails half-way; child states
in `engine status`; a device failure stops the engine with the child's message."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import load_config
from engine.supervisor.process import Supervisor, proc_start_ticks
from tests.helpers import wait_topic, write_wav

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_start_that_fails_late_leaves_nothing_behind(runtime_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    mic = write_wav(tmp_path / "mic.wav", np.zeros(2400, dtype=np.int16))   # a mic ring and a ref ring too
    cfg = load_config(None, {"backend": "local", "sessions_dir": str(tmp_path / "sessions"), "audio.mic": str(mic),
                             "audio.speaker": "null"})
    sup = Supervisor(cfg, text_only=False, out=io.StringIO())
    spawned: list[subprocess.Popen[bytes]] = []
    real_spawn = Supervisor._spawn

    def spawn_then_fail(self: Supervisor, child: Any) -> None:
        real_spawn(self, child)
        assert child.proc is not None
        spawned.append(child.proc)
        if child.name == "realtime":   # after the broker, the server and capture are up
            raise OSError("a late step failed (test)")
    monkeypatch.setattr(Supervisor, "_spawn", spawn_then_fail)
    with pytest.raises(OSError, match="late step"):
        sup.start()
    assert len(spawned) >= 3
    for proc in spawned:
        assert proc.poll() is not None, f"child pid {proc.pid} still runs"
        assert proc_start_ticks(proc.pid) is None
    assert sup.rings and not [r.name for r in sup.rings if (Path("/dev/shm") / r.name).exists()]
    assert not list(runtime_dir.glob("*.sock"))
    assert not (runtime_dir / "engine.json").exists()
    assert sup.listener is not None and sup.listener.fileno() == -1   # the local server's port is closed


def test_status_shows_each_childs_state(start_engine: Any) -> None:
    eng = start_engine("--text-only")
    first = json.loads(eng.cli("status", "--json").stdout)
    states = {c["name"]: c["state"] for c in first["children"]}
    assert set(states.values()) <= {"starting", "running"}
    from bus import Subscriber
    sub = Subscriber(eng.conn["subscribe"], ["engine.status"])   # the supervisor's, every second
    wait_topic(sub, "engine.status", 10, where=lambda b: str(b.get("pub")).startswith("supervisor") and bool(
        b.get("children")) and all(c["state"] == "running" for c in b["children"]))   # after startsecs (1 s) up
    sub.close()
    status = json.loads(eng.cli("status", "--json").stdout)
    assert all(c["state"] == "running" and c["uptime_s"] >= 1.0 and c["restarts"] == 0
               for c in status["children"]), status["children"]
    text = eng.cli("status").stdout
    assert "realtime" in text and "running" in text


def test_device_failure_is_fatal_with_the_childs_message(runtime_dir: Path, tmp_path: Path) -> None:
    # what only the child finds (a corrupt WAV or a missing device is refused before any child
    # starts, tests/test_faults_input.py): a speaker file that is a link into a folder that is gone
    speaker = tmp_path / "out.wav"
    speaker.symlink_to(tmp_path / "gone" / "out.wav")
    out = subprocess.run([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--mic", "null",
                          "--speaker", str(speaker)], capture_output=True, text=True, timeout=45,
                         cwd=str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    last = [line for line in out.stdout.splitlines() if "stopped:" in line]
    assert last, out.stdout
    assert "playback" in last[0] and str(speaker) in last[0], last[0]   # names the child and the file
    assert "Traceback" not in out.stderr, out.stderr
    assert not (runtime_dir / "engine.json").exists()


def test_speaker_file_in_a_missing_folder_is_a_clear_error(runtime_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "folder" / "out.wav"
    out = subprocess.run([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--mic", "null",
                          "--speaker", str(target)], capture_output=True, text=True, timeout=45, cwd=str(tmp_path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert str(target.parent) in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (runtime_dir / "engine.json").exists() and not list(runtime_dir.glob("*.sock"))
