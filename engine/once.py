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
from typing import Any, Callable, Mapping

#: outcomes remembered (the oldest forgotten first)
REMEMBERED = 1024


class AnsweredOnce:
    """A service's ``cmd.done`` for the commands it answers itself, each carried out once by id."""

    def __init__(self, publish: Callable[[str, dict[str, Any]], None], remembered: int = REMEMBERED) -> None:
        self.publish = publish
        self.remembered = remembered
        self._outcomes: OrderedDict[str, dict[str, Any] | None] = OrderedDict()   #: id -> cmd.done, None: running

    def first(self, body: Mapping[str, Any]) -> bool:
        """Whether to carry the command out: not a copy (a copy of one done gets its outcome again,
        ``repeated``; a copy of one still running gets nothing: its outcome is on its way)."""
        cmd_id = body.get("id")
        if not isinstance(cmd_id, str) or not cmd_id:
            return True
        if cmd_id in self._outcomes:
            done = self._outcomes[cmd_id]
            if done is not None:
                self.publish("cmd.done", {**done, "repeated": True})
            return False
        self._outcomes[cmd_id] = None
        while len(self._outcomes) > self.remembered:
            self._outcomes.popitem(last=False)
        return True

    def answer(self, body: Mapping[str, Any], ok: bool, **extra: Any) -> None:
        """The command's outcome on ``cmd.done`` (none for a command without an id), kept for its copies."""
        cmd_id = body.get("id")
        if not cmd_id:
            return
        done = {"id": cmd_id, "ok": ok, **extra}
        if isinstance(cmd_id, str) and cmd_id in self._outcomes:
            self._outcomes[cmd_id] = done
        self.publish("cmd.done", done)
