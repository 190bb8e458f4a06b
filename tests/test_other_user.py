"""Another local user gets nothing (issue 23): the attacks of a second, unprivileged account,
run as that account, against an engine of the test's own user.

* Rings: the account pre-creates the ring names of old (``realtalk-PID-KIND`` for the next
  few hundred pids, mode 0666); the engine's rings are none of them, are random, belong to
  the engine's user with mode 0600, and the account can open none of them. A ring name the
  account made first is refused by ``Ring.create`` (exclusive) and by ``Ring.attach`` (owner).
* The runtime directory: one the account made first (as ``$REALTALK_RUNTIME_DIR`` or as the
  default ``$TMPDIR/realtalk-UID``) is refused with an error naming it and the fix, no
  traceback; an ``$XDG_RUNTIME_DIR`` of the account's is not used.
* A forged ``engine.json``: in the account's directory, in the user's own directory but owned
  by the account, a symbolic link, too open, or naming processes that are not the user's
  engine: not trusted, ``engine say`` delivers nothing to the bus it names, and no process
  named in it is signalled.
* Reading the user's rings, bus sockets, connection file and runtime directory: denied.

Needs root (CI runs as root): the test creates the account with ``useradd`` and removes it
at the end, also when a test fails.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import RunningEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

RING_KINDS = ("mic", "speaker", "ref", "listen", "browser")
GUESSED_PIDS = 300          #: how many of the next pids the account pre-creates the old ring names for
SAY_TEXT = "the launch code is 0000"

# The account's steps: plain Python with the standard library only (the account cannot read the
# engine's virtualenv), each a small script given its input on stdin and printing JSON.
PRECREATE_RINGS = """
import json, os, sys
made = []
for name in json.loads(sys.stdin.read()):
    try:
        fd = os.open("/dev/shm/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        continue
    os.fchmod(fd, 0o666)
    os.close(fd)
    made.append(name)
print(json.dumps(made))
"""
WRITE_FILE = """
import os, sys
path, mode = sys.argv[1], int(sys.argv[2], 8)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
os.write(fd, sys.stdin.buffer.read())
os.fchmod(fd, mode)
os.close(fd)
"""
MAKE_DIR = """
import os, sys
os.mkdir(sys.argv[1])
os.chmod(sys.argv[1], int(sys.argv[2], 8))
"""
TRY_READ = """
import json, os, socket, sys
targets = json.loads(sys.stdin.read())
out = {}
for path in targets.get("files", []):
    try:
        with open(path, "rb") as f:
            out[path] = "read %d bytes" % len(f.read(1 << 16))
    except OSError as exc:
        out[path] = type(exc).__name__
for path in targets.get("writable", []):
    try:
        os.close(os.open(path, os.O_WRONLY))
        out[path + " (write)"] = "opened for writing"
    except OSError as exc:
        out[path + " (write)"] = type(exc).__name__
for path in targets.get("sockets", []):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out[path] = "connected"
    except OSError as exc:
        out[path] = type(exc).__name__
    finally:
        s.close()
for path in targets.get("dirs", []):
    try:
        out[path] = "listed %s" % sorted(os.listdir(path))
    except OSError as exc:
        out[path] = type(exc).__name__
print(json.dumps(out))
"""
LIST_DIR = "import json, os, sys; print(json.dumps(sorted(os.listdir(sys.argv[1]))))"
SLEEP = "import time; time.sleep(120)"


@dataclass
class OtherUser:
    """The second account: its name, ids, a Python it can run, and what it made (removed at the end)."""
    name: str
    uid: int
    gid: int
    python: str = ""
    scratch: Path = Path("/nonexistent")   #: a world-writable sticky folder, as /tmp is
    shm_made: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}

    def run(self, script: str, *args: str, stdin: str | bytes = b"", python: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a Python script as the account (its uid and gid, no other group)."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        out = subprocess.run([python or self.python, "-c", script, *args], input=data, capture_output=True,
                             user=self.uid, group=self.gid, extra_groups=[], env=self._env(), cwd="/", timeout=60)
        if check:
            assert out.returncode == 0, f"the account's step failed: {out.stderr.decode(errors='replace')}"
        return out

    def json(self, script: str, *args: str, stdin: Any = None) -> Any:
        return json.loads(self.run(script, *args, stdin=json.dumps(stdin)).stdout)

    def mkdir(self, path: Path, mode: int) -> Path:
        self.run(MAKE_DIR, str(path), f"{mode:o}")
        return path

    def write(self, path: Path, data: bytes | str, mode: int = 0o666) -> Path:
        self.run(WRITE_FILE, str(path), f"{mode:o}", stdin=data)
        return path

    def sleeper(self) -> subprocess.Popen[bytes]:
        """A process of the account's that a forged file can name."""
        proc = subprocess.Popen([self.python, "-c", SLEEP], user=self.uid, group=self.gid, extra_groups=[],
                                env=self._env(), cwd="/", stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc


def _python_for(uid: int, gid: int) -> str | None:
    """A Python interpreter the account may run (the test's own may be in a folder it cannot enter)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if not cand:
            continue
        try:
            ok = subprocess.run([cand, "-c", "pass"], user=uid, group=gid, extra_groups=[], cwd="/",
                                capture_output=True, timeout=30).returncode == 0
        except OSError:
            ok = False
        if ok:
            return cand
    return None


@pytest.fixture(scope="module")
def other() -> Iterator[OtherUser]:
    """A second, unprivileged account, created here and removed at the end (with what it made)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second account with useradd (CI runs as root)")
    for tool in ("useradd", "userdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} to create a second account")
    name = f"rtother{secrets.token_hex(4)}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", "--user-group", name], capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, f"useradd failed: {made.stderr}"
    pw = pwd.getpwnam(name)
    user = OtherUser(name, pw.pw_uid, pw.pw_gid, scratch=Path(tempfile.mkdtemp(prefix="realtalk-other-user-")))
    try:
        os.chmod(user.scratch, 0o1777)   # as /tmp: anyone may make files and folders in it
        python = _python_for(pw.pw_uid, pw.pw_gid)
        if python is None:
            pytest.skip("no Python interpreter the second account may run (tried the test's, /usr/bin/python3)")
        user.python = python
        yield user
    finally:
        for proc in user.procs:
            proc.kill()
            proc.wait()
        for shm in user.shm_made:
            Path("/dev/shm", shm).unlink(missing_ok=True)
        shutil.rmtree(user.scratch, ignore_errors=True)
        gone = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60)
        if gone.returncode != 0:
            subprocess.run(["userdel", "--force", name], capture_output=True, text=True, timeout=60)


