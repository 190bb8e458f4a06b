"""A full disk under the sessions folder ends the session cleanly: what was written is kept (whole
lines), the rings, sockets and engine.json are cleaned up, and the cause is said (ENOSPC)."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from engine.supervisor import logfile
from engine.supervisor.logfile import SessionLog

pytestmark = pytest.mark.timeout(90)


def _full_after(monkeypatch: pytest.MonkeyPatch, room_bytes: int) -> None:
    """os.write in the log module fills the disk after ``room_bytes`` more bytes (a partial write, then ENOSPC)."""
    real_write = os.write
    room = [room_bytes]

    def write(fd: int, data: Any) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data)[:room[0]])
        room[0] -= n
        return n
    monkeypatch.setattr(logfile.os, "write", write)


def test_a_full_disk_keeps_the_whole_lines_written_and_never_raises(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    log = SessionLog(path)
    log.write('{"n": 1}\n')
    assert log.flush() is None
    _full_after(monkeypatch, 14)                    # room for one line and part of the next
    for n in (2, 3, 4):
        log.write(json.dumps({"n": n}) + "\n")
    err = log.flush()
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and log.error is err
    log.write('{"n": 5}\n')                         # after the failure: counted, not written
    assert log.flush() is None
    log.close()
    log.close()                                     # idempotent
    lines = path.read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2]   # whole lines only: the torn one is cut
    assert log.lost_lines == 3 and path.stat().st_mode & 0o777 == 0o600


def test_the_supervisor_stops_for_a_full_disk_naming_enospc_and_the_log(runtime_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23 point 5: the supervisor crashed in its event-log flush (an OSError out of drain)."""
    from engine.config import load_config
    from engine.supervisor.process import Supervisor
    sup = Supervisor(load_config(None, {"backend": "local", "sessions_dir": str(tmp_path / "s")}), text_only=True,
                     out=io.StringIO())
    sup.log_file = SessionLog(sup.session_dir / "events.jsonl")
    sup._log("x.one", {"ts": 0.0, "mono_ns": 0, "n": 1})
    _full_after(monkeypatch, 0)
    sup._log("x.two", {"ts": 0.0, "mono_ns": 0, "n": 2})
    sup.drain()                                      # no subscriber: only the flush; it must not raise
    assert sup.fatal is not None and "ENOSPC" in sup.fatal and "events.jsonl" in sup.fatal, sup.fatal
    sup.shutdown(quiet=True)                         # still cleans up with the log broken
    assert (sup.session_dir / "events.jsonl").read_text() == ""


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs (we are root), unmounted afterwards."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the unit tests above inject ENOSPC")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.e2e
def test_a_full_sessions_disk_ends_the_session_cleanly(runtime_dir: Path, tmp_path: Path, tiny_disk: Path) -> None:
    config = tmp_path / "disk.yaml"
    config.write_text(f"sessions_dir: {tiny_disk}\n")
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", "--text-only",
                             "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(tmp_path))
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "ready in" in line:
            break
    conn = json.loads((runtime_dir / "engine.json").read_text())
    rings = [Path("/dev/shm") / name for name in conn["ring_names"].values()]   # kind -> random name
    assert rings and all(r.exists() for r in rings)
    fd = os.open(tiny_disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)   # the disk fills up (another program)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=30)         # engine.status every second: the next flush fails
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("the engine did not stop on a full disk:\n" + "".join(lines) + out) from None
    text = "".join(lines) + out
    assert proc.returncode == 1, text
    assert "Traceback" not in text, text
    stopped = [line for line in text.splitlines() if line.startswith("realtalk: stopped: ")]
    assert stopped and "ENOSPC" in stopped[0] and "events.jsonl" in stopped[0], text
    assert not (runtime_dir / "engine.json").exists() and not list(runtime_dir.glob("*.sock"))
    assert not [r for r in rings if r.exists()]
    log = Path(conn["session_dir"]) / "events.jsonl"
    kept = [json.loads(line) for line in log.read_text().splitlines()]   # whole lines, every one
    assert any(e["topic"] == "engine.status" for e in kept)
    print(f"stopped {time.monotonic() - t0:.2f} s after the disk filled; {len(kept)} events kept")
