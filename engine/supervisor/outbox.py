"""The supervisor's own events (``engine.status``, ``child_exited``, ``mic_dropped``): into the
event log at once, and onto the bus while the broker forwards, held while it does not.

Rules:
- Every own event is logged when it is emitted, with its header; on the bus it goes out at once
  when the broker is up and nothing is held before it, so the bus never reorders them.
- The broker is *down* from its spawn (a start or a restart) until the supervisor's probe
  (``_join.supervisor.<pid>``) comes back through it; meanwhile the probe is sent every round.
- A held event goes out :data:`HELD_DELAY_S` after the broker is back (the other subscribers
  reconnect too: ZeroMQ retries every 100 ms), marked ``held: true``, in order.
- A state message (``hold`` false: ``engine.status``) that cannot go now is dropped: the next one
  supersedes it.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from bus import Publisher

HELD_DELAY_S = 0.5   # after the broker is back, held events wait this long for subscribers to reconnect


class Outbox:
    """The supervisor's publisher, with the rules above. ``log`` writes one event-log line."""

    def __init__(self, pub: Publisher, log: Callable[[str, dict[str, Any]], None]) -> None:
        self.pub = pub
        self._log = log
        self.up = False                         #: the broker forwards our messages (our probe came back)
        self.probe_topic = f"_join.supervisor.{os.getpid()}"
        self._held: list[tuple[str, dict[str, Any]]] = []
        self._held_due = 0.0

    def emit(self, topic: str, payload: dict[str, Any], *, hold: bool = True) -> None:
        """One own event: logged now; on the bus now, held, or (``hold`` false) dropped."""
        header = {"v": 1, "ts": time.time(), "mono_ns": time.monotonic_ns(), "pub": self.pub.name}
        if self.up and not self._held:
            self.pub.publish(topic, payload)
            self._log(topic, {**header, "seq": self.pub.seq, **payload})
        else:
            self._log(topic, {**header, "seq": None, "held": hold, **payload})
            if hold:
                self._held.append((topic, payload))

    def broker_down(self) -> None:
        """The broker was (re)spawned or is gone: hold until the probe comes back."""
        self.up = False

    def joined(self, topic: str) -> bool:
        """A ``_join.*`` message came through the broker; True if it was our probe and the broker is
        back (what was held goes out :data:`HELD_DELAY_S` later)."""
        if topic != self.probe_topic or self.up:
            return False
        self.up = True
        self._held_due = time.monotonic() + HELD_DELAY_S
        return True

    def round(self, now: float) -> None:
        """Each loop round: probe a broker that is down, or send what is held once it is due."""
        if not self.up:
            self.pub.publish(self.probe_topic)  # comes back once the broker forwards again
        elif self._held and now >= self._held_due:
            for topic, payload in self._held:
                self.pub.publish(topic, {**payload, "held": True})
            self._held.clear()
