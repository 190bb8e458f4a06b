"""Turns: the order the conversation is told in, and how long each turn took. Pure: no I/O.

Rules:
- Transcript order. The API sends ``conversation.item.input_audio_transcription.completed``
  whenever transcription finishes, often after the reply has begun. A response created while a
  user turn's transcript is due holds its words (``model.text.*``, ``model.transcript.*``) until
  that transcript arrives, fails, or ``USER_TRANSCRIPT_WAIT_S`` passes; then they are released in
  their order. Subscribers read "user said X" before "model said Y".
- The input clock maps the server's input-buffer milliseconds (``audio_end_ms``) to local
  monotonic time: the mic sender reports each chunk it appended (frames, capture time of its last
  frame) and a new API session counts from zero again.
- Latency per response: from the user's speech end (or our ``response.create``) to the first
  delta, to the first sample at the device (playback's report), published once on ``latency.turn``
  when the response is done and, if it had audio, its first sample was played.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from engine.realtime.records import API_RATE_HZ, FRAMES_PER_MS, Publish

USER_TRANSCRIPT_WAIT_S = 3.0
MODEL_WORD_TOPICS = ("model.text.", "model.transcript.")
KEEP_TIMINGS = 32


class InputClock:
    """Input-buffer frames appended -> the capture time of their last frame (bounded)."""

    def __init__(self, chunks: int = 4096) -> None:
        self.ends_frames: deque[int] = deque(maxlen=chunks)
        self.captured_at_s: deque[float] = deque(maxlen=chunks)
        self.sent_frames = 0

    def appended(self, frames: int, captured_at_s: float) -> None:
        self.sent_frames += frames
        self.ends_frames.append(self.sent_frames)
        self.captured_at_s.append(captured_at_s)

    def reset(self) -> None:
        self.ends_frames.clear()
        self.captured_at_s.clear()
        self.sent_frames = 0

    def time_of(self, audio_ms: int) -> float | None:
        if not self.ends_frames:
            return None
        frame = audio_ms * FRAMES_PER_MS
        i = bisect.bisect_left(self.ends_frames, frame)
        if i >= len(self.ends_frames):
            return self.captured_at_s[-1] + (frame - self.ends_frames[-1]) / API_RATE_HZ
        return self.captured_at_s[i] - (self.ends_frames[i] - frame) / API_RATE_HZ


@dataclass
class TurnTiming:
    """When one response's milestones happened, in monotonic seconds."""
    response_id: str
    speech_end_at: float | None
    requested_at: float | None
    first_delta_at: float | None = None
    last_delta_at: float | None = None
    deltas: int = 0
    interval_sum_s: float = 0.0
    interval_sq_sum_s: float = 0.0
    interval_max_s: float = 0.0
    device_at: float | None = None
    output_latency_ms: float = 0.0
    audio: bool = False
    done: bool = False
    published: bool = False
    item_id: str | None = None    #: its first audio item

    def delta_arrived(self, now: float) -> None:
        if self.last_delta_at is not None:
            gap = now - self.last_delta_at
            self.interval_sum_s += gap
            self.interval_sq_sum_s += gap * gap
            self.interval_max_s = max(self.interval_max_s, gap)
        else:
            self.first_delta_at = now
        self.last_delta_at = now
        self.deltas += 1

    def report(self) -> dict[str, Any]:
        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 2)
        n = self.deltas - 1
        mean = self.interval_sum_s / n if n > 0 else 0.0
        var = max(0.0, self.interval_sq_sum_s / n - mean * mean) if n > 0 else 0.0
        start = self.speech_end_at if self.speech_end_at is not None else self.requested_at
        to_device = ms(start, self.device_at)
        return {"response_id": self.response_id, "item_id": self.item_id,
                "trigger": "speech" if self.speech_end_at is not None else "request",
                "to_first_delta_ms": ms(start, self.first_delta_at),
                "first_delta_to_device_ms": ms(self.first_delta_at, self.device_at),
                "to_device_ms": to_device,
                "output_latency_ms": self.output_latency_ms if self.audio else None,
                "to_speaker_ms": None if to_device is None else round(to_device + self.output_latency_ms, 2),
                "deltas": self.deltas, "delta_interval_ms_mean": round(mean * 1000, 2),
                "delta_interval_ms_std": round(var ** 0.5 * 1000, 2),
                "delta_interval_ms_max": round(self.interval_max_s * 1000, 2)}


