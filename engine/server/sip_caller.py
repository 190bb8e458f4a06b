"""The local SIP stand-in's scripted caller: the person on the phone, as a script.

The caller's line streams audio without a break for the whole call (speech, else silence), as
a SIP leg does, in CHUNK_MS chunks paced at real time divided by the server's speed factor.
Its script is a list of steps, run in order once the call is answered::

    - say: "I'd like to check my booking."   # espeak-ng speech, sent at the line's pace
    - wait: reply                             # until the model spoke and then fell silent REPLY_GAP_MS
    - dtmf: "1#"                              # key presses, one event each
    - wait: dtmf                              # until the application sends a key (GPT-Live)
    - wait: reply_start                       # until the model starts speaking
    - pause_ms: 500
    - hangup: true

Every ``wait`` gives up after ``max_s`` (default WAIT_MAX_S of call time) and notes it. The
caller hears the model's audio (``hear``): loud chunks are speech, the rest silence. What it
said is kept in order (``pop_said``), so the stand-in can hear its words exactly instead of
through the rough recogniser. I/O (asyncio); the leg it talks into is any object with
``caller_audio(pcm)``, ``caller_dtmf(key)`` and ``caller_hangup()``.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engine.codec import API_RATE_HZ
from engine.server.errors import ServerError
from engine.server.voice import VoiceError, synthesize

CHUNK_MS = 100                  #: one chunk of the caller's line
CHUNK_SAMPLES = API_RATE_HZ * CHUNK_MS // 1000
REPLY_GAP_MS = 900              #: silence after speech that ends the model's reply
WAIT_MAX_S = 60.0               #: a wait gives up after this much call time
LOUD = 400                      #: a chunk whose peak is over this is speech
CALLER_VOICE = "echo"           #: espeak voice of the caller (another than the model's)
DTMF_KEYS = frozenset("0123456789ABCD*#")
WAITS = ("reply", "reply_start", "dtmf")
DEFAULT_SCRIPT: list[dict[str, Any]] = [{"pause_ms": 300}, {"say": "Hello, I am calling about my booking."},
                                        {"wait": "reply"}, {"hangup": True}]


class ScriptError(ServerError, ValueError):
    """A caller script that cannot run; the message names the step and the problem."""


@dataclass(frozen=True)
class Step:
    kind: str                     #: say | wait | dtmf | pause | hangup
    arg: str = ""
    max_s: float = WAIT_MAX_S
    ms: int = 0


def parse_script(raw: Any) -> list[Step]:
    """A script from JSON (a list of one-key steps); :class:`ScriptError` names the bad step."""
    if raw is None:
        raw = DEFAULT_SCRIPT
    if not isinstance(raw, list):
        raise ScriptError("script: expected a list of steps (say, wait, dtmf, pause_ms, hangup)")
    steps = []
    for i, s in enumerate(raw):
        where = f"script[{i}]"
        if not isinstance(s, dict):
            raise ScriptError(f"{where}: expected a mapping such as {{say: TEXT}}")
        max_s = float(s.get("max_s", WAIT_MAX_S))
        if "say" in s:
            if not isinstance(s["say"], str) or not s["say"].strip():
                raise ScriptError(f"{where}.say: expected the words to say")
            steps.append(Step("say", s["say"]))
        elif "wait" in s:
            if s["wait"] not in WAITS:
                raise ScriptError(f"{where}.wait: {s['wait']!r}; use one of {', '.join(WAITS)}")
            steps.append(Step("wait", s["wait"], max_s=max_s))
        elif "dtmf" in s:
            keys = str(s["dtmf"])
            if not keys or set(keys) - DTMF_KEYS:
                raise ScriptError(f"{where}.dtmf: {keys!r}; keys are 0-9, A-D, * and #")
            steps.append(Step("dtmf", keys))
        elif "pause_ms" in s:
            if not isinstance(s["pause_ms"], int) or s["pause_ms"] < 0:
                raise ScriptError(f"{where}.pause_ms: expected whole milliseconds")
            steps.append(Step("pause", ms=s["pause_ms"]))
        elif s.get("hangup"):
            steps.append(Step("hangup"))
        else:
            raise ScriptError(f"{where}: unknown step {sorted(s)}; use say, wait, dtmf, pause_ms or hangup")
    return steps


class Line(Protocol):
    """Where the caller's audio and keys go (the call's leg into the model)."""

    async def caller_audio(self, pcm: bytes) -> None: ...

    async def caller_dtmf(self, key: str) -> None: ...

    async def caller_hangup(self) -> None: ...


@dataclass
class Heard:
    """What the caller heard, for the call's report."""
    speech_ms: float = 0.0
    replies: int = 0                          #: stretches of model speech
    words: list[str] = field(default_factory=list)   #: the model's transcripts, as the leg saw them


