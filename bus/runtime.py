"""The per-user runtime directory and the engine's connection file: where a client finds the
broker, and whether to believe what it finds there.

On a shared machine another local user must not be able to listen, speak or steer, so
nothing here is believed because of where it is, only because of whose it is:

* The runtime directory is ``$REALTALK_RUNTIME_DIR``; else ``$XDG_RUNTIME_DIR/realtalk``
  when ``$XDG_RUNTIME_DIR`` is a directory of this user's with mode 0700 (the login
  manager's); else ``$TMPDIR/realtalk-UID`` (``/tmp`` without ``TMPDIR``). It is made new
  (``mkdir``, mode 0700) or, if it exists, used only when ``lstat`` shows a directory (not a
  symbolic link) owned by this user with no group or other permission bits, below folders
  only root or this user can change (or sticky ones, as /tmp). Anything else
  is refused with :class:`TrustError`, naming the directory, whose it is and the fix: it is
  never repaired (``chmod``) or adopted. Its mode protects the ipc sockets of the bus, the
  connection file and ``console.json`` inside it.
* A per-user file (``engine.json``, ``console.json``) is read only through a descriptor opened
  with ``O_NOFOLLOW`` whose ``fstat`` shows a regular file of this user with no group or other
  bits (the engine writes them 0600): :func:`read_private_json`. It is written exclusively: a
  new temporary file (``O_EXCL``, 0600) beside it, renamed over it (:func:`write_private_file`).
* A process named in a connection file is this user's engine process only if its pid and
  /proc start time (together they name one process for good) match, every uid of it is this
  user's, and its executable is the interpreter the engine runs on: the one the file records
  as ``exe`` (the supervisor's; every child is the same interpreter), which must also be the
  reader's own (:func:`own_process`). A supervisor is then ``running`` (such a process),
  ``gone`` (no process with that pid and start time: the file is stale, and may be cleaned) or
  ``unproven`` (a live process that is not provably the engine: nothing is cleaned, nothing
  signalled, the file is not believed): :func:`engine_state`. Nothing is ever signalled on a
  file's word alone.

Everything raised on purpose is a :class:`bus.BusError` (the engine turns it into its own
error where it starts: the bus package does not import the engine).
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from bus.wire import BusError

CONNECTION_FILE = "engine.json"
#: the largest per-user JSON file read (the connection file is a few kB)
MAX_PRIVATE_FILE_BYTES = 1 << 20


class TrustError(BusError):
    """A runtime directory or per-user file that is not provably this user's own and private;
    the message names it, whose it is, and what to do."""


class NoEngine(BusError):
    """No engine of this user's runs: no connection file, or one whose supervisor is gone."""


def _owner(uid: int) -> str:
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def private_problem(st: os.stat_result, *, directory: bool) -> str | None:
    """Why an ``lstat`` result is not this user's own private directory (``directory``) or
    regular file; None when it is."""
    kind = "directory" if directory else "regular file"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if directory and not stat.S_ISDIR(st.st_mode) or not directory and not stat.S_ISREG(st.st_mode):
        return f"is not a {kind}"
    if st.st_uid != os.geteuid():
        return f"is owned by {_owner(st.st_uid)}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o}: others may use it (it must be {'0700' if directory else '0600'})"
    return None


