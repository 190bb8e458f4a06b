"""Which protocol core drives a link, and how its protocol carries input audio. Pure.

A backend pairs a voice API's protocol core (events in, actions out: ``handle(record, now_s,
heard_index) -> actions`` over :mod:`engine.realtime.records`) with the little the shell must know
of its wire: the client event that carries input audio, and how long the API keeps a session.
A second protocol (GPT-Live) is one more :class:`Backend` with its own core beside
:class:`~engine.realtime.core.RealtimeCore`, chosen by model in :func:`backend_for`.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from engine.link.policy import SESSION_RECYCLE_S
from engine.cost import is_live_model
from engine.realtime.core import RealtimeCore
from engine.realtime.live_core import LiveCore
from engine.realtime.records import Action, Input


class ProtocolCore(Protocol):
    """What the link and its hosts (the realtime process, a phone call) need of a protocol core.
    Pure: it does no I/O and never raises from ``handle``."""

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation so far, as the client items a new session is given."""
    #: error events the API sent (not the benign ones)
    errors: int
    #: the registered tools and the model's open calls (``tools.calls``: call id -> call)
    tools: Any

    def handle(self, rec: Input, now_s: float, heard_index: int) -> list[Action]: ...

    def next_deadline(self) -> float | None:
        """When a ``Tick`` next has work (monotonic seconds), or None."""

    def at_turn_boundary(self) -> bool:
        """Nothing in progress: a socket may be recycled now without losing anything."""

    @property
    def protocol_refused(self) -> bool:
        """The peer speaks a protocol this core refuses: reconnecting cannot help."""

    @property
    def ending(self) -> bool:
        """After ``Ending``: a session close is out whose answer brings the last figures."""

    def restore_history(self, body: Any) -> list[Action]:
        """Take a predecessor's conversation (``conversation.history``) after a crash."""

    def restore_outcomes(self, outcomes: Any) -> None:
        """Take a predecessor's command outcomes (the broker's hand-over) after a crash."""

    def state_messages(self) -> list[Action]:
        """The core's last-value topics, to publish again (a restarted broker's cache is empty)."""

    def total_usd(self) -> float: ...


@dataclass(frozen=True)
class Backend:
    name: str
    #: the client event whose ``audio`` field carries input audio, base64
    audio_event: str
    #: builds the core: ``make_core(model, session_config, *, start_index, barge_in, min_speech_ms,
    #: budget_usd, audio_format)``
    make_core: Callable[..., ProtocolCore]
    #: recycle a session this old at a quiet moment (before the API's own limit)
    session_recycle_s: float = SESSION_RECYCLE_S

    def audio_append(self, pcm: bytes) -> str:
        """The client event that appends ``pcm`` (the session's audio format) to the input, as the
        text frame to send: built here only, by hand (no dict, no json.dumps: 50 a second)."""
        return '{"type":"' + self.audio_event + '","audio":"' + base64.b64encode(pcm).decode("ascii") + '"}'

    def recycle_after_s(self, configured_s: float | None) -> float:
        """How old a session is recycled: ``session_recycle_s`` from the config for an API that
        closes sessions at an age (Realtime), never for one that renews its own (GPT-Live)."""
        if self.session_recycle_s == float("inf"):
            return self.session_recycle_s
        return float(configured_s or self.session_recycle_s)

    def core(self, model: str, session_config: Any, **options: Any) -> ProtocolCore:
        return self.make_core(model, session_config, **options)


#: OpenAI's Realtime API (GA protocol), ``/v1/realtime``: closes a session at 60 minutes
REALTIME = Backend("realtime", "input_audio_buffer.append", RealtimeCore)
#: OpenAI's GPT-Live, ``/v1/live/sessions``: a session expires by itself (``session.closed`` ``expired``,
#: which the core renews), so the link does not recycle it by age
LIVE = Backend("live", "session.input_audio.append", LiveCore, session_recycle_s=float("inf"))
BACKENDS = {b.name: b for b in (REALTIME, LIVE)}


def backend_for(model: str) -> Backend:
    """The backend that speaks to ``model``: GPT-Live models (``gpt-live-*``) their own protocol,
    every other model Realtime's."""
    return LIVE if is_live_model(model) else REALTIME
