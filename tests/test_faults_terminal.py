"""What the user reads: `engine start` prints each error on its terminal as it happens (a
connection failure, a bad command), with its message, and `engine tail` shows the conversation
(the reply's words, the error with its message) and not the firehose."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.supervisor.rundir import free_port
from tests.helpers import ProcessLines

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_a_connection_failure_is_printed_on_the_terminal(runtime_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "dead.yaml"
    cfg.write_text(f"backend: openai\nopenai_url: ws://127.0.0.1:{free_port()}/v1/realtime\n")
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-terminal"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--config", str(cfg), "--text-only"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    out = ProcessLines(proc)
    started = time.monotonic()
    try:
        # at the first start an unreachable backend is fatal at once (issue 23 part 7): the stop's cause
        line = out.wait_for(lambda s: s.startswith("realtalk: stopped: socket:"), 15)
        assert time.monotonic() - started < 10
        assert "connect" in line.lower() and "refused" in line.lower(), line
        assert "\r" not in "".join(out.lines) and "\x1b" not in "".join(out.lines)   # no live line off a TTY
    finally:
        out.stop()


def test_tail_shows_the_reply_and_an_error_and_start_prints_the_error(runtime_dir: Path, tmp_path: Path) -> None:
    eng = ProcessLines(subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--text-only"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
                                 cwd=str(tmp_path)))
    tail: ProcessLines | None = None
    try:
        eng.wait_for(lambda s: "ready in" in s, 30)
        conn = json.loads((runtime_dir / "engine.json").read_text())
        tail = ProcessLines(subprocess.Popen([sys.executable, "-m", "engine.api.cli", "tail", "--seconds", "40"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=os.environ.copy()))
        # the broker hands a new subscriber the last engine.status: the tail is subscribed once it shows
        tail.wait_for(lambda s: s.endswith("engine  ready"), 15)
        said = subprocess.run([sys.executable, "-m", "engine.api.cli", "say", "Hello there, how are you?"],
                              capture_output=True, text=True, timeout=30, env=os.environ.copy())
        assert said.returncode == 0, said.stderr
        reply = tail.wait_for(lambda s: " model " in s, 15)
        assert "You said: Hello there, how are you" in reply, reply
        tail.wait_for(lambda s: " user " in s and "Hello there, how are you?" in s and "said by cli:" in s, 5)
        tail.wait_for(lambda s: " turn " in s and "cost $" in s, 5)
        from bus import Publisher
        pub = Publisher(conn["publish"], "test-terminal")
        assert pub.join(conn["subscribe"], timeout_s=10)
        pub.publish("cmd.bogus", {"id": "bogus-1"})   # the broker's intake refuses a bad command
        pub.close()
        err = tail.wait_for(lambda s: " error " in s, 15)
        assert "command bogus-1 refused: unknown command 'cmd.bogus'" in err, err
        # no firehose in the default view: no status heartbeats, deltas, positions or levels
        text = "\n".join(tail.lines)
        for noise in ("model.text.delta", "engine.status", "capture.levels", "playout.position", "conversation.history"):
            assert noise not in text, text
        assert sum(1 for s in tail.lines if s.rstrip("\n").endswith("engine  ready")) == 1, text
    finally:
        if tail is not None:
            tail.stop()
        code = eng.stop()   # a clean stop, as Ctrl-C
    assert code == 0, "".join(eng.lines)
    assert not any("\r" in s or "\x1b" in s for s in eng.lines)   # the live line is for a TTY only


def test_on_a_tty_start_draws_the_live_line(runtime_dir: Path, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--text-only"],
                            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=os.environ.copy(),
                            cwd=str(tmp_path))
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"\r\x1b[Kspeaking: nobody | mic" not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, seen.decode(errors="replace")
            try:
                seen += os.read(master, 4096)
            except OSError:   # the engine closed the terminal: it exited
                raise AssertionError(seen.decode(errors="replace")) from None
        assert b"ready in" in seen.split(b"\r\x1b[K")[0]   # drawn once the engine is ready
    finally:
        proc.send_signal(2)
        proc.wait(15)
        os.close(master)