class Turns:
    def __init__(self) -> None:
        self.clock = InputClock()
        self.transcripts_due: dict[str, float] = {}        #: user audio item id -> give-up time
        self.waits_for: dict[str, set[str]] = {}           #: response id -> user items whose transcript is due
        self.held: dict[str, list[Publish]] = {}           #: response id -> model words held back
        self.transcripts_late = 0
        self.speech_end_at: float | None = None            #: the user's latest speech end, not yet answered
        self.requested_at: float | None = None             #: our latest response.create, not yet answered
        self.timings: OrderedDict[str, TurnTiming] = OrderedDict()

    # ------------------------------------------------------------ order
    def transcript_due(self, item_id: str, now_s: float) -> None:
        self.transcripts_due[item_id] = now_s + USER_TRANSCRIPT_WAIT_S

    def response_created(self, response_id: str) -> None:
        if self.transcripts_due:
            self.waits_for[response_id] = set(self.transcripts_due)
        self.timings[response_id] = TurnTiming(response_id, self.speech_end_at, self.requested_at)
        self.speech_end_at = self.requested_at = None
        while len(self.timings) > KEEP_TIMINGS:
            self.timings.popitem(last=False)

    def in_order(self, acts: list[Any]) -> list[Any]:
        """Hold the model words of responses still waiting for a user transcript."""
        if not self.waits_for:
            return acts
        out: list[Any] = []
        for act in acts:
            if isinstance(act, Publish) and act.topic.startswith(MODEL_WORD_TOPICS):
                rid = act.payload.get("response_id")
                if rid in self.waits_for:
                    self.held.setdefault(rid, []).append(act)
                    continue
            out.append(act)
        return out

    def transcript_arrived(self, item_id: str) -> list[Publish]:
        """Forget ``item_id``'s due transcript; release the words of responses no longer waiting."""
        self.transcripts_due.pop(item_id, None)
        released: list[Publish] = []
        for rid, items in list(self.waits_for.items()):
            items.discard(item_id)
            if not items:
                del self.waits_for[rid]
                released.extend(self.held.pop(rid, []))
        return released

    def release_all(self) -> list[Publish]:
        """Everything held (the socket closed: nothing more will come)."""
        out = [a for rid in list(self.held) for a in self.held.pop(rid)]
        self.waits_for.clear()
        self.transcripts_due.clear()
        return out

    def overdue(self, now_s: float) -> list[Publish]:
        out: list[Publish] = []
        for item_id, deadline in list(self.transcripts_due.items()):
            if now_s >= deadline:
                self.transcripts_late += 1
                out.extend(self.transcript_arrived(item_id))
        return out

    def next_deadline(self) -> float | None:
        return min(self.transcripts_due.values()) if self.transcripts_due else None

    # ------------------------------------------------------------ latency
    def speech_stopped(self, audio_end_ms: int | None) -> None:
        if isinstance(audio_end_ms, int):
            self.speech_end_at = self.clock.time_of(audio_end_ms)

    def delta(self, response_id: str, now_s: float, audio: bool, item_id: str | None = None) -> None:
        t = self.timings.get(response_id)
        if t is not None:
            t.delta_arrived(now_s)
            if audio:
                t.audio = True
                if t.item_id is None:
                    t.item_id = item_id

    def device_started(self, response_id: str, first_sample_s: float, output_latency_ms: float) -> list[Publish]:
        t = self.timings.get(response_id)
        if t is None or t.device_at is not None:
            return []
        t.device_at = first_sample_s
        t.output_latency_ms = output_latency_ms
        return self._latency(t)

    def response_done(self, response_id: str) -> list[Publish]:
        t = self.timings.get(response_id)
        if t is None:
            return []
        t.done = True
        return self._latency(t)

    def _latency(self, t: TurnTiming) -> list[Publish]:
        if t.published or not t.done or (t.audio and t.device_at is None):
            return []
        t.published = True
        return [Publish("latency.turn", t.report())]
