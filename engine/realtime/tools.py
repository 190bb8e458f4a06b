"""Tools: functions other processes serve over the bus, and the model's calls to them. Pure.

Rules:
- A tool is registered by a bus client (``cmd.tool.register``) and owned by it; it goes when its
  owner unregisters it or the broker announces the owner gone (``engine.presence.gone``).
- The session's tool list is the configured tools plus the registered ones; every change is
  sent to the server (``session.update``) and published (``engine.tools``).
- A call (``response.function_call_arguments.done``) is published on ``tool.call`` and waits for
  the first ``cmd.tool.result`` naming it; later results are ignored. Without one by the tool's
  timeout the model is told the tool did not answer. Either way the output goes back to the
  model and a response is requested.
- A tool's ``timeout_s`` is a finite number of seconds above 0 and at most :data:`MAX_TIMEOUT_S`
  (a NaN deadline would fire the link's timer at once for ever; an infinite one would keep the
  session from ever being at a turn boundary), checked at registration and when a successor
  restores the tools.
- Its ``parameters`` and a result's ``output`` go to the API as JSON: a value JSON cannot carry is
  refused (ValueError naming it) before anything changes, so a bad result leaves the call open
  for a good one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from engine.realtime.taken import check_json, json_text

DEFAULT_TIMEOUT_S = 10.0
#: the longest a tool may take to answer a call (seconds)
MAX_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    owner: str
    timeout_s: float

    def as_session_tool(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description, "parameters": self.parameters}


def registration_problem(body: Mapping[str, Any]) -> str | None:
    """Why a ``cmd.tool.register`` body cannot be registered (:func:`parse_registration`), or None."""
    try:
        parse_registration(body)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def parse_registration(body: Mapping[str, Any]) -> ToolSpec:
    """A ``cmd.tool.register`` body as a spec; ValueError naming what is wrong."""
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("cmd.tool.register needs 'name': a non-empty string")
    params = body.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ValueError("cmd.tool.register 'parameters' must be a JSON schema map")
    check_json(params, "cmd.tool.register 'parameters'")
    timeout = body.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"cmd.tool.register 'timeout_s' must be a number of seconds above 0 and at most "
                         f"{MAX_TIMEOUT_S:g} (got {timeout!r})")
    return ToolSpec(name, str(body.get("description", "")), params,
                    str(body.get("owner") or body.get("pub", "")), float(timeout))


def check_session_tools(tools: Any) -> list[dict[str, Any]]:
    """Validate a session's ``tools`` value (from config or ``cmd.session.update``)."""
    if not isinstance(tools, list):
        raise ValueError("session 'tools' must be a list of tool maps")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t.get("name"):
            raise ValueError(f"session 'tools'[{i}] must be a map with a 'name' (e.g. "
                             "{type: function, name: ..., parameters: {...}})")
    return tools


class Tools:
    def __init__(self) -> None:
        self.registered: dict[str, ToolSpec] = {}
        self.calls: dict[str, tuple[str, float]] = {}    #: call id -> (tool name, deadline)

    def session_tools(self, configured: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = {t.get("name") for t in configured}
        return list(configured) + [s.as_session_tool() for s in self.registered.values() if s.name not in names]

    def register(self, spec: ToolSpec) -> None:
        self.registered[spec.name] = spec

    def unregister(self, name: str | None = None, owner: str | None = None) -> list[str]:
        names = [n for n, t in self.registered.items() if n == name or (owner and t.owner == owner)]
        for n in names:
            del self.registered[n]
        return names

    def called(self, call_id: str, name: str, now_s: float) -> bool:
        """The model called ``name``; True when a bus client registered it."""
        spec = self.registered.get(name)
        self.calls[call_id] = (name, now_s + (spec.timeout_s if spec else DEFAULT_TIMEOUT_S))
        return spec is not None

    def result(self, call_id: str, output: Any) -> str | None:
        """The output to give the model (JSON text, a string as it is), or None for a late or
        duplicate result; ValueError for an output JSON cannot carry, the call still open."""
        if call_id not in self.calls:
            return None
        text = json_text(output, "cmd.tool.result 'output'")   # encoded first: a bad output loses no call
        del self.calls[call_id]
        return text

    def overdue(self, now_s: float) -> list[tuple[str, str]]:
        out = [(cid, name) for cid, (name, deadline) in self.calls.items() if now_s >= deadline]
        for cid, _ in out:
            del self.calls[cid]
        return out

    def next_deadline(self) -> float | None:
        return min(d for _, d in self.calls.values()) if self.calls else None