@pytest.fixture
def victim_env(tmp_path: Path, other: OtherUser) -> dict[str, str]:
    """The engine user's environment: no runtime directory set, $TMPDIR the shared scratch folder
    (so the default runtime directory is one the account can reach, as /tmp/realtalk-UID is)."""
    env = dict(os.environ)
    for key in ("REALTALK_RUNTIME_DIR", "XDG_RUNTIME_DIR", "OPENAI_API_KEY"):
        env.pop(key, None)
    tmp = other.scratch / f"victim-{secrets.token_hex(4)}"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)   # as /tmp
    env["TMPDIR"] = str(tmp)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    return env


def engine_cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """One ``engine`` command as the engine's user; killed (and failed) if it runs past ``timeout``."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", *args], env=env, cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"engine {' '.join(args)} still ran after {timeout} s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_refused(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """The command failed with one clear error that names each of ``names``, and no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode != 0, f"not refused:\n{text}"
    assert "Traceback" not in text, f"a traceback instead of an error:\n{text}"
    for name in names:
        assert name in text, f"the error does not name {name!r}:\n{text}"
    return text


def owner_and_mode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, stat.S_IMODE(st.st_mode)


def silent_wav(path: Path, seconds: float = 30.0) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(b"\0\0" * int(24000 * seconds))
    return path


