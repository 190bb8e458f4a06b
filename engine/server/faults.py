"""Faults the local server can inject, per server (CLI/config) or per scenario."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DROP_CODES = (1001, 1006, 1011)
MAX_SESSION_REASON = "Your session hit the maximum duration of 60 minutes."


@dataclass
class Faults:
    first_delta_delay_ms: float = 0.0     #: extra wait before a response's first delta
    delta_jitter_ms: float = 0.0          #: std deviation of random delay between deltas
    drop_after_s: float | None = None     #: close the socket this long after connect
    drop_at_event: str | None = None      #: close when about to send this event type ("type" or "type#N")
    drop_code: int = 1006                 #: 1001, 1006 (no close frame) or 1011
    max_session_s: float = 3600.0         #: the real limit; closes 1001 with the real reason
    #: GPT-Live only: the primary socket sends nothing for ``stall_ms`` from ``stall_at_s`` after the
    #: session started, then all it held at once (a network stall, as TCP delivers it)
    stall_at_s: float | None = None
    stall_ms: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)
    """injected errors: [{after_event: TYPE, code: ..., message: ...}], each sent once"""
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Faults":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError("expected a mapping")
        known = {f.name for f in fields(cls)}
        bad = set(data) - known
        if bad:
            raise ValueError(f"unknown key {sorted(bad)[0]!r} (allowed: {', '.join(sorted(known))})")
        f = cls(**data)
        if f.drop_code not in DROP_CODES:
            raise ValueError(f"drop_code must be one of {DROP_CODES}, got {f.drop_code}")
        if not isinstance(f.errors, list):
            raise ValueError("errors must be a list")
        return f

    def merged(self, other: "Faults") -> "Faults":
        """``other``'s non-default values over ours."""
        out = Faults(**{f.name: getattr(self, f.name) for f in fields(self)})
        default = Faults()
        for f in fields(other):
            v = getattr(other, f.name)
            if v != getattr(default, f.name):
                setattr(out, f.name, v)
        return out
