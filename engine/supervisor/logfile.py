"""The session's event log as the supervisor writes it: ``events.jsonl``, one JSON object a line,
appended, mode 0600 (read back by :mod:`engine.api.eventlog`).

Contract: :meth:`SessionLog.write` only queues a line; :meth:`SessionLog.flush` (once a round of
the supervisor's bus loop) writes what is queued with plain ``write`` calls. Neither ever
raises. A write that fails (a full disk, ENOSPC; a quota, EDQUOT; an I/O error) leaves the file
cut back to its last whole line, so what was written is kept and reads back; ``flush`` returns
the error (and keeps it in ``error``) and every later line is counted in ``lost_lines``, not
written: the supervisor stops the session with the cause. :func:`log_line` makes a line of any
bus body and never raises.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class SessionLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600)   # new, in the new session folder (never a file that exists)
        self._size = os.fstat(self._fd).st_size   #: bytes of whole lines in the file
        self._pending: list[str] = []
        self.error: OSError | None = None           #: the write that failed; nothing is written after it
        self.lost_lines = 0                          #: lines not written since (and the torn ones)

    def write(self, line: str) -> None:
        """Queue one line (it ends with a newline)."""
        if self.error is not None or self._fd < 0:
            self.lost_lines += 1
            return
        self._pending.append(line)

    def flush(self) -> OSError | None:
        """Write what is queued; the error if a write failed now (None otherwise, and after)."""
        if not self._pending or self._fd < 0:
            return None
        data = "".join(self._pending).encode()
        self._pending.clear()
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            whole = data.rfind(b"\n", 0, written) + 1   # bytes of the lines that went out whole
            try:
                os.ftruncate(self._fd, self._size + whole)   # the torn line goes: the file reads back
            except OSError:
                pass
            self._size += whole
            self.lost_lines += data.count(b"\n", whole)
            self.error = exc
            return exc
        self._size += written
        return None

    def close(self) -> None:
        """Flush, then close (idempotent; never raises)."""
        self.flush()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


def log_line(topic: str, body: dict[str, Any]) -> str:
    """One event-log line (newline included). A body JSON cannot hold as it is (a msgpack map with
    bytes or tuple keys, from any bus client) is logged with its keys and odd values as text:
    never raises."""
    line = {"topic": topic, "wall": body.get("ts"), "mono_ns": body.get("mono_ns"), "body": body}
    try:
        text = json.dumps(line, default=str)
    except (TypeError, ValueError):
        try:
            line["body"] = _jsonable(body)
            text = json.dumps(line, default=str)
        except RecursionError:
            text = _unreadable(line, body)
    except RecursionError:   # deeper than json goes (the bus refuses such bodies; a caller may not)
        text = _unreadable(line, body)
    return text + "\n"


def _unreadable(line: dict[str, Any], body: dict[str, Any]) -> str:
    line["body"] = {"unlogged": f"a body nested too deep to log, keys {sorted(map(str, body))[:20]}"}
    return json.dumps(line, default=str)


def _jsonable(value: Any) -> Any:
    """``value`` with every map key made a string and every non-JSON value its text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
