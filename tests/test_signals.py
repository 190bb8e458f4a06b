"""Signals to the engine: a terminal's Ctrl-C or hang-up stops it in order, never its children
one by one (the reliability review: the children shared the terminal's process group, so Ctrl-C
reached every one at once and the broker left first; SIGHUP killed the supervisor with no clean-up)."""
from __future__ import annotations

import os
import signal
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
