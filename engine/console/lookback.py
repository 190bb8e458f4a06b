"""Finished sessions for the console's "look back" view: the session folders under the
sessions directory, a session's event log (the firehose topics left out) and the level
envelopes of its ``conversation.wav`` (left: the mic as captured, right: what was played).

Keys are folder names only (``20260101-120000-abc123``): nothing outside the sessions
directory can be named, and a bad key is a :class:`~engine.console.relay.ConsoleError`.
"""
from __future__ import annotations

import json
import re
import wave
from pathlib import Path
from typing import Any

import numpy as np

from engine.audio.levels import dbfs
from engine.console.relay import SKIPPED_TOPICS, ConsoleError

MAX_EVENTS = 50_000
#: the most of a live session's log a page's start reads from its end, whatever else it holds (the
#: newest 3,000 events it looks for are about five minutes of a conversation: levels come 10 a second)
TAIL_MAX_BYTES = 32 << 20
TAIL_CHUNK_BYTES = 1 << 20
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
WINDOW_MS = 20


def session_folder(base: Path, key: str) -> Path:
    """The folder of session ``key`` under ``base``; ConsoleError when the key is malformed or unknown."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ConsoleError(f"session key {key!r} is not a session folder name (see the session list)")
    folder = base / key
    if not folder.is_dir():
        raise ConsoleError(f"no session {key!r} in {base}")
    return folder


def list_sessions(base: Path, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` session folders under ``base`` (newest first)."""
    if not base.is_dir():
        return []
    out = []
    for folder in sorted((p for p in base.iterdir() if p.is_dir() and _KEY.match(p.name)), reverse=True)[:limit]:
        events, wav = folder / "events.jsonl", folder / "conversation.wav"
        out.append({"key": folder.name, "events_bytes": events.stat().st_size if events.exists() else 0,
                    "has_wav": wav.exists(), "mtime": folder.stat().st_mtime})
    return out


def read_events(folder: Path, limit: int = MAX_EVENTS) -> dict[str, Any]:
    """A session's events as the live page gets them (``topic``, ``body``), the firehose left out;
    the latest ``limit`` of them, and how many were left out."""
    path = folder / "events.jsonl"
    if not path.exists():
        raise ConsoleError(f"session {folder.name} has no events.jsonl")
    events: list[dict[str, Any]] = []
    skipped = bad = 0
    with path.open() as f:
        for line in f:
            parsed = _parsed(line)
            if parsed is None:
                bad += 1
                continue
            topic, body = parsed
            if not _shown(topic, body):
                skipped += 1
                continue
            events.append({"topic": topic, "body": body})
    cut = max(0, len(events) - limit)
    return {"events": events[cut:], "skipped": skipped, "unreadable": bad, "cut": cut,
            "has_wav": (folder / "conversation.wav").exists()}


def tail_events(folder: Path, limit: int, max_bytes: int = TAIL_MAX_BYTES) -> list[tuple[str, dict[str, Any]]]:
    """The newest ``limit`` events of a session's log as it stands (``(topic, body)``, the
    firehose left out), read from its end: at most ``max_bytes``, whatever the log's length. A
    line being written (no newline yet), an unreadable line and a missing log are left out; never
    raises for the log's content (an OSError reading it propagates)."""
    path = folder / "events.jsonl"
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return []
    events: list[tuple[str, dict[str, Any]]] = []   # newest first
    with f:
        end = pos = f.seek(0, 2)
        carry, last_dropped = b"", False
        while pos > 0 and end - pos < max_bytes and len(events) < limit:
            step = min(TAIL_CHUNK_BYTES, pos)
            pos -= step
            f.seek(pos)
            parts = (f.read(step) + carry).split(b"\n")
            if not last_dropped:   # after the log's last newline: nothing, or a line still being written
                if len(parts) == 1:
                    carry = parts[0]
                    continue
                parts.pop()
                last_dropped = True
            carry = parts.pop(0) if pos > 0 else b""   # a line that may begin before this chunk
            for raw in reversed(parts):
                event = _logged_event(raw)
                if event is not None:
                    events.append(event)
                    if len(events) >= limit:
                        break
    events.reverse()
    return events


#: how a logged line of a firehose topic begins (engine/supervisor/logfile.py log_line): left out unparsed
_SKIPPED_PREFIXES = tuple(b'{"topic": "' + t.encode() for t in SKIPPED_TOPICS)


def _parsed(line: str | bytes) -> tuple[Any, Any] | None:
    """One log line's topic and body as written; None when it cannot be read."""
    try:
        rec = json.loads(line)
        return rec["topic"], rec["body"]
    except Exception:   # not JSON, not an object of topic and body, nested past the parser's depth
        return None


def _shown(topic: Any, body: Any) -> bool:
    """A logged event a page shows: a text topic, a map body, not the firehose."""
    return isinstance(topic, str) and isinstance(body, dict) and not topic.startswith(SKIPPED_TOPICS)


def _logged_event(raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """One log line's ``(topic, body)``; None for a firehose topic or an unreadable line."""
    if not raw or raw.startswith(_SKIPPED_PREFIXES):
        return None
    parsed = _parsed(raw)
    return parsed if parsed is not None and _shown(*parsed) else None


def wav_levels(folder: Path) -> dict[str, Any]:
    """RMS dBFS per 20 ms of each channel of ``conversation.wav`` (mic, played)."""
    path = folder / "conversation.wav"
    if not path.exists():
        raise ConsoleError(f"session {folder.name} has no conversation.wav (record it with `record: DIR`)")
    try:
        w = wave.open(str(path), "rb")
    except (wave.Error, EOFError, OSError) as exc:
        raise ConsoleError(f"{path} is not a readable WAV file ({exc})") from None
    with w:
        rate, channels = w.getframerate(), w.getnchannels()
        window = rate * WINDOW_MS // 1000
        sums: list[list[np.ndarray]] = [[] for _ in range(channels)]
        while True:
            raw = w.readframes(window * 500)
            if not raw:
                break
            pcm = np.frombuffer(raw, dtype="<i2")
            frames = len(pcm) // channels // window
            if frames == 0:
                break
            x = pcm[: frames * window * channels].reshape(frames, window, channels).astype(np.float32)
            rms = np.sqrt(np.mean(x * x, axis=1))
            for c in range(channels):
                sums[c].append(rms[:, c])
    chans = [dbfs(np.concatenate(s)) if s else [] for s in sums]
    return {"period_ms": WINDOW_MS, "rate_hz": rate, "channels": channels,
            "mic_dbfs": chans[0] if chans else [], "played_dbfs": chans[1] if len(chans) > 1 else []}