def private_dir(path: str | os.PathLike[str], what: str = "runtime directory") -> Path:
    """``path`` as this user's own private directory: made new (mode 0700, missing parents too)
    or, if it exists, checked with ``lstat`` (see the module docstring). TrustError naming it
    and the fix otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)   # made just now by us: exactly 0700 whatever the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise TrustError(f"cannot make the {what} {path}: {exc.strerror}; set REALTALK_RUNTIME_DIR to a "
                         "directory of yours") from None
    st = os.lstat(path)
    problem = private_problem(st, directory=True)
    if problem is None:
        check_ancestors(path, what)
        return path
    if st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
        fix = f"make it private (chmod 700 {path}) or remove it, then start again"
    else:
        fix = (f"it is not yours, so it is not used: have it removed (its owner or root: rm -r {path}), "
               "or set REALTALK_RUNTIME_DIR to a directory of yours")
    raise TrustError(f"refused the {what} {path}: it {problem}; {fix}")


def check_ancestors(path: Path, what: str,
                    fix: str = "use a directory whose parents only you or root can change (set REALTALK_RUNTIME_DIR)"
                    ) -> None:
    """TrustError unless every folder above ``path`` is root's or this user's, and writable by
    no one else unless sticky (as /tmp): else another user could rename the directory away and
    put one of theirs in its place after it was checked (OpenSSH checks its paths the same way).
    Writable by its group is fine when that group is the user's own private one (a umask of 002
    with a group per user, as Debian and Ubuntu make them, leaves home folders 0775)."""
    parent = Path(os.path.realpath(path.parent))
    for folder in [*parent.parents, parent]:
        st = os.stat(folder)
        others_write = st.st_mode & 0o002 or (st.st_mode & 0o020 and not _private_group(st.st_gid))
        if st.st_uid not in (0, os.geteuid()):
            problem = f"is owned by {_owner(st.st_uid)}"
        elif others_write and not st.st_mode & stat.S_ISVTX:
            problem = f"has mode {stat.S_IMODE(st.st_mode):04o}: others may rename what is in it"
        else:
            continue
        raise TrustError(f"refused the {what} {path}: the folder {folder} above it {problem}; {fix}")


def _private_group(gid: int) -> bool:
    """Whether group ``gid`` holds this user alone: no other member, and no other account's group."""
    try:
        import grp
        import pwd
        me = pwd.getpwuid(os.geteuid()).pw_name
        if any(member != me for member in grp.getgrgid(gid).gr_mem):
            return False
        return all(p.pw_uid == os.geteuid() for p in pwd.getpwall() if p.pw_gid == gid)
    except (KeyError, ImportError):
        return False


def _xdg_runtime_dir() -> Path | None:
    """``$XDG_RUNTIME_DIR`` if it is this user's own directory with mode 0700, else None."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        return None
    try:
        st = os.lstat(base)
    except OSError:
        return None
    return Path(base) if private_problem(st, directory=True) is None else None


def runtime_dir() -> Path:
    """The per-user runtime directory (mode 0700) holding sockets and the connection file;
    made if missing, refused (TrustError naming it and the fix) if it is not provably ours."""
    given = os.environ.get("REALTALK_RUNTIME_DIR")
    if given:
        return private_dir(given)
    xdg = _xdg_runtime_dir()
    if xdg is not None:
        return private_dir(xdg / "realtalk")
    return private_dir(Path(os.environ.get("TMPDIR") or "/tmp") / f"realtalk-{os.geteuid()}")


def connection_file() -> Path:
    """The running engine's connection file, in :func:`runtime_dir`."""
    return runtime_dir() / CONNECTION_FILE


