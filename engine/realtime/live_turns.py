"""GPT-Live transcripts grouped into turns. Pure: no I/O.

GPT-Live sends transcripts as timed fragments (``session.input_transcript.delta`` for the user,
``session.output_transcript.delta`` for the model), each with ``start_ms`` / ``end_ms`` on the
session timeline and its own leading space, with no item, turn or done event. Grouping them is
the client's job (live-protocol.md §6.3); this module does it.

Rules:
- Each speaker has at most one open turn; in full duplex both can be open at once.
- Each speaker has its silence: the user's is ``gap_ms`` (800 ms, as pipecat), the model's
  ``model_silence_ms`` (2,000 ms, the SDK grouper's ``assistant_silence_ms``: a model pauses
  mid-reply, on a long word or between sentences, and one reply is one turn).
- A fragment opens a turn for its speaker when none is open, or when it starts more than its
  speaker's silence of timeline after the open turn's last fragment ended (that turn is closed
  first, reason ``gap``).
- A turn with no fragment for its speaker's silence of wall-clock time is closed (reason
  ``inactivity``): silence produces no fragments, so only the clock can end a turn nobody continues.
- A turn ends on ``close_all`` (reason ``session_closed`` or ``disconnected``) too.
- Fragments are concatenated as they come; a turn's text is stripped only when it closes.
- Every open and close is returned as a :class:`TurnEvent`; the caller publishes them. Closing
  never raises and never loses text.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

#: pipecat closes a Live turn after 0.8 s without fragments (fragments land on a 200 ms grid)
TURN_GAP_MS = 800
#: the SDK's TranscriptGrouper closes the assistant's segment after 2 s of silence (``assistant_silence_ms``)
MODEL_SILENCE_MS = 2000


class Speaker(enum.Enum):
    USER = "user"
    MODEL = "model"


@dataclass
class Turn:
    turn_id: str
    speaker: Speaker
    start_ms: int
    end_ms: int
    last_fragment_at_s: float
    fragments: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.fragments).strip()


@dataclass(frozen=True)
class TurnEvent:
    """``kind``: ``opened``, ``fragment`` or ``closed``; ``reason`` for a close."""
    kind: str
    turn: Turn
    fragment: str = ""
    reason: str = ""


class TurnGrouper:
    """Open turns by speaker; ``fragment()`` and ``overdue()`` return what happened."""

    def __init__(self, new_id: Callable[[str], str], gap_ms: int = TURN_GAP_MS,
                 model_silence_ms: int = MODEL_SILENCE_MS) -> None:
        self.new_id = new_id
        self.gap_ms = gap_ms
        self.silence_ms = {Speaker.USER: gap_ms, Speaker.MODEL: model_silence_ms}
        self.open: dict[Speaker, Turn] = {}

    def fragment(self, speaker: Speaker, text: str, start_ms: int, end_ms: int, now_s: float) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        turn = self.open.get(speaker)
        if turn is not None and start_ms - turn.end_ms > self.silence_ms[speaker]:
            events.append(self._close(turn, "gap"))
            turn = None
        if turn is None:
            turn = Turn(self.new_id("turn"), speaker, start_ms, end_ms, now_s)
            self.open[speaker] = turn
            events.append(TurnEvent("opened", turn))
        turn.fragments.append(text)
        turn.end_ms = max(turn.end_ms, end_ms)
        turn.last_fragment_at_s = now_s
        events.append(TurnEvent("fragment", turn, fragment=text))
        return events

    def overdue(self, now_s: float) -> list[TurnEvent]:
        return [self._close(t, "inactivity") for t in list(self.open.values())
                if now_s - t.last_fragment_at_s >= self.silence_ms[t.speaker] / 1000]

    def close_all(self, reason: str) -> list[TurnEvent]:
        return [self._close(t, reason) for t in list(self.open.values())]

    def next_deadline(self) -> float | None:
        if not self.open:
            return None
        return min(t.last_fragment_at_s + self.silence_ms[t.speaker] / 1000 for t in self.open.values())

    def _close(self, turn: Turn, reason: str) -> TurnEvent:
        del self.open[turn.speaker]
        return TurnEvent("closed", turn, reason=reason)

