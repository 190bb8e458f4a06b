"""What the engine believes on a shared machine (bus/runtime.py, engine/audio/ring.py): the runtime
directory, the connection file and the rings are used only when they are this user's own and
private; a process named in a connection file is signalled only when it is provably this user's
engine process. The same rules against a real second account: tests/test_other_user.py."""
from __future__ import annotations

import io
import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bus.runtime import (GONE, RUNNING, UNPROVEN, NoEngine, TrustError, engine_state, proc_exe, proc_start_ticks,
                         read_connection, read_private_json, runtime_dir, running_engine, write_private_file)
from engine.audio.ring import Ring, RingError, new_ring_name
from engine.errors import EngineError

pytestmark = pytest.mark.timeout(30)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("REALTALK_RUNTIME_DIR", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


# ------------------------------------------------------------------ the runtime directory
def test_the_runtime_directory_is_made_new_and_private(env: Path) -> None:
    made = runtime_dir()
    assert made == env / f"realtalk-{os.geteuid()}" and mode(made) == 0o700
    assert runtime_dir() == made   # provably ours: used again


def test_a_runtime_directory_too_open_is_refused_naming_it_and_the_fix(env: Path) -> None:
    loose = env / f"realtalk-{os.geteuid()}"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(TrustError, match=f"{loose}.*0755.*chmod 700 {loose}"):
        runtime_dir()
    assert mode(loose) == 0o755   # never repaired behind the user's back


def test_a_runtime_directory_that_is_a_symbolic_link_is_refused(env: Path) -> None:
    target = env / "elsewhere"
    target.mkdir(mode=0o700)
    (env / f"realtalk-{os.geteuid()}").symlink_to(target)
    with pytest.raises(TrustError, match="symbolic link"):
        runtime_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_runtime_directory_of_another_uid_is_refused(env: Path) -> None:
    theirs = env / f"realtalk-{os.geteuid()}"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(TrustError, match=f"{theirs}.*owned by .*65534.*REALTALK_RUNTIME_DIR"):
        runtime_dir()


def test_a_runtime_directory_below_a_folder_others_may_change_is_refused(env: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    shared = env / "shared"
    shared.mkdir()
    shared.chmod(0o777)   # anyone could rename the directory away and put theirs in its place
    monkeypatch.setenv("REALTALK_RUNTIME_DIR", str(shared / "run"))
    with pytest.raises(TrustError, match=f"the folder {shared} above it has mode 0777"):
        runtime_dir()
    shared.chmod(0o1777)  # sticky, as /tmp: only the owner renames what is in it
    assert runtime_dir() == shared / "run"


def test_xdg_runtime_dir_is_used_only_when_it_is_the_users_own_and_private(env: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = env / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_dir() == xdg / "realtalk" and mode(xdg / "realtalk") == 0o700
    xdg.chmod(0o777)   # not a login manager's: the fallback in $TMPDIR
    assert runtime_dir() == env / f"realtalk-{os.geteuid()}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(env / "missing"))
    assert runtime_dir() == env / f"realtalk-{os.geteuid()}"


def test_the_supervisor_refuses_a_runtime_directory_with_an_engine_error(env: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.config import load_config
    from engine.supervisor.process import Supervisor
    loose = env / "run"
    loose.mkdir()
    loose.chmod(0o775)
    monkeypatch.setenv("REALTALK_RUNTIME_DIR", str(loose))
    # null mic and speaker: the quick loop has no PulseAudio, and the device check comes before this one
    cfg = load_config(None, {"backend": "local", "sessions_dir": str(env / "sessions"), "audio.mic": "null",
                             "audio.speaker": "null"})
    with pytest.raises(EngineError, match=str(loose)):
        Supervisor(cfg, out=io.StringIO())


# ------------------------------------------------------------------ private files
def test_a_private_file_is_written_0600_and_read_back(tmp_path: Path) -> None:
    file = tmp_path / "engine.json"
    write_private_file(file, json.dumps({"pid": 1}))
    assert mode(file) == 0o600 and read_private_json(file) == {"pid": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["engine.json"]   # no temporary file left


def test_a_symbolic_link_is_replaced_by_a_write_and_refused_by_a_read(tmp_path: Path) -> None:
    target = tmp_path / "theirs.json"
    target.write_text("{}")
    link = tmp_path / "engine.json"
    link.symlink_to(target)
    with pytest.raises(TrustError, match=f"{link}.*symbolic link.*rm {link}"):
        read_private_json(link)
    write_private_file(link, "{\"pid\": 2}")
    assert not link.is_symlink() and target.read_text() == "{}"


def test_a_file_too_open_is_not_believed(tmp_path: Path) -> None:
    file = tmp_path / "engine.json"
    file.write_text("{}")
    file.chmod(0o644)
    with pytest.raises(TrustError, match="0644"):
        read_connection(file)
    with pytest.raises(NoEngine, match="does not exist"):
        read_connection(tmp_path / "none.json")


# ------------------------------------------------------------------ processes named in a connection file
@pytest.fixture
def sleepers() -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """A process of this user's on this interpreter (an engine child could be it) and a `sleep`."""
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
    other = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        yield ours, other
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def _conn(pid: int, exe: str | None, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> dict[str, object]:
    return {"pid": pid, "pid_start_ticks": proc_start_ticks(pid) or 1, "exe": exe,
            "publish": f"ipc://{tmp_path}/bus-publish.sock", "subscribe": f"ipc://{tmp_path}/bus-subscribe.sock",
            "children": [{"name": f"c{i}", "pid": c.pid, "start_ticks": proc_start_ticks(c.pid)}
                         for i, c in enumerate(children)]}


@pytest.mark.e2e
def test_engine_state_running_gone_or_unproven(tmp_path: Path, sleepers: tuple[subprocess.Popen[bytes], ...]) -> None:
    ours, other = sleepers
    me = proc_exe("self")
    assert engine_state(_conn(os.getpid(), me, tmp_path, [])) == RUNNING
    assert engine_state(_conn(other.pid, proc_exe(other.pid), tmp_path, [])) == UNPROVEN   # `sleep`: no engine
    assert engine_state(_conn(ours.pid, "/usr/bin/python-of-someone-else", tmp_path, [])) == UNPROVEN
    assert engine_state({**_conn(ours.pid, me, tmp_path, []), "pid_start_ticks": 1}) == GONE   # a reused pid
    assert engine_state({"pid": os.getpid()}) == GONE   # without identities (an old file): stale, signals nothing
    file = tmp_path / "engine.json"
    write_private_file(file, json.dumps(_conn(other.pid, proc_exe(other.pid), tmp_path, [])))
    with pytest.raises(TrustError, match=f"{file}.*pid {other.pid}.*not provably your engine"):
        running_engine(file)


@pytest.mark.e2e
def test_stale_cleanup_kills_only_provable_engine_children(tmp_path: Path,
                                                           sleepers: tuple[subprocess.Popen[bytes], ...]) -> None:
    from engine.supervisor.rundir import clean_stale
    ours, other = sleepers
    gone = subprocess.Popen(["true"])
    gone.wait()
    file = tmp_path / "engine.json"
    # `sleep` recorded under its own executable: not this interpreter, not an engine child
    write_private_file(file, json.dumps(_conn(gone.pid, proc_exe(other.pid), tmp_path, [ours, other])))
    assert clean_stale(read_connection(file), file) == [] and not file.exists()
    assert ours.poll() is None and other.poll() is None
    # recorded under this interpreter: the orphan on it is killed, the `sleep` is not
    write_private_file(file, json.dumps(_conn(gone.pid, proc_exe("self"), tmp_path, [ours, other])))
    done = clean_stale(read_connection(file), file)
    assert done == [f"killed orphan c0 (pid {ours.pid})"]
    assert ours.wait(5) == -9 and other.poll() is None


# ------------------------------------------------------------------ rings
@pytest.fixture
def ring_name() -> Iterator[str]:
    name = new_ring_name("realtalk-test")
    yield name
    Path("/dev/shm", name).unlink(missing_ok=True)


def test_ring_names_are_random(ring_name: str) -> None:
    names = {new_ring_name() for _ in range(100)}
    assert len(names) == 100 and all(len(n) == len("realtalk-") + 32 for n in names)


def test_a_ring_is_made_new_and_private(ring_name: str) -> None:
    ring = Ring.create(ring_name, 1024, with_eventfd=False)
    assert mode(Path("/dev/shm", ring_name)) == 0o600
    with pytest.raises(RingError, match=f"{ring_name} already exists"):
        Ring.create(ring_name, 1024, with_eventfd=False)
    Ring.attach(ring_name).close()
    ring.unlink()
    ring.close()


def test_a_ring_too_open_or_a_link_is_not_attached(ring_name: str, tmp_path: Path) -> None:
    ring = Ring.create(ring_name, 1024, with_eventfd=False)
    path = Path("/dev/shm", ring_name)
    path.chmod(0o666)
    with pytest.raises(RingError, match=f"{ring_name} has mode 0666"):
        Ring.attach(ring_name)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        path.chmod(0o600)
        with pytest.raises(RingError, match=f"{ring_name} belongs to uid 65534"):
            Ring.attach(ring_name)
        os.chown(path, os.geteuid(), os.getegid())
    link = f"realtalk-test-link-{secrets.token_hex(4)}"
    Path("/dev/shm", link).symlink_to(path)
    try:
        with pytest.raises(RingError, match=link):
            Ring.attach(link)
        with pytest.raises(RingError, match=link):
            Ring.create(link, 1024, with_eventfd=False)
    finally:
        Path("/dev/shm", link).unlink()
    ring.unlink()
    ring.close()


def test_a_folder_writable_by_the_users_own_private_group_is_trusted(tmp_path: Path) -> None:
    """With a umask of 002 and a group per user (Debian's and Ubuntu's way) home folders are 0775:
    the default sessions folder was refused under them (the review of the session-folder check)."""
    from bus.runtime import _private_group, check_ancestors
    if not _private_group(os.getegid()):
        pytest.skip("this user's group is shared with others here")
    base = tmp_path / "home"
    base.mkdir()
    os.chown(base, os.geteuid(), os.getegid())
    os.chmod(base, 0o775)
    check_ancestors(base / "session", "session folder")      # no TrustError
    os.chmod(base, 0o777)
    with pytest.raises(Exception, match="has mode 0777"):
        check_ancestors(base / "session", "session folder")
