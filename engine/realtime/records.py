"""The realtime core's inputs and outputs: frozen records, no behaviour.

Inputs are what the I/O layer (:mod:`engine.realtime.process`) saw: a server event, a bus
command, a playback report, a mic chunk, the socket opening or closing, a timer. Each comes
with the two values the core may not read for itself: the clock (``now_s``, monotonic
seconds) and the speaker ring's heard index (``heard_index``, frames), read from shared memory
by the I/O layer.

Outputs are actions: socket events to send, bus messages to publish, ring operations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from engine.pcm import FRAMES_PER_MS as FRAMES_PER_MS   # the API's audio/pcm is the engine's format
from engine.pcm import RATE_HZ as API_RATE_HZ
from engine.pcm import SAMPLE_WIDTH_BYTES


@dataclass(frozen=True)
class AudioFormat:
    """The API session's audio format, as the core counts it: a frame is one sample of one channel
    (PCM16: 2 bytes at 24 kHz; G.711 µ-law / A-law: 1 byte at 8 kHz)."""
    name: str
    rate_hz: int
    bytes_per_frame: int

    @property
    def frames_per_ms(self) -> int:
        return self.rate_hz // 1000


#: GA audio format types the core can count (``RealtimeCore(..., audio_format=...)``)
AUDIO_FORMATS: dict[str, AudioFormat] = {
    "audio/pcm": AudioFormat("audio/pcm", API_RATE_HZ, SAMPLE_WIDTH_BYTES),
    "audio/pcmu": AudioFormat("audio/pcmu", 8000, 1),
    "audio/pcma": AudioFormat("audio/pcma", 8000, 1),
}
PCM16 = AUDIO_FORMATS["audio/pcm"]


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Connected:
    """The API socket opened; ``reconnect``: a previous socket of this engine existed."""
    reconnect: bool = False
    reason: str = "start"        #: start, reconnect, recycle, restart (a new realtime process)


@dataclass(frozen=True)
class Disconnected:
    """The API socket closed (``code``: the close frame's code, 1006 when there was none)."""
    code: int
    reason: str = ""


@dataclass(frozen=True)
class ServerEvent:
    event: Mapping[str, Any]


@dataclass(frozen=True)
class Command:
    """A bus message the core acts on (``cmd.*``, ``engine.presence.gone``); ``offered``: the
    broker's copy (its hand-over, or a re-offer of a command it holds), not a sender's."""
    topic: str
    body: Mapping[str, Any]
    offered: bool = False


@dataclass(frozen=True)
class PlaybackReport:
    """A report of the playback process, in speaker-ring indices (``playback.started``, ``.stopped``,
    ``.underrun``, ``.flushed``, ``.position``): ``start_index`` is the stream's first frame,
    ``index`` the heard position the report is about."""
    kind: str
    start_index: int | None
    index: int | None
    body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MicAudio:
    """Mic frames in the session's audio format (PCM16 24 kHz mono from the mic ring; µ-law 8 kHz
    from a phone call); ``captured_at_s``: when the last frame was captured (monotonic seconds:
    the session clock maps the server's input-buffer times to it); ``received_at_s``: when the
    engine had the frames, where the mic latency (``latency.mic``) counts from (None: the same)."""
    pcm: bytes
    captured_at_s: float
    received_at_s: float | None = None


@dataclass(frozen=True)
class Tick:
    """A timer fired (see :meth:`RealtimeCore.next_deadline`)."""


@dataclass(frozen=True)
class Ending:
    """The host is ending (a call that hung up): a session that must be closed for its final
    figures is closed now (GPT-Live: ``session.close``, whose ``session.closed`` carries the last
    usage; a socket closed without it does not prove the session was finalized). Nothing else."""


Input = Connected | Disconnected | ServerEvent | Command | PlaybackReport | MicAudio | Tick | Ending


# ------------------------------------------------------------------ actions
@dataclass(frozen=True)
class Send:
    """Send a client event on the socket."""
    event: dict[str, Any]


@dataclass(frozen=True)
class SendAudio:
    """Append mic PCM to the input buffer (``input_audio_buffer.append``, encoded by the I/O layer)."""
    pcm: bytes


@dataclass(frozen=True)
class Publish:
    """Publish a bus message."""
    topic: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Play:
    """Write frames (the session's audio format: PCM16 24 kHz, µ-law 8 kHz for a call) to the ring;
    ``starts_item``: the first frames of an item
    (the ring stamps when they arrived, and playback counts its prebuffer from then)."""
    pcm: bytes
    starts_item: bool = False
    response_id: str = ""
    #: the stream comes in real time and lasts the session (GPT-Live's track): the ring says so
    #: with its start (engine/audio/ring.py ``continuous``), so playback gives back the latency a
    #: stall adds to it
    continuous: bool = False


@dataclass(frozen=True)
class Flush:
    """Drop everything written to the playback ring (barge-in)."""


@dataclass(frozen=True)
class EndOfAudio:
    """The audio written so far completes a stream (not an underrun when it runs out)."""


@dataclass(frozen=True)
class Reconnect:
    """Close the socket and open a new one (a session recycle at a turn boundary)."""
    reason: str


Action = Send | SendAudio | Publish | Play | Flush | EndOfAudio | Reconnect
