"""The command intake: what the broker's side loop does with each command (pure: no sockets).

The broker is the part of the engine that is always there while the engine runs; the realtime
process, which carries commands out, may be restarting. So the broker takes each command
first (docs/bus-protocol.md, "Commands", docs/architecture.md, "The bus"):

Rules:
- A command is a message on one of :data:`bus.wire.COMMAND_TOPICS`. One with an ``id`` is
  acked at once on ``cmd.ack`` (``id``, ``ok``, ``state``, ``topic``): ``queued`` (held for the
  realtime process), ``accepted`` (no hold: ``engine phone``, whose calls end with their process),
  ``taken`` (a copy of a command the realtime process has already taken) or ``refused``
  (``ok: false``, ``error``: an unknown ``cmd.*`` topic, a bad ``id``, the hold is full). A
  command without an ``id`` gets no ack; it is held all the same (key ``<pub>#<seq>``).
- Held commands keep their frames exactly as they came (topic, body and any third frame), so
  the realtime process sees the sender's ``pub`` and any signature unchanged.
- A command is held until the realtime process's state (``conversation.history``, signed by
  it) lists its key in ``taken``: the process publishes that state after it took the command,
  so from then on a crash of the process loses nothing (the state is what its successor starts
  from). A command that changed nothing in that state is let go on ``intake.taken`` (signed,
  the same ``taken`` list). A copy of a command held or taken already is not held twice.
- Hand-over: when the realtime process subscribes to :data:`bus.wire.INTAKE_TOPIC`, it gets one
  message with every command held, in the order they came, and the latest state; a command
  still held :data:`REOFFER_S` after it was last offered is offered again (the process
  de-duplicates by key), so nothing depends on a subscription's timing.
- Outcomes: the realtime process puts each command's outcome on the signed ``intake.taken``
  too (``outcomes``: id -> ``topic``, ``done``: its ``cmd.done``); the last
  :data:`REMEMBERED_OUTCOMES` are kept. They go in the hand-over (``outcomes``), so a successor
  answers a sender's re-send with that ``cmd.done`` again, as its predecessor would have; and
  while no realtime process is there to answer (it is restarting), the broker answers a re-send
  itself (:meth:`Intake.answer`): the same ``cmd.done`` with ``repeated: true``, or, for an id a
  command of another topic took, ``ok: false`` ``code: id_reused``. Around a restart a re-send
  may be answered twice (by the broker, and by the successor that got it live as it started).
  Only in :attr:`Mode.HOLD`: in ``engine phone`` each call's core answers its own commands.
- Bounded: at most :data:`MAX_HELD` commands and :data:`MAX_HELD_BYTES`; past that a command is
  refused, never silently dropped.
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from bus.wire import (ACK_TOPIC, COMMAND_TOPICS, DONE_TOPIC, BusError, command_key, decode, id_problem, id_reused_error,
                      outcome_of, remember_newest)

#: commands held at most (a realtime process that never comes back: the engine stops anyway)
MAX_HELD = 1000
#: bytes of held commands at most
MAX_HELD_BYTES = 16 << 20
#: a held command not taken this long after it was offered is offered again
REOFFER_S = 1.0
#: keys of taken commands remembered, so that a client's late copy is acked ``taken``, not held again
REMEMBERED_KEYS = 4096
#: command outcomes remembered for a successor (as many as the realtime process remembers)
REMEMBERED_OUTCOMES = 1024
#: topics under ``cmd.`` that are not commands
NOT_COMMANDS = (ACK_TOPIC, DONE_TOPIC)


class Mode(str, enum.Enum):
    HOLD = "hold"       #: ack ``queued`` and hold for the realtime process (``engine start``)
    ACK = "ack"         #: ack ``accepted``, hold nothing (``engine phone``: the bridge takes them at once)


@dataclass
class Held:
    key: str
    frames: list[bytes]
    size_bytes: int
    offered_s: float        #: when it came or was last offered (monotonic seconds)


class Intake:
    """The held commands and what to ack; the broker's keeper feeds it and publishes what it returns."""

    def __init__(self, mode: Mode = Mode.HOLD, *, max_held: int = MAX_HELD, max_bytes: int = MAX_HELD_BYTES) -> None:
        self.mode = mode
        self.max_held = max_held
        self.max_bytes = max_bytes
        self.held: OrderedDict[str, Held] = OrderedDict()
        self.held_bytes = 0
        self.taken: OrderedDict[str, None] = OrderedDict()
        #: command id -> ``topic`` (the command's; None: not known) and ``done`` (its cmd.done)
        self.outcomes: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.refused = 0          #: commands refused (counted; each got its ack)
        self.released = 0         #: held commands the realtime process took

    def command(self, topic: str, body: Mapping[str, Any], frames: list[bytes], now_s: float) -> dict[str, Any] | None:
        """A ``cmd.*`` message came: the ``cmd.ack`` payload to publish now (None: no ack)."""
        if topic in NOT_COMMANDS:
            return None
        cmd_id = body.get("id")
        problem = None if topic in COMMAND_TOPICS else \
            f"unknown command {topic!r} (the engine takes {', '.join(COMMAND_TOPICS)})"
        problem = problem or id_problem(body)
        if problem is not None:
            self.refused += 1
            return self._ack(cmd_id, topic, "refused", problem) if isinstance(cmd_id, str) and cmd_id else None
        key = command_key(body)
        if key is None:
            return None   # no id and no header to name it by: the realtime process reports it
        if self.mode is Mode.ACK:
            return self._ack(cmd_id, topic, "accepted")
        if key in self.taken:
            return self._ack(cmd_id, topic, "taken")
        if key not in self.held:
            size = sum(len(f) for f in frames)
            if len(self.held) >= self.max_held or self.held_bytes + size > self.max_bytes:
                self.refused += 1
                return self._ack(cmd_id, topic, "refused",
                                 f"the engine already holds {len(self.held)} commands ({self.held_bytes} bytes) "
                                 "that its realtime process has not taken; try again once it is back")
            self.held[key] = Held(key, [bytes(f) for f in frames], size, now_s)
            self.held_bytes += size
        return self._ack(cmd_id, topic, "queued")

    @staticmethod
    def _ack(cmd_id: Any, topic: str, state: str, error: str | None = None) -> dict[str, Any] | None:
        if not isinstance(cmd_id, str) or not cmd_id:
            return None
        ack: dict[str, Any] = {"id": cmd_id, "ok": error is None, "state": state, "topic": topic}
        if error is not None:
            ack["error"] = error
        return ack

    def drop_owner(self, owner: str) -> list[str]:
        """A tool owner is gone (its presence ended): its held ``cmd.tool.register`` commands are
        dropped, so a realtime process that takes them later offers no tool nobody serves. The
        keys dropped."""
        dropped = []
        for key, held in list(self.held.items()):
            try:
                topic, body = decode(held.frames)
            except BusError:
                continue
            if topic == "cmd.tool.register" and (body.get("owner") or body.get("pub")) == owner:
                del self.held[key]
                self.held_bytes -= held.size_bytes
                dropped.append(key)
        return dropped

    def state(self, body: Mapping[str, Any]) -> int:
        """The realtime process published its state (or ``intake.taken``): release what it lists as
        taken, keep the outcomes it carries; returns how many were released."""
        keys = body.get("taken")
        if not isinstance(keys, list):
            return 0
        released = 0
        for key in keys:
            if not isinstance(key, str):
                continue
            if key not in self.taken:
                self.taken[key] = None
                while len(self.taken) > REMEMBERED_KEYS:
                    self.taken.popitem(last=False)
            held = self.held.pop(key, None)
            if held is not None:
                self.held_bytes -= held.size_bytes
                released += 1
        self.released += released
        outcomes = body.get("outcomes") if self.mode is Mode.HOLD else None   # (ACK: each call's core answers)
        for key, rec in (outcomes.items() if isinstance(outcomes, Mapping) else ()):
            done = outcome_of(key, rec)
            if done is not None:
                remember_newest(self.outcomes, key, {"topic": rec.get("topic"), "done": done}, REMEMBERED_OUTCOMES)
        return released

    def answer(self, topic: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The ``cmd.done`` for a re-send of a command whose outcome is known (the rules above),
        or None. The broker asks only while no realtime process is there to answer it; in
        :attr:`Mode.ACK` (``engine phone``: each call's core answers, ids are per call) never."""
        cmd_id = body.get("id")
        if not isinstance(cmd_id, str) or topic not in COMMAND_TOPICS:
            return None
        rec = self.outcomes.get(cmd_id)
        if rec is None:
            return None
        first = rec["topic"]
        if first is not None and first != topic:
            return {"id": cmd_id, "ok": False, "error": id_reused_error(cmd_id, first, topic), "code": "id_reused"}
        return {**rec["done"], "repeated": True}

    def handover(self, now_s: float) -> list[list[bytes]]:
        """Every held command's frames, in the order they came (marked as offered now)."""
        for held in self.held.values():
            held.offered_s = now_s
        return [h.frames for h in self.held.values()]

    def due(self, now_s: float) -> list[list[bytes]]:
        """The held commands offered :data:`REOFFER_S` ago or longer and still not taken (marked offered now)."""
        out = []
        for held in self.held.values():
            if now_s - held.offered_s >= REOFFER_S:
                held.offered_s = now_s
                out.append(held.frames)
        return out

    def next_due(self) -> float | None:
        """When :meth:`due` next has something (monotonic seconds), or None when nothing is held."""
        return min(h.offered_s for h in self.held.values()) + REOFFER_S if self.held else None
