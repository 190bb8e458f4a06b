"""Each command taken once, shared by the Realtime and GPT-Live cores. Pure: no I/O.

Rules:
- ``cmd.ack`` and ``cmd.done`` are the engine's own answers: never commands.
- A command with no key (no id and no header to name it by) is carried out as it comes.
- A command whose key was taken already (the broker's hand-over of what also came live, a
  client's re-send) is only said taken again (``intake.taken``), so the broker lets it go.
- Otherwise it is carried out; then the broker learns it was taken: by the state message when
  it changed what a successor starts from (the state is safe before the broker lets it go), else
  by ``intake.taken``.
- At most ``SEEN_IDS`` keys are remembered, the oldest forgotten first.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

from bus.wire import ACK_TOPIC, DONE_TOPIC, STATE_TOPIC, TAKEN_TOPIC, command_key
from engine.realtime.records import Action, Publish
from engine.realtime.requests import SEEN_IDS


class TakesCommandsOnce:
    """Mixed into a core, which provides ``_carry_out``, ``_durable_mark`` (changes when the state
    a successor starts from changes) and ``history_message`` (that state, to publish)."""

    taken: OrderedDict[str, None]

    def _carry_out(self, topic: str, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        raise NotImplementedError

    def _durable_mark(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def history_message(self) -> Publish:
        raise NotImplementedError

    def _command(self, topic: str, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """A command, taken once (the rules above)."""
        if topic in (ACK_TOPIC, DONE_TOPIC):
            return []
        key = command_key(body) if topic.startswith("cmd.") else None
        if key is None:
            return self._carry_out(topic, body, now_s, heard)
        if key in self.taken:
            return [Publish(TAKEN_TOPIC, {"taken": [key]})]
        self._mark_taken(key)
        before = self._durable_mark()
        acts = self._carry_out(topic, body, now_s, heard)
        if any(isinstance(a, Publish) and a.topic == STATE_TOPIC for a in acts):
            return acts                                   # the state with this key went out already
        if self._durable_mark() != before:
            return acts + [self.history_message()]        # what it changed is safe before the broker lets it go
        return acts + [Publish(TAKEN_TOPIC, {"taken": [key]})]   # it changed nothing a successor needs

    def _mark_taken(self, key: str) -> None:
        self.taken[key] = None
        self.taken.move_to_end(key)
        while len(self.taken) > SEEN_IDS:
            self.taken.popitem(last=False)