# ------------------------------------------------------------------ rings
def test_rings_are_random_private_and_none_the_account_made(other: OtherUser, victim_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    # the account pre-creates the old names for the next pids, and makes an XDG_RUNTIME_DIR of its own
    next_pid = int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 1
    guessed = [f"realtalk-{pid}-{kind}" for pid in range(next_pid, next_pid + GUESSED_PIDS) for kind in RING_KINDS]
    made = other.json(PRECREATE_RINGS, stdin=guessed)
    other.shm_made.extend(made)
    assert len(made) > GUESSED_PIDS, "the account could not pre-create the old ring names"
    xdg = other.mkdir(other.scratch / f"xdg-{secrets.token_hex(4)}", 0o700)
    env = {**victim_env, "XDG_RUNTIME_DIR": str(xdg)}
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local",
                             "--mic", str(silent_wav(tmp_path / "silence.wav")), "--speaker", "null"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    runtime = Path(victim_env["TMPDIR"]) / f"realtalk-{os.geteuid()}"
    eng = RunningEngine(proc, runtime, tmp_path / "data")
    try:
        eng.wait_for(lambda line: "ready in" in line, 60)
        # the account's XDG_RUNTIME_DIR is not the engine's: it used its own, new, private one
        assert other.json(LIST_DIR, str(xdg)) == []
        conn_line = eng.wait_for(lambda line: "connection file" in line, 5)
        assert str(runtime / "engine.json") in conn_line, conn_line
        assert owner_and_mode(runtime) == (os.geteuid(), 0o700)
        conn = eng.conn
        names = conn["ring_names"]
        assert isinstance(names, dict) and set(names) == set(RING_KINDS), names
        for kind, name in names.items():
            assert re.fullmatch(r"realtalk-[0-9a-f]{32}", name), f"the {kind} ring's name is guessable: {name}"
            assert name not in made
            assert owner_and_mode(Path("/dev/shm", name)) == (os.geteuid(), 0o600), name
        assert owner_and_mode(runtime / "engine.json") == (os.geteuid(), 0o600)
        # the account opens none of it
        socks = [conn[k][len("ipc://"):] for k in ("publish", "subscribe")]
        rings = [f"/dev/shm/{n}" for n in names.values()]
        seen = other.json(TRY_READ, stdin={"files": rings + [str(runtime / "engine.json")], "writable": rings,
                                           "sockets": socks, "dirs": [str(runtime)]})
        assert seen and set(seen.values()) == {"PermissionError"}, seen
    finally:
        code = eng.stop()
        for name in made:   # at once: an engine of older code elsewhere on the machine could take one
            Path("/dev/shm", name).unlink(missing_ok=True)
    assert code == 0, "".join(eng.lines)


def test_a_ring_name_the_account_took_first_is_refused(other: OtherUser, tmp_path: Path) -> None:
    from engine.audio.ring import Ring, RingError
    model = Ring.create(f"realtalk-{secrets.token_hex(16)}", 1024, with_eventfd=False)
    header = Path("/dev/shm", model.name).read_bytes()   # a well-formed ring, as the account could make one
    model.unlink()
    model.close()
    name = f"realtalk-{secrets.token_hex(16)}"
    other.shm_made.append(name)
    other.write(Path("/dev/shm", name), header, 0o666)
    with pytest.raises(RingError, match=name):
        Ring.create(name, 1024, with_eventfd=False)     # never opened again: a ring is created new
    assert owner_and_mode(Path("/dev/shm", name)) == (other.uid, 0o666)
    with pytest.raises(RingError, match=name) as refused:
        Ring.attach(name)                               # not the user's: refused before it is mapped
    assert str(other.uid) in str(refused.value)


# ------------------------------------------------------------------ the runtime directory
@pytest.mark.parametrize("where", ["REALTALK_RUNTIME_DIR", "default"])
def test_a_runtime_directory_the_account_made_is_refused_naming_it(other: OtherUser, victim_env: dict[str, str],
                                                                   tmp_path: Path, where: str) -> None:
    if where == "default":   # $TMPDIR/realtalk-UID, as /tmp/realtalk-UID: the account took it first
        taken = other.mkdir(Path(victim_env["TMPDIR"]) / f"realtalk-{os.geteuid()}", 0o777)
        env = victim_env
    else:
        taken = other.mkdir(other.scratch / f"run-{secrets.token_hex(4)}", 0o700)
        env = {**victim_env, "REALTALK_RUNTIME_DIR": str(taken)}
    for args in (("start", "--backend", "local", "--text-only"), ("say", SAY_TEXT), ("stop",)):
        text = assert_refused(engine_cli(env, tmp_path, *args), str(taken))
        assert "owned by" in text, text
    assert other.json(LIST_DIR, str(taken)) == [], "the engine put files in a directory the account owns"
    assert owner_and_mode(taken)[0] == other.uid


# ------------------------------------------------------------------ forged connection files
def _forged(other: OtherUser, bus_dir: Path, mine: subprocess.Popen[bytes],
            theirs: subprocess.Popen[bytes]) -> dict[str, Any]:
    """A connection file naming the account's bus and two live processes that are no engine of
    the user's: the user's own ``sleep`` (another executable) and the account's Python (another user)."""
    from engine.supervisor.process import proc_start_ticks
    ticks = {p.pid: proc_start_ticks(p.pid) for p in (mine, theirs)}
    assert all(ticks.values())
    return {"pid": mine.pid, "pid_start_ticks": ticks[mine.pid], "exe": os.readlink(f"/proc/{mine.pid}/exe"),
            "publish": f"ipc://{bus_dir}/bus-publish.sock", "subscribe": f"ipc://{bus_dir}/bus-subscribe.sock",
            "state": "ready", "backend": "local", "model": "gpt-realtime",
            "children": [{"name": "realtime", "pid": mine.pid, "start_ticks": ticks[mine.pid]},
                         {"name": "capture", "pid": theirs.pid, "start_ticks": ticks[theirs.pid]}],
            "ring_names": {}}


class BusTrap:
    """The forged file's publish endpoint, bound here: whatever an ``engine`` command sends to it is caught."""

    def __init__(self, conn: dict[str, Any]) -> None:
        import zmq
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.bind(conn["publish"])

    def caught(self, wait_s: float = 0.5) -> list[bytes]:
        got: list[bytes] = []
        while self.sub.poll(int(wait_s * 1000)):
            got.extend(self.sub.recv_multipart())
        return got

    def close(self) -> None:
        self.sub.close()
        self.ctx.term()


@pytest.fixture
def bystanders(other: OtherUser) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    mine = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL)
    theirs = other.sleeper()
    try:
        yield mine, theirs
    finally:
        mine.kill()
        mine.wait()


