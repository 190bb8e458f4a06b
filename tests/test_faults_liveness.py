"""Liveness: a child that stops answering is reported and restarted; mic audio dropped while its
reader stalls is counted and published."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bus import Subscriber
from engine.supervisor.watch import DropWatch
from tests.helpers import wait_topic, write_wav

pytestmark = pytest.mark.timeout(90)


def _pid(conn: dict[str, Any], name: str) -> int:
    return next(c["pid"] for c in conn["children"] if c["name"] == name)


def _engine(start_engine: Any, tmp_path: Path, timeout_s: str) -> Any:
    config = tmp_path / "liveness.yaml"
    config.write_text(f"supervisor:\n  heartbeat_timeout_s: {timeout_s}\n")
    mic = write_wav(tmp_path / "quiet.wav", np.zeros(2400, dtype=np.int16))   # then silence, every 20 ms
    return start_engine("--config", str(config), "--mic", str(mic), "--speaker", "null")


@pytest.mark.e2e
def test_a_stopped_child_is_reported_by_name_killed_and_restarted(start_engine: Any, tmp_path: Path) -> None:
    """Issue 23 point 5: with the realtime child stopped (SIGSTOP) for 5 s, nothing reported the hang."""
    eng = _engine(start_engine, tmp_path, "1.5")
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["engine.error", "engine.status"])
    realtime = _pid(conn, "realtime")
    os.kill(realtime, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        hung = wait_topic(sub, "engine.error", 15, code="child_unresponsive")
        found_after_s = time.monotonic() - stopped_at
        assert hung["child"] == "realtime" and hung["source"] == "supervisor", hung
        assert "realtime" in hung["message"] and hung["silent_ms"] >= 1500, hung
        restarted = wait_topic(sub, "engine.error", 15, code="child_exited", child="realtime")
        assert restarted["exit_code"] == -signal.SIGKILL and "restarting" in restarted["message"], restarted
    finally:
        try:
            os.kill(realtime, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # the new realtime process is connected again and answers
    wait_topic(sub, "engine.status", 20, state="connected")
    said = eng.cli("say", "--no-respond", "are you back?")
    assert said.returncode == 0, said.stderr
    status = eng.cli("status", "--json")
    child = next(c for c in __import__("json").loads(status.stdout)["children"] if c["name"] == "realtime")
    assert child["restarts"] == 1 and child["unresponsive"] == 1 and child["pid"] != realtime, child
    assert any("realtime" in line and "did not answer" in line for line in eng.lines), "".join(eng.lines)
    print(f"realtime stopped: reported after {found_after_s:.2f} s (timeout 1.5 s)")
    assert eng.stop() == 0


@pytest.mark.e2e
def test_mic_audio_dropped_while_its_reader_stalls_is_counted_and_published(start_engine: Any,
                                                                            tmp_path: Path) -> None:
    """Issue 23 point 5: 2.3 s of mic audio was dropped without a report (the ring counted it)."""
    eng = _engine(start_engine, tmp_path, "null")
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["engine.error"])
    realtime = _pid(conn, "realtime")
    os.kill(realtime, signal.SIGSTOP)    # the mic ring holds 2.7 s; the rest of the stall is dropped
    time.sleep(4.0)                      # the stall itself
    os.kill(realtime, signal.SIGCONT)
    dropped = wait_topic(sub, "engine.error", 10, code="mic_dropped")
    assert dropped["ring"] == "mic" and dropped["source"] == "supervisor", dropped
    assert 500 <= dropped["dropped_ms"] <= 1600, dropped     # 4 s stalled, 2.7 s held
    assert dropped["dropped_ms"] == dropped["dropped_frames"] // 24, dropped
    assert dropped["dropped_frames_total"] >= dropped["dropped_frames"], dropped   # (the ring's count since its start)
    assert "realtime" in dropped["message"]
    with pytest.raises(AssertionError):                       # one report for the one stall
        wait_topic(sub, "engine.error", 2.5, code="mic_dropped")
    assert eng.stop() == 0


def test_drop_watch_reports_an_episode_once_when_it_ends() -> None:
    w = DropWatch(every_s=5.0)
    assert w.update(0, 0.0) is None
    assert w.update(480, 1.0) is None and w.update(960, 1.25) is None   # still growing
    assert w.update(960, 1.5) == 960                                     # stopped growing: one report
    assert w.update(960, 2.0) is None
    reports = []                                                         # a long stall: one every 5 s
    for i in range(1, 31):
        got = w.update(960 + 480 * i, 3.0 + i * 0.25)
        if got is not None:
            reports.append((3.0 + i * 0.25, got))
    assert len(reports) == 1 and reports[0][0] >= 8.25, reports
    last = w.update(960 + 480 * 30, 11.0)                                # it ends: the rest
    assert last is not None and reports[0][1] + last == 480 * 30


@pytest.mark.e2e
def test_native_code_holding_the_interpreter_lock_is_alive_and_a_stopped_process_is_not(tmp_path: Path) -> None:
    """The local server's recogniser holds the interpreter lock for seconds while it decodes a long
    utterance: its beating thread waits, but the process works. A SIGSTOPped one does neither."""
    import subprocess
    import sys
    from engine.supervisor.heartbeat import HeartbeatPipe, cpu_ticks, period_for
    (tmp_path / "busy_child.py").write_text(
        "import re, time\n"
        "time.sleep(0.5)\n"
        "re.match(r'(a|aa)*b', 'a' * 35)   # backtracking in C: the interpreter lock held for seconds\n"
        "time.sleep(60)\n")
    pipe = HeartbeatPipe(period_for(1.0))
    env = {**os.environ, **pipe.environment(), "PYTHONPATH": f"{tmp_path}:{os.getcwd()}"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.supervisor.heartbeat", "busy_child"],
                            pass_fds=(pipe.child_fd,), env=env, cwd=os.getcwd())
    pipe.child_started()
    try:
        beat_at = proof_at = time.monotonic()
        beats_gap = proof_gap = 0.0
        last_ticks = None
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            time.sleep(0.1)   # sampling beats and CPU over 6 s: the gaps between them are what is measured
            now = time.monotonic()
            beat = pipe.beats() > 0
            ticks = cpu_ticks(proc.pid)
            ran = ticks is not None and last_ticks is not None and ticks > last_ticks
            last_ticks = ticks
            if beat:
                beat_at = now
            if beat or ran:
                proof_at = now
            beats_gap, proof_gap = max(beats_gap, now - beat_at), max(proof_gap, now - proof_at)
        assert beats_gap > 1.0, f"the child never held the lock long (beats stopped {beats_gap:.2f} s at most)"
        assert proof_gap < 0.5, f"{proof_gap:.2f} s without a beat or CPU while it worked"
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.3)                      # (a stopped process sends nothing: only time tells)
        pipe.alive(proc.pid)                 # what came before the stop
        time.sleep(0.6)                      # longer than a beat's period: the test is that none comes
        assert not pipe.alive(proc.pid)      # stopped: no beat, no CPU
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.6)                      # (a beat's period: alive() reads what came meanwhile)
        assert pipe.alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
        pipe.close()