class Caller:
    """One scripted caller on one call (module docstring)."""

    def __init__(self, steps: list[Step], speed: float) -> None:
        self.steps = steps
        self.speed = max(0.01, speed)
        self.line: Line | None = None
        self.speech: deque[np.ndarray] = deque()   #: chunks still to say
        self.said: deque[str] = deque()           #: utterances said, not yet taken as heard by the model
        self.heard = Heard()
        self.dtmf_received: list[str] = []        #: keys the application sent to the caller
        self.dtmf_sent: list[str] = []
        self.timeouts: list[str] = []
        self.hung_up = False
        self.step_index = 0
        self._last_loud_s = float("-inf")
        self._loud = asyncio.Event()
        self._dtmf_event = asyncio.Event()
        self._dtmf_taken = 0                       #: keys from the application a ``wait: dtmf`` has used
        self._spoken = asyncio.Event()             #: the speech queue ran empty
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------ what the leg tells the caller
    def hear(self, pcm: bytes | np.ndarray) -> None:
        """A chunk of the model's audio (PCM16 24 kHz) reached the caller's ear."""
        samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, bytes) else pcm
        if not len(samples):
            return
        if int(np.abs(samples.astype(np.int32)).max()) > LOUD:
            now = time.monotonic()
            if (now - self._last_loud_s) * self.speed * 1000 > REPLY_GAP_MS:
                self.heard.replies += 1       # speech after a reply's gap: a new reply
            self._last_loud_s = now
            self.heard.speech_ms += len(samples) * 1000 / API_RATE_HZ
            self._loud.set()

    def heard_words(self, text: str) -> None:
        if text:
            self.heard.words.append(text)

    def dtmf_from_app(self, key: str) -> None:
        self.dtmf_received.append(key)
        self._dtmf_event.set()

    def pop_said(self) -> str | None:
        """The oldest utterance the model has not taken as a turn yet (what it should hear)."""
        return self.said.popleft() if self.said else None

    # ------------------------------------------------------------------ running
    def start(self, line: Line) -> None:
        self.line = line
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(), name="caller line"),
                       loop.create_task(self._run(), name="caller script")]

    def stop(self) -> None:
        self.hung_up = True
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()

    async def _pump(self) -> None:
        """The line: a chunk every CHUNK_MS / speed, speech when there is some, silence otherwise."""
        assert self.line is not None
        loop = asyncio.get_running_loop()
        period = CHUNK_MS / 1000 / self.speed
        silence = bytes(CHUNK_SAMPLES * 2)
        t_next = loop.time()
        while not self.hung_up:
            if self.speech:
                chunk = self.speech.popleft().astype("<i2").tobytes()
                if not self.speech:
                    self._spoken.set()
            else:
                chunk = silence
            await self.line.caller_audio(chunk)
            t_next += period
            delay = t_next - loop.time()
            if delay < -0.5:
                t_next = loop.time()
            elif delay > 0:
                await asyncio.sleep(delay)

    async def _run(self) -> None:
        assert self.line is not None
        for i, step in enumerate(self.steps):
            self.step_index = i
            if self.hung_up:
                return
            if step.kind == "say":
                await self._say(step.arg)
            elif step.kind == "pause":
                await asyncio.sleep(step.ms / 1000 / self.speed)
            elif step.kind == "dtmf":
                for key in step.arg:
                    self.dtmf_sent.append(key)
                    await self.line.caller_dtmf(key)
                    await asyncio.sleep(0.1 / self.speed)
            elif step.kind == "wait":
                await self._wait(step)
            elif step.kind == "hangup":
                self.hung_up = True
                await self.line.caller_hangup()
                return
        self.step_index = len(self.steps)

    async def _say(self, text: str) -> None:
        try:
            pcm = await asyncio.to_thread(synthesize, text, CALLER_VOICE, 1.0)
        except VoiceError as exc:
            self.timeouts.append(f"say failed: {exc}")
            return
        self.said.append(text)
        self._spoken.clear()
        for i in range(0, len(pcm), CHUNK_SAMPLES):
            piece = pcm[i:i + CHUNK_SAMPLES]
            if len(piece) < CHUNK_SAMPLES:
                piece = np.concatenate([piece, np.zeros(CHUNK_SAMPLES - len(piece), dtype=np.int16)])
            self.speech.append(piece)
        await self._spoken.wait()

    async def _wait(self, step: Step) -> None:
        budget_s = step.max_s / self.speed
        try:
            await asyncio.wait_for(self._wait_for(step.arg), budget_s)
        except asyncio.TimeoutError:
            self.timeouts.append(f"wait {step.arg} (step {self.step_index})")

    async def _wait_for(self, what: str) -> None:
        if what == "dtmf":                            # a key the script has not waited for yet
            while len(self.dtmf_received) <= self._dtmf_taken:
                self._dtmf_event.clear()
                await self._dtmf_event.wait()
            self._dtmf_taken = len(self.dtmf_received)
            return
        self._loud.clear()
        await self._loud.wait()                      # the model starts speaking
        if what == "reply_start":
            return
        gap_s = REPLY_GAP_MS / 1000 / self.speed
        while True:                                   # ... until it has been silent REPLY_GAP_MS
            self._loud.clear()
            try:
                await asyncio.wait_for(self._loud.wait(), gap_s)
            except asyncio.TimeoutError:
                return

    def report(self) -> dict[str, Any]:
        return {"step": self.step_index, "steps": len(self.steps), "hung_up": self.hung_up,
                "heard_speech_ms": round(self.heard.speech_ms), "heard_replies": self.heard.replies,
                "heard_words": list(self.heard.words), "dtmf_sent": list(self.dtmf_sent),
                "dtmf_received": list(self.dtmf_received), "timeouts": list(self.timeouts)}