def _assert_alive(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        assert p.poll() is None, f"pid {p.pid} named in a forged connection file was signalled ({p.returncode})"


def test_a_forged_connection_file_in_the_accounts_directory_delivers_nothing(
        other: OtherUser, victim_env: dict[str, str], tmp_path: Path, bystanders: Any) -> None:
    run = other.mkdir(other.scratch / f"forged-{secrets.token_hex(4)}", 0o777)
    conn = _forged(other, run, *bystanders)
    other.write(run / "engine.json", json.dumps(conn), 0o666)
    trap = BusTrap(conn)
    try:
        env = {**victim_env, "REALTALK_RUNTIME_DIR": str(run)}
        for args in (("say", SAY_TEXT), ("status",), ("stop",), ("start", "--backend", "local", "--text-only")):
            assert_refused(engine_cli(env, tmp_path, *args), str(run))
            _assert_alive(*bystanders)
        caught = trap.caught()
        assert not any(SAY_TEXT.encode() in frame for frame in caught), "engine say delivered to the forged bus"
        assert not caught, caught
    finally:
        trap.close()


@pytest.mark.parametrize("forgery", ["owned by the account", "symbolic link", "mode 0644"])
def test_a_connection_file_that_is_not_the_users_own_is_not_trusted(
        other: OtherUser, victim_env: dict[str, str], tmp_path: Path, bystanders: Any, forgery: str) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    bus_dir = other.mkdir(other.scratch / f"bus-{secrets.token_hex(4)}", 0o777)
    conn = _forged(other, bus_dir, *bystanders)
    file = run / "engine.json"
    if forgery == "symbolic link":
        file.symlink_to(other.write(bus_dir / "engine.json", json.dumps(conn), 0o600))
    else:
        file.write_text(json.dumps(conn))
        os.chmod(file, 0o644 if forgery == "mode 0644" else 0o600)
        if forgery == "owned by the account":
            os.chown(file, other.uid, other.gid)
    trap = BusTrap(conn)
    try:
        env = {**victim_env, "REALTALK_RUNTIME_DIR": str(run)}
        for args in (("say", SAY_TEXT), ("stop",), ("start", "--backend", "local", "--text-only")):
            assert_refused(engine_cli(env, tmp_path, *args), str(file))
            _assert_alive(*bystanders)
        assert not trap.caught(), "an engine command used the bus of an untrusted connection file"
    finally:
        trap.close()


def _own_file(path: Path, conn: dict[str, Any]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, json.dumps(conn).encode())
    os.close(fd)
    return path


def test_a_connection_file_naming_processes_that_are_not_the_users_engine_signals_nothing(
        other: OtherUser, victim_env: dict[str, str], tmp_path: Path, bystanders: Any) -> None:
    """The user's own file (0600) whose pids and start times match live processes that are not
    this user's engine (another executable, another user): not believed, nothing signalled; when
    its supervisor is gone, cleaned, still without signalling them."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    conn = _forged(other, run, *bystanders)
    file = _own_file(run / "engine.json", conn)
    env = {**victim_env, "REALTALK_RUNTIME_DIR": str(run)}
    trap = BusTrap(conn)
    try:
        # its supervisor pid is a live process of the user's, but `sleep`, not the engine
        for args in (("say", SAY_TEXT), ("status",), ("stop",), ("start", "--backend", "local", "--text-only")):
            assert_refused(engine_cli(env, tmp_path, *args), str(file), "not provably your engine")
            _assert_alive(*bystanders)
        assert not trap.caught()
    finally:
        trap.close()
    assert file.exists()
    # its supervisor is gone: stale; cleaned, and the live processes it names as children are left alone
    gone = subprocess.Popen(["true"])
    gone.wait()
    file.unlink()
    _own_file(file, {**conn, "pid": gone.pid, "pid_start_ticks": 1})
    said = engine_cli(env, tmp_path, "say", SAY_TEXT)
    assert_refused(said, "not running")
    stopped = engine_cli(env, tmp_path, "stop")
    assert stopped.returncode == 0 and "not running" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "killed" not in stopped.stdout
    _assert_alive(*bystanders)
    assert not file.exists()


# ------------------------------------------------------------------ the session folder
def test_a_sessions_folder_the_account_owns_is_refused_naming_it(other: OtherUser, victim_env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """The owner of a shared base (``sessions_dir`` or ``record``) could rename the new 0700 session
    folder away and put one of theirs in its place, holding a link to a file of the user's that
    the recording then overwrites (the trust review)."""
    taken = other.mkdir(other.scratch / f"rec-{secrets.token_hex(4)}", 0o777)
    config = tmp_path / "config.yaml"
    config.write_text(f"sessions_dir: {taken}\n")
    text = assert_refused(engine_cli(victim_env, tmp_path, "start", "--backend", "local", "--text-only",
                                     "--config", str(config)), str(taken))
    assert "owned by" in text and "sessions_dir" in text, text
    assert other.json(LIST_DIR, str(taken)) == [], "the engine made its session folder in the account's folder"


def test_a_folder_writable_by_a_group_the_account_is_in_is_refused(other: OtherUser, tmp_path: Path) -> None:
    """Group-writable is trusted for the user's own private group only: not for one another account uses."""
    from bus.runtime import TrustError, check_ancestors
    base = tmp_path / "shared"
    base.mkdir()
    os.chown(base, os.geteuid(), other.gid)
    os.chmod(base, 0o775)
    with pytest.raises(TrustError, match="0775"):
        check_ancestors(base / "session", "session folder")
