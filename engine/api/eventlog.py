"""A session's event log: every bus message, one JSON line each, with wall and
monotonic time (``<session dir>/events.jsonl``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.errors import EngineError


@dataclass(frozen=True)
class Event:
    topic: str
    wall: float | None
    mono_ns: int | None
    body: dict[str, Any]


class EventLog:
    """Iterate a session's events; ``to_dataframe()`` when pandas is installed."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self.path = p / "events.jsonl" if p.is_dir() else p
        if not self.path.exists():
            raise EngineError(f"no event log at {self.path}")

    def __iter__(self) -> Iterator[Event]:
        with open(self.path) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                yield Event(d.get("topic", ""), d.get("wall"), d.get("mono_ns"), d.get("body") or {})

    def filter(self, prefix: str | None = None) -> list[Event]:
        return [e for e in self if not prefix or e.topic.startswith(prefix)]

    def to_dataframe(self) -> Any:
        try:
            import pandas as pd
        except ImportError:
            raise EngineError("EventLog.to_dataframe needs pandas: pip install pandas") from None
        return pd.DataFrame([{"topic": e.topic, "wall": e.wall, "mono_ns": e.mono_ns, "text": e.body.get("text"),
                              "body": e.body} for e in self])


def find_session_log(session: str | None) -> Path:
    from engine.supervisor.rundir import default_sessions_dir
    if session and Path(session).exists():
        return Path(session)
    base = default_sessions_dir()
    if session:
        p = base / session
        if p.exists():
            return p
        raise EngineError(f"no session {session!r} in {base}")
    sessions = sorted(p for p in base.glob("*") if (p / "events.jsonl").exists()) if base.exists() else []
    if not sessions:
        raise EngineError(f"no sessions in {base} yet")
    return sessions[-1]
