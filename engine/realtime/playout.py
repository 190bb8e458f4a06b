"""Playout: the model's audio items in the speaker ring, what the listener heard of them, and
barge-in (interrupt, then truncate at what was heard). Pure: no I/O; the heard index and the
clock come in as arguments, playback's reports as :class:`PlaybackReport` records.

Rules:
- Frames are samples of the session's audio format (``Playout(audio_format=...)``): PCM16 24 kHz
  (2 bytes, 24 per ms) by default, G.711 µ-law/A-law 8 kHz (1 byte, 8 per ms) for phone calls.
- The core counts every frame it hands to the speaker ring (``frames_written``, the ring's
  index space). Each assistant item is one stream in the ring: it starts where the previous
  one ended (``Play(starts_item=True)``) and ends at its ``output_audio.done`` (``EndOfAudio``).
  So a ring index names one item, with no help from the playback process.
- An item is *audible* while it is RECEIVING or RECEIVED and the heard index is short of its
  end. Only audible items are interrupted: an item whose stream playback reported stopped at
  or past its end is PLAYED, and a finished reply is never flushed or truncated.
- An interrupt flushes the ring once and moves every audible item to INTERRUPTING. The
  truncation waits for ``playback.flushed`` (the index the listener will have heard when the
  fade ends); without it within ``TRUNCATE_WAIT_S`` it uses the estimate taken at the
  interrupt. Each item is truncated at what was heard of it, clamped to what was received
  (0 for an item nobody heard yet, so the model's context holds only what was heard).
- Deltas of an interrupted response are dropped.

Item states and transitions (anything else is refused with :class:`PlayoutError`):

    RECEIVING --audio done--> RECEIVED
    RECEIVING/RECEIVED --stream stopped at or past its end--> PLAYED
    RECEIVING/RECEIVED --interrupt--> INTERRUPTING --flushed report or deadline--> TRUNCATED
    RECEIVING --socket lost--> RECEIVED (what arrived plays out)
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from engine.errors import EngineError
from engine.realtime.records import FRAMES_PER_MS, PCM16, AudioFormat

#: how long a barge-in's truncation waits for playback to report what was really played
TRUNCATE_WAIT_S = 0.25
#: items remembered (older ones are final and forgotten)
KEEP_ITEMS = 64


class PlayoutError(EngineError):
    """An illegal transition of an item (a bug or an out-of-order event); the item is left as it was."""


class ItemState(enum.Enum):
    RECEIVING = "receiving"
    RECEIVED = "received"
    PLAYED = "played"
    INTERRUPTING = "interrupting"
    TRUNCATED = "truncated"


TRANSITIONS: dict[ItemState, frozenset[ItemState]] = {
    ItemState.RECEIVING: frozenset({ItemState.RECEIVED, ItemState.PLAYED, ItemState.INTERRUPTING}),
    ItemState.RECEIVED: frozenset({ItemState.PLAYED, ItemState.INTERRUPTING}),
    ItemState.INTERRUPTING: frozenset({ItemState.TRUNCATED}),
    ItemState.PLAYED: frozenset(),
    ItemState.TRUNCATED: frozenset(),
}


@dataclass
class PlayedItem:
    item_id: str
    response_id: str
    start_index: int                   #: ring index of the item's first frame
    frames: int = 0                    #: frames received (and written)
    state: ItemState = ItemState.RECEIVING
    interrupted_at_s: float = 0.0      #: when the barge-in was taken
    estimate_ms: int = 0               #: heard, by the heard index at the interrupt
    deadline_s: float = 0.0            #: truncate at the estimate after this
    reason: str = ""
    played_ms: int | None = None       #: final: what the listener heard
    frames_per_ms: int = FRAMES_PER_MS #: of the session's audio format (24 for PCM16, 8 for G.711)

    @property
    def end_index(self) -> int:
        return self.start_index + self.frames

    def heard_ms(self, heard_index: int) -> int:
        """Milliseconds of this item heard at ``heard_index``, clamped to what was received."""
        return int(max(0, min(heard_index - self.start_index, self.frames)) // self.frames_per_ms)

    def move(self, to: ItemState) -> None:
        if to not in TRANSITIONS[self.state]:
            raise PlayoutError(f"item {self.item_id}: {self.state.value} -> {to.value} is not a transition")
        self.state = to


@dataclass(frozen=True)
class Truncation:
    """An interrupted item's final heard length: the core sends ``conversation.item.truncate``."""
    item: PlayedItem
    played_ms: int
    measured: bool                     #: by playback's report (else the estimate)


