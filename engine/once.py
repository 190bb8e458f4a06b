"""Commands a service carries out itself, each once by its ``id``.

A client sends a command again while it waits for the outcome (bus.aio: a ``cmd.done`` can be
lost with a broker that crashed). The realtime cores take each command once (engine.realtime.taken);
a service that answers some commands itself (engine sip's transfer and hang-up, a tool registered
for every call in engine phone and engine sip) does the same with :class:`AnsweredOnce`: a copy of
a command still being carried out is dropped, a copy of one done gets its outcome again with
``repeated: true``. A command without an ``id`` is carried out each time it comes. Pure.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

#: outcomes remembered (the oldest forgotten first)
REMEMBERED = 1024


class AnsweredOnce:
    def __init__(self, remembered: int = REMEMBERED) -> None:
        self.remembered = remembered
        self._outcomes: OrderedDict[str, dict[str, Any] | None] = OrderedDict()   #: id -> cmd.done, None: running

    def take(self, body: Mapping[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        """(carry it out?, the ``cmd.done`` to publish again for a copy of one done, else None)."""
        cmd_id = body.get("id")
        if not isinstance(cmd_id, str) or not cmd_id:
            return True, None
        if cmd_id in self._outcomes:
            done = self._outcomes[cmd_id]
            return False, (None if done is None else {**done, "repeated": True})
        self._outcomes[cmd_id] = None
        while len(self._outcomes) > self.remembered:
            self._outcomes.popitem(last=False)
        return True, None

    def done(self, outcome: Mapping[str, Any]) -> None:
        """A command's ``cmd.done`` went out: a copy of it gets it again."""
        cmd_id = outcome.get("id")
        if isinstance(cmd_id, str) and cmd_id in self._outcomes:
            self._outcomes[cmd_id] = dict(outcome)
