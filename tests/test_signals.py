"""Signals to the engine: a terminal's Ctrl-C or hang-up stops it in order, never its children
one by one (the reliability review: the children shared the terminal's process group, so Ctrl-C
reached every one at once and the broker left first; SIGHUP killed the supervisor with no clean-up)."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_a_terminals_ctrl_c_reaches_only_the_supervisor(start_engine: Any) -> None:
    eng = start_engine("--text-only")
    supervisor_group = os.getpgid(eng.proc.pid)
    children = [c for c in eng.conn["children"] if c.get("pid")]
    assert children
    for c in children:   # each in its own session: the terminal's signals go to the foreground group only
        assert os.getpgid(c["pid"]) != supervisor_group, c["name"]


def test_a_hang_up_stops_the_engine_in_order_and_cleans_up(start_engine: Any, runtime_dir: Path) -> None:
    eng = start_engine("--text-only")
    rings = list(eng.conn["ring_names"].values())
    eng.proc.send_signal(signal.SIGHUP)
    assert eng.proc.wait(30) == 0
    assert not (runtime_dir / "engine.json").exists()
    assert not [r for r in rings if Path("/dev/shm", r).exists()]


def test_a_hang_up_whose_terminal_is_gone_still_cleans_up(runtime_dir: Path, tmp_path: Path) -> None:
    """A closed terminal answers every write with EIO: the stop raised on its first write (taking
    the live line off the screen) and left the rings, sockets and engine.json behind (the review)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--text-only"],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=os.environ.copy(),
                            cwd=str(tmp_path), start_new_session=True)
    os.close(slave)
    try:
        seen, deadline = b"", time.monotonic() + 30
        while b"ready in" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, f"not ready: {seen!r}"
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        rings = list(json.loads((runtime_dir / "engine.json").read_text())["ring_names"].values())
        seen = seen[seen.index(b"ready in"):]
        while b"\x1b[K" not in seen:     # the live line is drawn (a TTY only): the stop must take it off
            assert time.monotonic() < deadline + 10 and proc.poll() is None, f"no live line: {seen!r}"
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        os.close(master)                                      # the terminal is gone
        master = -1
        proc.send_signal(signal.SIGHUP)
        proc.wait(30)
        assert not (runtime_dir / "engine.json").exists()
        assert not [r for r in rings if Path("/dev/shm", r).exists()]
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