# ---------------------------------------------------------------- private files
def read_private_json(path: str | os.PathLike[str], what: str = "connection file") -> Any:
    """The JSON in ``path`` if it is this user's own private regular file (not a symbolic link:
    opened with O_NOFOLLOW, checked with fstat). FileNotFoundError when there is none;
    TrustError naming it and the fix when it is not ours; BusError when it is not JSON."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        try:
            problem = private_problem(os.lstat(path), directory=False) or exc.strerror
        except OSError:
            problem = exc.strerror
        raise TrustError(f"refused the {what} {path}: it {problem}; it is not trusted: remove it "
                         f"(rm {path}) and start the engine again") from None
    try:
        problem = private_problem(os.fstat(fd), directory=False)
        if problem is not None:
            raise TrustError(f"refused the {what} {path}: it {problem}; it is not trusted, nothing it names is "
                             f"used: remove it (rm {path}) and start the engine again")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_PRIVATE_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_PRIVATE_FILE_BYTES:
        raise BusError(f"{what} {path} is over {MAX_PRIVATE_FILE_BYTES} bytes; remove it and start the engine again")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BusError(f"{what} {path} is unreadable ({exc}); restart the engine") from None


def write_private_file(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` as this user's private file (0600): a new temporary file
    beside it (O_EXCL), renamed over it (a symbolic link at ``path`` is replaced, never followed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- process identity
def proc_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (field 22 of /proc/PID/stat, clock ticks since boot), or None if no
    such process runs (a zombie counts as gone). With the pid it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def proc_exe(pid: int | str) -> str | None:
    """The executable ``pid`` runs (/proc/PID/exe, without a " (deleted)" mark: an interpreter
    upgraded under a running engine is still its own), or None if it cannot be read (gone, or
    another user's process)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return exe[:-len(" (deleted)")] if exe.endswith(" (deleted)") else exe


def proc_uids(pid: int) -> tuple[int, ...] | None:
    """The real, effective, saved and filesystem uids of ``pid`` (/proc/PID/status), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return tuple(int(u) for u in line.split()[1:])
    except (OSError, ValueError):
        pass
    return None


def same_process(pid: Any, start_ticks: Any) -> bool:
    """True if ``pid`` still is the process that had ``start_ticks`` (not a reused pid)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(start_ticks, int) or pid <= 0:
        return False
    return proc_start_ticks(pid) == start_ticks


def own_process(pid: Any, start_ticks: Any, exe: Any) -> bool:
    """True if ``pid`` is provably the process a connection file recorded and one of this user's
    engine processes: the same start time, every uid this user's, and the executable ``exe``,
    which is this process's own interpreter too (an engine process runs what its clients run)."""
    if not isinstance(exe, str) or exe != proc_exe("self") or not same_process(pid, start_ticks):
        return False
    uids = proc_uids(pid)
    if not uids or any(u != os.geteuid() for u in uids):
        return False
    return proc_exe(pid) == exe and same_process(pid, start_ticks)   # (still the same one after the reads)


RUNNING, GONE, UNPROVEN = "running", "gone", "unproven"


def engine_state(conn: Any) -> str:
    """Whether the connection file ``conn`` names this user's engine that runs now (RUNNING), a
    supervisor that is gone (GONE: no process has its pid and start time; the file is stale), or
    a live process that is not provably this user's engine (UNPROVEN: another user's, another
    executable; never signalled, never cleaned after)."""
    if not isinstance(conn, dict):
        return GONE
    pid, ticks = conn.get("pid"), conn.get("pid_start_ticks")
    if own_process(pid, ticks, conn.get("exe")):
        return RUNNING
    return UNPROVEN if same_process(pid, ticks) else GONE


def engine_alive(conn: Any) -> bool:
    """True if the connection file ``conn`` names a supervisor that is provably this user's
    running engine (:func:`engine_state` RUNNING)."""
    return engine_state(conn) == RUNNING


def unproven_error(conn: dict[str, Any], file: Path) -> TrustError:
    """The error for a connection file whose supervisor pid is a live process that is not
    provably this user's engine: names the file, the process and the fix."""
    pid = conn.get("pid")
    exe = proc_exe(pid) if isinstance(pid, int) else None
    uids = proc_uids(pid) if isinstance(pid, int) else None
    who = f"{exe or 'an executable you cannot see'} as {_owner(uids[0]) if uids else 'another user'}"
    return TrustError(f"refused the connection file {file}: it names pid {pid}, which runs but is not provably your "
                      f"engine (it runs {who}); nothing it names is used or signalled. If no engine of yours runs, "
                      f"remove it (rm {file}); if one does, stop it with the `engine stop` it was started with")


def read_connection(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The connection file (default: :func:`connection_file`) if it is this user's own private
    file, running engine or not. NoEngine when there is none; TrustError when it is not ours."""
    file = Path(path) if path else connection_file()
    try:
        conn = read_private_json(file)
    except FileNotFoundError:
        raise NoEngine(f"no engine is running: {file} does not exist (start one with `engine start`)") from None
    if not isinstance(conn, dict):
        raise BusError(f"connection file {file} is not a JSON object; remove it and start the engine again")
    return conn


def running_engine(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The connection file of this user's engine that runs now (:func:`read_connection`, then
    :func:`engine_alive`); NoEngine naming the file when its supervisor is gone."""
    file = Path(path) if path else connection_file()
    conn = read_connection(file)
    state = engine_state(conn)
    if state == UNPROVEN:
        raise unproven_error(conn, file)
    if state != RUNNING:
        raise NoEngine(f"the engine (pid {conn.get('pid')}) is not running; its connection file {file} is stale "
                       "(`engine start` or `engine stop` cleans it)")
    return conn
