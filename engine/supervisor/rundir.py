"""The supervisor's files outside the bus: the session folder, the connection file
(``engine.json``) and what a dead engine left in the runtime directory.

Rules:

* A session folder is only ever made new (mode 0700): one that exists is refused.
* ``engine.json`` is this user's own private file (bus/runtime.py: written 0600 through a new
  file renamed over it). A start beside a running engine, or beside a file that is not
  provably this user's, is refused naming it; the file of an engine that is gone is cleaned
  (:func:`clean_stale`), which kills only processes that are provably that engine's children
  (pid, start time, executable, uid) and unlinks only rings and sockets of this user's.
* At stop the supervisor removes its sockets, and the connection file only while it still
  names this supervisor (:func:`remove_own_files`).
"""
from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any, Iterable, TextIO

from bus import BusError
from bus.runtime import (GONE, UNPROVEN, NoEngine, TrustError, check_ancestors, engine_alive, engine_state,
                         own_process, read_connection, read_private_json, unproven_error)
from engine.errors import EngineError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_sessions_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "realtalk" / "sessions"


# ---------------------------------------------------------------- stale engines
def clean_stale(conn: dict[str, Any], path: Path) -> list[str]:
    """Clean what a dead engine left (``conn`` is its connection file at ``path``, already checked
    to be this user's own private file, its supervisor gone: bus.runtime.engine_state GONE): kill
    its children that are provably this user's engine children still (pid, start time, the
    interpreter ``exe``, uid: orphans), unlink its rings and sockets that are this user's, remove
    the file. Signals nothing else. Returns what it did."""
    done: list[str] = []
    exe = conn.get("exe")
    for c in conn.get("children") or []:
        if isinstance(c, dict) and own_process(c.get("pid"), c.get("start_ticks"), exe):
            try:
                os.kill(c["pid"], signal.SIGKILL)
                done.append(f"killed orphan {c.get('name')} (pid {c['pid']})")
            except ProcessLookupError:
                pass
    names = conn.get("ring_names") or {}
    for name in names.values() if isinstance(names, dict) else names:   # (a list: written by an older engine)
        if isinstance(name, str) and name.startswith("realtalk-") and "/" not in name:
            shm = Path("/dev/shm") / name
            if _own_entry(shm, stat.S_ISREG):
                shm.unlink(missing_ok=True)
                done.append(f"unlinked ring {name}")
    for ep in (conn.get("publish"), conn.get("subscribe")):
        if isinstance(ep, str) and ep.startswith("ipc://"):
            sock = Path(ep[len("ipc://"):])
            if sock.parent == path.parent and _own_entry(sock, stat.S_ISSOCK):
                sock.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return done


def _own_entry(path: Path, is_kind: Any) -> bool:
    """True if ``path`` (not followed) is of the kind ``is_kind`` tests and this user's."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return bool(is_kind(st.st_mode)) and st.st_uid == os.geteuid()


def engine_identity(conn: dict[str, Any]) -> bool:
    """True if the connection file ``conn`` names a supervisor that is provably this user's
    running engine (pid, start time, executable, uid: bus.runtime.engine_alive)."""
    return engine_alive(conn)


def make_session_dir(session_dir: Path) -> None:
    """The session folder, made new (mode 0700) under its base: never one that exists, and never
    under a folder another user could change (bus.runtime.check_ancestors): the owner of a
    shared base could rename the new folder away and put one of theirs, holding links to the
    user's files, in its place before the recording and the event log are written."""
    try:
        session_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_ancestors(session_dir, "session folder", "set sessions_dir (or record) in the config to a folder of "
                        "yours whose parents only you or root can change")
        session_dir.mkdir(mode=0o700)
    except TrustError as exc:
        raise EngineError(str(exc)) from None
    except FileExistsError:
        raise EngineError(f"the session folder {session_dir} already exists: a session folder is only "
                          "ever made new; start again (the next one has another name)") from None
    except OSError as exc:
        raise EngineError(f"cannot make the session folder {session_dir}: {exc.strerror} (check "
                          "sessions_dir / record in the config)") from None
    os.chmod(session_dir, 0o700)


def check_not_running(path: Path, out: TextIO) -> None:
    """Refuse to start beside a running engine, or on a connection file (``path``) that is not
    this user's own private file (named, with the fix); clean the runtime directory of a dead
    engine, saying so on ``out``."""
    try:
        conn = read_connection(path)
    except NoEngine:
        return
    except TrustError as exc:   # not this user's own private file: nothing it names is touched
        raise EngineError(str(exc)) from None
    except BusError:
        path.unlink(missing_ok=True)  # a torn file of ours: no engine can be found through it anyway
        return
    state = engine_state(conn)
    if state == UNPROVEN:   # a live process that is not provably ours: nothing cleaned, nothing signalled
        raise EngineError(str(unproven_error(conn, path)))
    if state != GONE:
        raise EngineError(f"an engine is already running (pid {conn.get('pid')}); stop it with `engine stop`")
    done = clean_stale(conn, path)
    out.write(f"realtalk: cleaned the runtime directory of an engine that is gone (pid {conn.get('pid')})"
              + (f": {'; '.join(done)}" if done else "") + "\n")


def remove_own_files(connection_path: Path, endpoints: Iterable[str]) -> None:
    """At stop: the bus's ipc sockets, and the connection file if it still names this process."""
    for ep in endpoints:
        if ep.startswith("ipc://"):
            Path(ep[len("ipc://"):]).unlink(missing_ok=True)
    try:
        if read_private_json(connection_path).get("pid") == os.getpid():
            connection_path.unlink()
    except (OSError, BusError, AttributeError):
        pass