class Playout:
    def __init__(self, start_index: int = 0, audio_format: AudioFormat = PCM16) -> None:
        self.format = audio_format    #: frames are samples of this format (PCM16 24 kHz, or G.711 8 kHz bytes)
        self.frames_written = start_index
        self.items: dict[str, PlayedItem] = {}
        self.dropped_responses: set[str] = set()
        self._carry = b""              #: half a sample left over from the last delta

    # ------------------------------------------------------------ audio in
    def take_delta(self, response_id: str, item_id: str, pcm: bytes) -> tuple[bytes, bool] | None:
        """Account for one audio delta. Returns ``(pcm to write, starts a new item)`` or None when
        the response's audio is no longer played (interrupted)."""
        if response_id in self.dropped_responses:
            return None
        item = self.items.get(item_id)
        if item is not None and item.state not in (ItemState.RECEIVING, ItemState.RECEIVED):
            return None
        if self._carry:
            pcm = self._carry + pcm
            self._carry = b""
        width = self.format.bytes_per_frame
        if len(pcm) % width:
            cut = len(pcm) - len(pcm) % width
            self._carry, pcm = pcm[cut:], pcm[:cut]
        starts = item is None
        if item is None:
            item = PlayedItem(item_id, response_id, self.frames_written, frames_per_ms=self.format.frames_per_ms)
            self.items[item_id] = item
            self._forget_old()
        frames = len(pcm) // width
        item.frames += frames
        self.frames_written += frames
        return pcm, starts

    def audio_done(self, item_id: str) -> bool:
        """The item's audio is complete; True when it was playing (its stream gets an end mark)."""
        item = self.items.get(item_id)
        self._carry = b""
        if item is None or item.state is not ItemState.RECEIVING:
            return False
        item.move(ItemState.RECEIVED)
        return True

    def socket_lost(self) -> bool:
        """The socket closed mid-item: what arrived plays out. True when a stream needs its end mark."""
        self._carry = b""
        open_items = [i for i in self.items.values() if i.state is ItemState.RECEIVING]
        for item in open_items:
            item.move(ItemState.RECEIVED)
        return bool(open_items)

    def _forget_old(self) -> None:
        while len(self.items) > KEEP_ITEMS:
            oldest = next(iter(self.items))
            if self.items[oldest].state in (ItemState.RECEIVING, ItemState.RECEIVED, ItemState.INTERRUPTING):
                break
            del self.items[oldest]

    # ------------------------------------------------------------ where the listener is
    def item_at(self, index: int) -> PlayedItem | None:
        """The item whose audio holds ring ``index`` (the latest one starting at or before it)."""
        best: PlayedItem | None = None
        for item in self.items.values():
            if item.start_index <= index and (best is None or item.start_index >= best.start_index):
                best = item
        return best

    def item_starting_at(self, start_index: int) -> PlayedItem | None:
        return next((i for i in self.items.values() if i.start_index == start_index and i.frames), None)

    def audible(self, heard_index: int) -> list[PlayedItem]:
        """Items still to be heard (in ring order)."""
        return sorted((i for i in self.items.values()
                       if i.state in (ItemState.RECEIVING, ItemState.RECEIVED) and heard_index < i.end_index),
                      key=lambda i: i.start_index)

    def stream_stopped(self, index: int) -> list[PlayedItem]:
        """Playback's stream ended with the listener at ``index``: the items wholly heard are PLAYED."""
        done = [i for i in self.items.values()
                if i.state in (ItemState.RECEIVING, ItemState.RECEIVED) and i.frames and index >= i.end_index]
        for item in done:
            item.move(ItemState.PLAYED)
        return done

    # ------------------------------------------------------------ barge-in
    def interrupt(self, response_id: str | None, heard_index: int, now_s: float, reason: str) -> list[PlayedItem]:
        """Stop what is audible. Returns the items now INTERRUPTING (empty: nothing to flush).
        ``response_id``: the active response, whose later deltas are dropped too."""
        audible = self.audible(heard_index)
        if response_id is not None:
            self.dropped_responses.add(response_id)
        for item in audible:
            item.move(ItemState.INTERRUPTING)
            item.interrupted_at_s = now_s
            item.estimate_ms = item.heard_ms(heard_index)
            item.deadline_s = now_s + TRUNCATE_WAIT_S
            item.reason = reason
            self.dropped_responses.add(item.response_id)
        self._carry = b""
        return audible

    def flushed(self, index: int) -> list[Truncation]:
        """Playback's report: when the fade ends the listener will have heard up to ``index``."""
        return [self._truncate(i, i.heard_ms(index), True) for i in self._interrupting()]

    def overdue(self, now_s: float) -> list[Truncation]:
        """Interrupted items whose report did not come in time: truncated at the estimate."""
        return [self._truncate(i, i.estimate_ms, False) for i in self._interrupting() if now_s >= i.deadline_s]

    def _interrupting(self) -> list[PlayedItem]:
        return [i for i in self.items.values() if i.state is ItemState.INTERRUPTING]

    def _truncate(self, item: PlayedItem, played_ms: int, measured: bool) -> Truncation:
        item.move(ItemState.TRUNCATED)
        item.played_ms = played_ms
        return Truncation(item, played_ms, measured)

    def next_deadline(self) -> float | None:
        due = [i.deadline_s for i in self._interrupting()]
        return min(due) if due else None

    def snapshot(self) -> dict[str, Any]:
        return {"frames_written": self.frames_written,
                "items": {k: v.state.value for k, v in list(self.items.items())[-8:]}}
