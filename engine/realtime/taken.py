"""Each command taken once and carried out by its handler, shared by the Realtime and GPT-Live
cores. Pure: no I/O.

Rules:
- ``cmd.ack`` and ``cmd.done`` are the engine's own answers: never commands.
- A command with no key (no id and no header to name it by) is carried out as it comes.
- A command whose key was taken already (the broker's hand-over of what also came live, a
  client's re-send) is only said taken again (``intake.taken``), so the broker lets it go. A
  sender's re-send of a command whose outcome is known also gets that ``cmd.done`` again, with
  ``repeated: true``: a client that missed it (its subscriber joined the bus late, or it sent
  again after a timeout) is not left waiting. The broker's copies get none (the sender is
  waiting for nothing they could answer). Outcomes are remembered for the last ``SEEN_IDS``
  command ids. Each new one also goes on ``intake.taken`` (``outcomes``: id -> ``topic``, the
  command's, and ``done``, its ``cmd.done``), whose signed copy the broker keeps: it answers a
  re-send itself while no realtime process is there, and hands them to a successor with the
  state (:meth:`TakesCommandsOnce.restore_outcomes`), which answers as its predecessor would have.
- An id a sender used before for a command of another topic is a mistake, not a re-send: that
  command is not carried out, and it is reported once (``engine.error`` ``id_reused``, and its
  ``cmd.done`` ``ok: false``) naming the topic that took the id, so the sender is not left with
  a silent ``taken``.
- Otherwise it is carried out; then the broker learns it was taken: by the state message when
  it changed what a successor starts from (the state is safe before the broker lets it go), else
  by ``intake.taken``.
- At most ``SEEN_IDS`` keys are remembered, the oldest forgotten first.
- A command is carried out by the core's handler for its topic. A malformed one (a bad id, no
  handler, a field a handler refuses with ValueError, TypeError or KeyError) is counted and
  reported once on ``engine.error``, and on ``cmd.done`` ``ok: false`` ``code: bad_command`` when
  it has an id; a ``cmd.*`` topic the bus does not know, with a good id, was refused by the
  broker's intake on its ``cmd.ack`` already, so it is only counted.
- A value a command hands on to the API (a session, a tool's parameters, response options, a
  tool's output) must be one JSON can carry (:func:`check_json`): text, finite numbers, true,
  false, null, lists and maps with text keys. msgpack's binary, a NaN or a map with a binary key
  is refused at once, naming where it is; the API events are JSON, so it could never be sent.
- A handler that raises anything else (a bug) fails its command all the same
  (:meth:`TakesCommandsOnce._command_failed`): ``cmd.done`` ``ok: false`` ``code: handler_failed``
  for a command with an id, and its key on ``intake.taken``, so no sender waits for ever and the
  broker does not offer it again.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any, Callable, Mapping

from bus.wire import (ACK_TOPIC, COMMAND_TOPICS, DONE_TOPIC, STATE_TOPIC, TAKEN_TOPIC, command_key, id_problem,
                      id_reused_error, outcome_of, remember_newest)
from bus.wire import MAX_DEPTH
from engine.realtime.records import Action, Publish
from engine.realtime.requests import SEEN_IDS


#: nesting a value handed on to the API may have (a JSON schema needs a few levels, not hundreds):
#: the engine's own messages carry it some levels deeper (``conversation.history`` -> ``tools`` ->
#: a tool -> ``parameters``), and the bus refuses bodies over MAX_DEPTH, so leave room for them
JSON_DEPTH_MAX = MAX_DEPTH - 8


def json_problem(value: Any) -> str | None:
    """Where ``value`` holds something a JSON client event cannot carry, and what (``a.b[2]: bytes``);
    None when JSON can carry all of it (text, finite numbers, booleans, null, lists, maps with text
    keys, at most :data:`JSON_DEPTH_MAX` deep). Iterative: no recursion limit to meet."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, at, depth = stack.pop()
        if item is None or isinstance(item, (str, bool, int)):
            continue
        where = at or "the value"
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{where}: the number {item!r}, which JSON cannot carry"
            continue
        if depth >= JSON_DEPTH_MAX and isinstance(item, (list, tuple, dict)):
            return f"{where}: nested deeper than {JSON_DEPTH_MAX} levels"
        if isinstance(item, (list, tuple)):
            stack.extend((v, f"{at}[{i}]", depth + 1) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            for k in item:
                if not isinstance(k, str):
                    return f"{where}: a map key of type {type(k).__name__} ({k!r:.40}); keys must be text"
            stack.extend((v, f"{at}.{k}" if at else str(k), depth + 1) for k, v in reversed(list(item.items())))
        else:
            return f"{where}: a value of type {type(item).__name__}, which JSON cannot carry"
    return None


def check_json(value: Any, field: str) -> None:
    """ValueError naming ``field`` (``cmd.session.update 'session'``) and where in it, unless JSON
    can carry ``value`` (:func:`json_problem`)."""
    problem = json_problem(value)
    if problem is not None:
        raise ValueError(f"{field} holds {problem}: send only text, numbers, true/false, null, lists and maps "
                         "with text keys (binary data as base64 text)")


def json_text(value: Any, field: str) -> str:
    """``value`` as JSON text (a string as it is); ValueError naming ``field`` when JSON cannot carry it."""
    if isinstance(value, str):
        return value
    check_json(value, field)
    return json.dumps(value)


#: a core's command handler: (body, now_s, heard index) -> actions; raises ValueError (or
#: TypeError, KeyError) naming what is wrong with the body
Handler = Callable[[Mapping[str, Any], float, int], "list[Action]"]


class TakesCommandsOnce:
    """Mixed into a core, which provides ``_commands`` (topic -> handler), ``malformed_commands``
    (a count), ``_no_handler`` (the problem with a topic it has no handler for),
    ``_durable_mark`` (changes when the state a successor starts from changes) and
    ``history_message`` (that state, to publish)."""

    #: keys of the commands taken -> the topic that took each (None: known by key only, from a state)
    taken: OrderedDict[str, str | None]
    #: command id -> its ``cmd.done``, for a sender's re-send (the rules above)
    outcomes: OrderedDict[str, Mapping[str, Any]]
    _commands: dict[str, Handler]
    malformed_commands: int

    def _no_handler(self, topic: str) -> str:
        raise NotImplementedError

    def _durable_mark(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def history_message(self) -> Publish:
        raise NotImplementedError

    def _command(self, topic: str, body: Mapping[str, Any], now_s: float, heard: int,
                 offered: bool = False) -> list[Action]:
        """A command, taken once (the rules above); ``offered``: the broker's copy."""
        if topic in (ACK_TOPIC, DONE_TOPIC):
            return []
        key = command_key(body) if topic.startswith("cmd.") else None
        if key is None:
            return self._carry_out(topic, body, now_s, heard)
        if key in self.taken:
            acts: list[Action] = [Publish(TAKEN_TOPIC, {"taken": [key]})]
            first_topic = self.taken[key]
            if not offered and first_topic is not None and first_topic != topic:
                self.malformed_commands += 1
                why = id_reused_error(key, first_topic, topic)
                return acts + [Publish("engine.error", {"source": "bus", "code": "id_reused", "topic": topic,
                                                        "id": key, "message": why}),
                               Publish(DONE_TOPIC, {"id": key, "ok": False, "error": why, "code": "id_reused"})]
            outcome = None if offered else self.outcomes.get(key)
            if outcome is not None:
                acts.append(Publish(DONE_TOPIC, {**outcome, "repeated": True}))
            return acts
        self._mark_taken(key, topic)
        before = self._durable_mark()
        acts = self._carry_out(topic, body, now_s, heard)
        if any(isinstance(a, Publish) and a.topic == STATE_TOPIC for a in acts):
            return acts                                   # the state with this key went out already
        if self._durable_mark() != before:
            return acts + [self.history_message()]        # what it changed is safe before the broker lets it go
        return acts + [Publish(TAKEN_TOPIC, {"taken": [key]})]   # it changed nothing a successor needs

    def _carry_out(self, topic: str, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """One command to its handler; a malformed one reported (the rules above)."""
        cmd_id = body.get("id")
        handler = self._commands.get(topic)
        if topic.startswith("cmd.") and topic not in COMMAND_TOPICS and id_problem(body) is None \
                and isinstance(cmd_id, str):
            # the broker's intake refused it on its cmd.ack, naming the known topics: one report, not two
            self.malformed_commands += 1
            return []
        try:
            problem = id_problem(body) if topic.startswith("cmd.") else None
            if problem is not None:
                cmd_id = None
                raise ValueError(problem)
            if handler is None:
                raise ValueError(self._no_handler(topic))
            return handler(body, now_s, heard)
        except (ValueError, TypeError, KeyError) as exc:
            self.malformed_commands += 1
            acts: list[Action] = [Publish("engine.error", {"source": "bus", "code": "bad_command", "topic": topic,
                                                           "id": cmd_id, "message": str(exc)})]
            if cmd_id:
                acts.append(Publish(DONE_TOPIC, {"id": cmd_id, "ok": False, "error": str(exc), "code": "bad_command"}))
            return acts

    def _command_failed(self, topic: str, body: Mapping[str, Any], message: str) -> list[Action]:
        """A command whose handler raised past its checks (the core's catch-all reports the error):
        ``cmd.done`` ``ok: false`` ``code: handler_failed`` for one with an id, and its key let go
        (``intake.taken``), so neither its sender nor the broker waits on it. Nothing for a command
        that was not taken (no key) or a bus message that is not a command."""
        key = command_key(body) if topic.startswith("cmd.") and topic not in (ACK_TOPIC, DONE_TOPIC) else None
        if key is None or key not in self.taken:
            return []
        acts: list[Action] = [Publish(TAKEN_TOPIC, {"taken": [key]})]
        cmd_id = body.get("id")
        if isinstance(cmd_id, str) and cmd_id == key:
            acts.append(Publish(DONE_TOPIC, {"id": cmd_id, "ok": False, "code": "handler_failed", "error": message}))
        return acts

    def _done_in_flight(self, ids: Any, topic: str, applied: str) -> tuple[list[Action], list[str]]:
        """A predecessor's commands of ``topic`` it had sent on and never seen confirmed: taken, and
        done with ``applied`` (what they changed is in the state the next session starts from),
        unless their outcome is known already. The ``cmd.done``s, and the ids answered."""
        acts: list[Action] = []
        answered: list[str] = []
        for cmd_id in ids if isinstance(ids, list) else []:
            if isinstance(cmd_id, str) and cmd_id and cmd_id not in self.outcomes:
                self._mark_taken(cmd_id, topic)
                acts.append(Publish(DONE_TOPIC, {"id": cmd_id, "ok": True, "applied": applied}))
                answered.append(cmd_id)
        return acts, answered

    def _ack(self, body: Mapping[str, Any], **extra: Any) -> list[Action]:
        """The command's outcome: carried out (``cmd.done`` ``ok``)."""
        return [Publish(DONE_TOPIC, {"id": body["id"], "ok": True, **extra})] if body.get("id") else []

    def _note_outcomes(self, acts: list[Action]) -> list[Action]:
        """Remember the outcome of each command taken that these actions publish (``cmd.done``);
        ``acts`` with those outcomes on ``intake.taken`` (the last one in ``acts``, else one more)."""
        new: dict[str, dict[str, Any]] = {}
        for act in acts:
            if isinstance(act, Publish) and act.topic == DONE_TOPIC:
                cmd_id = act.payload.get("id")
                if isinstance(cmd_id, str) and cmd_id in self.taken and not act.payload.get("repeated") \
                        and act.payload.get("code") != "id_reused":   # that one answers another command
                    remember_newest(self.outcomes, cmd_id, act.payload, SEEN_IDS)
                    new[cmd_id] = {"topic": self.taken[cmd_id], "done": act.payload}
        if not new:
            return acts
        at = max((i for i, a in enumerate(acts) if isinstance(a, Publish) and a.topic == TAKEN_TOPIC), default=-1)
        was = acts[at] if at >= 0 else None
        if not isinstance(was, Publish):
            return acts + [Publish(TAKEN_TOPIC, {"taken": list(new), "outcomes": new})]
        # that intake.taken is this step's own: rebuilt with the outcomes, not changed in place
        merged = {"taken": list(dict.fromkeys([*was.payload.get("taken", []), *new])),
                  "outcomes": {**was.payload.get("outcomes", {}), **new}}
        return acts[:at] + [Publish(TAKEN_TOPIC, merged)] + acts[at + 1:]

    def restore_outcomes(self, outcomes: Any) -> None:
        """The outcomes a predecessor published (the broker's hand-over: id -> ``topic``, ``done``),
        each command marked taken by its topic; an odd entry is skipped. Call it before
        ``restore_history``: the state's keys (its latest) then stay the newest taken."""
        for key, rec in (outcomes.items() if isinstance(outcomes, Mapping) else ()):
            done = outcome_of(key, rec)
            if done is None or key in self.outcomes:
                continue
            if key not in self.taken:
                self._mark_taken(key, rec.get("topic"))   # (outcome_of checked it: a str or None)
            remember_newest(self.outcomes, key, done, SEEN_IDS)

    def _mark_taken(self, key: str, topic: str | None = None) -> None:
        """``key`` taken by a ``topic`` command (None: the topic it is known by, if any), the newest."""
        remember_newest(self.taken, key, topic if topic is not None else self.taken.get(key), SEEN_IDS)
