"""What a person reads of the bus: ``engine tail``'s conversation view and the live line and
error lines of ``engine start``'s terminal. Pure: bus messages (``topic``, msgpack ``body``
with its header keys) go in, lines of text come out; no I/O, no clock (times come from the
bodies' ``ts``). Shared (layer 1): the supervisor draws its terminal with it, the CLI its
``engine tail``.

Rules:

* :class:`ConversationView` prints the conversation: user speech and transcripts, model words
  (streamed deltas joined into lines: a line goes out at the end of a sentence, or once it is
  :data:`WRAP_CHARS` long, and the rest at ``done``), text injected with ``cmd.say`` (its
  ``user.text`` / ``system.text``, with the process that sent it), tool calls and results,
  interruptions and underruns, errors with their messages, each turn's latency and cost,
  connection changes. Topics it has no handler for (the high-rate ones among them: levels,
  positions, server and client events) give no lines.
* :class:`TerminalView` keeps the live state ``engine start`` shows (who is speaking, the
  mic level, the latest turn's latency, the session's cost) and returns a line per error
  (``error: <source>: <message>``); benign errors (expected races, counted reports) give none.
* Malformed bodies (wrong types, missing keys) never raise: a value that is not what the
  protocol says is shown as it is, or left out.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from bus.wire import HEADER_KEYS

WRAP_CHARS = 100            #: a streamed model line goes out at this length (at a space) if no sentence ended
WHO_WIDTH = 7
_SENTENCE_END = re.compile(r"[.!?…](?:[\"')\]]*)\s+")


def _s(value: Any) -> str:
    """``value`` as short text (a non-string is shown as JSON)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _num(value: Any) -> float | None:
    """``value`` if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _ms(value: Any) -> str:
    v = _num(value)
    return "?" if v is None else f"{v:.0f} ms"


def _clock(body: dict[str, Any]) -> str:
    ts = _num(body.get("ts"))
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts is not None else "--:--:--"


def error_text(body: dict[str, Any]) -> str:
    """An ``engine.error`` body as ``<source>: <message> (<code>)``."""
    source = _s(body.get("source") or "engine")
    message = body.get("message")
    code = body.get("code")
    text = f"{source}: {_s(message) if message is not None else 'no message'}"
    if code is not None and _s(code) not in text:
        text += f" ({_s(code)})"
    return text


@dataclass
class _Stream:
    """One model item's streamed words: what came, and how much of it is printed."""
    text: str = ""
    printed: int = 0
    ts: Any = None      #: the latest delta's ``ts``, for the lines ``flush`` prints


@dataclass
class ConversationView:
    """``engine tail``'s default view. ``feed`` each message in bus order; it returns the lines to
    print (zero or more, each without a newline). ``flush`` returns the model words not printed
    yet (call it when the view ends)."""

    clock: bool = True                                   #: prefix each line with the message's time
    streams: dict[str, _Stream] = field(default_factory=dict)
    engine_state: str | None = None                      #: the supervisor's latest engine.status state
    errored_ids: set[str] = field(default_factory=set)   #: commands whose error is shown (their refusal is not again)
    realtime_state: str | None = None

    def _line(self, body: dict[str, Any], who: str, text: str) -> str:
        prefix = f"{_clock(body)} " if self.clock else ""
        return f"{prefix}{who:<{WHO_WIDTH}} {text}"

    def feed(self, topic: str, body: dict[str, Any]) -> list[str]:
        """The lines ``topic``/``body`` adds to the conversation (often none)."""
        if not isinstance(body, dict):
            return []
        handler = _HANDLERS.get(topic)
        if handler is None:
            return []
        try:
            return handler(self, body)
        except (TypeError, ValueError, AttributeError, KeyError):   # an odd body: shown as it is
            return [self._line(body, "?", f"{topic} {_s({k: v for k, v in body.items() if k not in HEADER_KEYS})[:200]}")]

    @staticmethod
    def shows(topic: str) -> bool:
        """True if the view has lines for ``topic`` (it has none for the high-rate topics: levels,
        positions, deltas one by one, server and client events)."""
        return topic in _HANDLERS

    def flush(self) -> list[str]:
        """Every model stream's words not printed yet."""
        out: list[str] = []
        for key in list(self.streams):
            st = self.streams.pop(key)
            rest = st.text[st.printed:].strip()
            if rest:
                out.append(self._line({"ts": st.ts}, "model", rest))
        return out

    # ---------------------------------------------------------------- the conversation
    def _speech_started(self, b: dict[str, Any]) -> list[str]:
        return [self._line(b, "user", "(speaking…)")]

    def _speech_stopped(self, b: dict[str, Any]) -> list[str]:
        return [self._line(b, "user", "(stopped speaking)")]

    def _user_transcript(self, b: dict[str, Any]) -> list[str]:
        text = _s(b.get("text", "")).strip()
        return [self._line(b, "user", f"“{text}”" if text else "(no words recognised)")]

    def _user_text(self, b: dict[str, Any]) -> list[str]:
        src = f"  (said by {_s(b['source'])})" if b.get("source") else ""
        return [self._line(b, "user", _s(b.get("text", "")) + src)]

    def _system_text(self, b: dict[str, Any]) -> list[str]:
        src = f"  (from {_s(b['source'])})" if b.get("source") else ""
        kind = "[instructions] " if b.get("kind") == "instructions" else ""   # GPT-Live: thinking reads as context
        return [self._line(b, "system", kind + _s(b.get("text", "")) + src)]

    def _key(self, b: dict[str, Any]) -> str:
        return _s(b.get("item_id") or b.get("response_id") or "")

    def _model_delta(self, b: dict[str, Any]) -> list[str]:
        st = self.streams.setdefault(self._key(b), _Stream())
        st.text += _s(b.get("text", ""))
        st.ts = b.get("ts")
        out: list[str] = []
        while True:
            pending = st.text[st.printed:]
            m = _SENTENCE_END.search(pending)
            if m is not None:
                cut = m.end()
            elif len(pending) >= WRAP_CHARS:
                space = pending.rfind(" ", 0, WRAP_CHARS)
                cut = space + 1 if space > 0 else WRAP_CHARS
            else:
                break
            line = pending[:cut].strip()
            st.printed += cut
            if line:
                out.append(self._line(b, "model", line))
        return out

    def _model_done(self, b: dict[str, Any]) -> list[str]:
        st = self.streams.pop(self._key(b), None)
        text = _s(b.get("text", ""))
        if b.get("truncated"):   # after a barge-in: the heard part
            heard = text.strip()
            rest = st.text[st.printed:].strip() if st is not None else ""
            out = [self._line(b, "model", rest)] if rest else []
            return out + [self._line(b, "model", f"(heard up to the cut: “{heard}”)" if heard
                                     else "(heard up to the cut: no words)")]
        if st is None:   # no deltas came (a late subscriber): the whole text
            return [self._line(b, "model", text.strip())] if text.strip() else []
        # the deltas' text is what was shown; done's text is the whole of it
        rest = text[st.printed:].strip() if text.startswith(st.text[:st.printed]) else st.text[st.printed:].strip()
        return [self._line(b, "model", rest)] if rest else []

    def _interrupted(self, b: dict[str, Any]) -> list[str]:
        st = self.streams.get(self._key(b))
        out: list[str] = []
        if st is not None and st.text[st.printed:].strip():   # the words received so far, then the cut
            out.append(self._line(b, "model", st.text[st.printed:].strip()))
            st.printed = len(st.text)
        reason = _s(b.get("reason") or "?")
        return out + [self._line(b, "model", f"✂ interrupted ({reason}) at {_ms(b.get('played_ms'))} "
                                             f"of {_ms(b.get('received_ms'))} received")]

    def _underrun(self, b: dict[str, Any]) -> list[str]:
        return [self._line(b, "model", f"(underrun: the speaker ran dry at {_ms(b.get('played_ms'))})")]

    def _tool_call(self, b: dict[str, Any]) -> list[str]:
        args = _s(b.get("arguments", ""))
        return [self._line(b, "tool", f"call {_s(b.get('name'))}({args[:300]})  [{_s(b.get('call_id'))}]")]

    def _tool_result(self, b: dict[str, Any]) -> list[str]:
        out = _s(b.get("output", ""))
        return [self._line(b, "tool", f"result [{_s(b.get('call_id'))}] from {_s(b.get('pub'))}: {out[:300]}")]

    def _error(self, b: dict[str, Any]) -> list[str]:
        for key in ("id", "request_id"):
            if isinstance(b.get(key), str):
                self.errored_ids.add(b[key])
        kind = "note" if b.get("benign") else "error"
        fatal = " (fatal: the engine stops)" if b.get("fatal") else ""
        return [self._line(b, kind, error_text(b) + fatal)]

    def _ack(self, b: dict[str, Any]) -> list[str]:
        if b.get("ok") is False and b.get("id") not in self.errored_ids:
            return [self._line(b, "error", f"command {_s(b.get('id'))} refused: {_s(b.get('error'))}")]
        return []

    def _latency(self, b: dict[str, Any]) -> list[str]:
        start = "speech end" if b.get("trigger") == "speech" else "request"
        if _num(b.get("to_first_delta_ms")) is None:
            return []   # a response with no words or audio (a function call)
        parts = [f"first delta {_ms(b.get('to_first_delta_ms'))}"]
        if _num(b.get("to_speaker_ms")) is not None:
            parts.append(f"speaker {_ms(b.get('to_speaker_ms'))}")
        elif _num(b.get("to_device_ms")) is not None:
            parts.append(f"device {_ms(b.get('to_device_ms'))}")
        return [self._line(b, "turn", f"latency from {start}: " + ", ".join(parts))]

    def _response_done(self, b: dict[str, Any]) -> list[str]:
        usd, total = _num(b.get("usd")), _num(b.get("session_usd"))
        status = _s(b.get("status") or "?")
        text = f"cost ${usd:.4f}" if usd is not None else "cost ?"
        if total is not None:
            text += f" (session ${total:.4f})"
        if status != "completed":
            why = b.get("message") or b.get("reason")
            text = f"response {status}" + (f": {_s(why)}" if why else "") + f"; {text}"
        return [self._line(b, "turn", text)]

    def _budget(self, b: dict[str, Any]) -> list[str]:
        if not b.get("exceeded"):
            return []
        return [self._line(b, "error", f"budget: {_s(b.get('message') or 'exceeded')}")]

    def _status(self, b: dict[str, Any]) -> list[str]:
        state = b.get("state")
        if not isinstance(state, str):
            return []
        if _s(b.get("pub", "")).startswith("supervisor"):
            if state == self.engine_state:
                return []   # the heartbeat, every second
            self.engine_state = state
            return [self._line(b, "engine", state)]
        if state == self.realtime_state and state == "connected":
            return []
        self.realtime_state = state
        extra = ""
        if state in ("disconnected", "reconnecting") and b.get("close_code") is not None:
            extra = f" (close code {_s(b.get('close_code'))}" + (f": {_s(b['reason'])}" if b.get("reason") else "") + ")"
        elif state == "reconnected":
            extra = f" ({_s(b.get('reason'))}, {_s(b.get('history_items'))} items replayed)"
        elif state == "connected" and b.get("session_id"):
            extra = f" (session {_s(b.get('session_id'))})"
        return [self._line(b, "engine", f"API {state}{extra}")]

    def _mic(self, b: dict[str, Any]) -> list[str]:
        return [self._line(b, "engine", "mic open" if b.get("open") else "mic closed (muted)")]

    def _call(self, b: dict[str, Any], what: str) -> list[str]:
        return [self._line(b, "phone", f"call {_s(b.get('phone_call_id'))} {what}")]


_HANDLERS: dict[str, Any] = {
    "user.speech.started": ConversationView._speech_started,
    "user.speech.stopped": ConversationView._speech_stopped,
    "user.transcript.done": ConversationView._user_transcript,
    "user.text": ConversationView._user_text,
    "system.text": ConversationView._system_text,
    "model.text.delta": ConversationView._model_delta,
    "model.transcript.delta": ConversationView._model_delta,
    "model.text.done": ConversationView._model_done,
    "model.transcript.done": ConversationView._model_done,
    "playout.interrupted": ConversationView._interrupted,
    "playout.underrun": ConversationView._underrun,
    "tool.call": ConversationView._tool_call,
    "cmd.tool.result": ConversationView._tool_result,
    "engine.error": ConversationView._error,
    "cmd.ack": ConversationView._ack,
    "cmd.done": ConversationView._ack,     # bus protocol 2: what the engine did (a refusal shows here)
    "latency.turn": ConversationView._latency,
    "response.done": ConversationView._response_done,
    "engine.budget": ConversationView._budget,
    "engine.status": ConversationView._status,
    "input.mic": ConversationView._mic,
    "phone.call.started": lambda v, b: v._call(b, "started"),
    "phone.call.ended": lambda v, b: v._call(b, "ended"),
}


# -------------------------------------------------------------------- engine start's terminal
def power_dbfs(values: Any) -> float | None:
    """The level of several RMS windows together (their mean power), in dBFS; None if none."""
    if not isinstance(values, list):
        return None
    nums = [v for v in (_num(x) for x in values) if v is not None]
    if not nums:
        return None
    mean = sum(10 ** (v / 10) for v in nums) / len(nums)
    return 10 * math.log10(mean) if mean > 0 else -90.0


@dataclass
class TerminalView:
    """``engine start``'s terminal. ``feed`` each bus message: it returns the error lines to print
    (``error: <source>: <message>``, one per non-benign ``engine.error``). ``live_line()`` is the
    compact state: who is speaking (user, model, both, nobody), the mic level (dBFS, RMS of the
    latest ``capture.levels`` batch, about 200 ms; ``muted`` while ``input.mic`` is closed), the
    latest turn's latency (``latency.turn``: to the speaker, else to the device, else to the first
    delta), the session's cost (``cost.session``), and the API connection while it is down."""

    user_speaking: bool = False
    model_playing: set[str] = field(default_factory=set)   #: item ids between playout.started and its end
    mic_dbfs: float | None = None
    mic_open: bool = True
    latency_ms: float | None = None
    cost_usd: float = 0.0
    errors: int = 0
    api_state: str | None = None     #: the realtime process's latest engine.status state

    def feed(self, topic: str, body: dict[str, Any]) -> list[str]:
        if not isinstance(body, dict):
            return []
        if topic == "capture.levels":
            level = power_dbfs(body.get("mic_dbfs"))
            if level is not None:
                self.mic_dbfs = level
        elif topic == "user.speech.started":
            self.user_speaking = True
        elif topic == "user.speech.stopped":
            self.user_speaking = False
        elif topic == "playout.started":
            self.model_playing.add(_s(body.get("item_id")))
        elif topic in ("playout.stopped", "playout.interrupted"):
            self.model_playing.discard(_s(body.get("item_id")))
        elif topic == "latency.turn":
            for key in ("to_speaker_ms", "to_device_ms", "to_first_delta_ms"):
                v = _num(body.get(key))
                if v is not None:
                    self.latency_ms = v
                    break
        elif topic == "cost.session":
            v = _num(body.get("usd"))
            if v is not None:
                self.cost_usd = v
        elif topic == "input.mic":
            self.mic_open = bool(body.get("open", True))
        elif topic == "engine.status" and _s(body.get("pub", "")).startswith("realtime"):
            if isinstance(body.get("state"), str):
                self.api_state = body["state"]
        elif topic == "engine.error":
            if body.get("benign"):
                return []
            self.errors += 1
            return [f"error: {error_text(body)}"]
        return []

    def speaking(self) -> str:
        if self.user_speaking and self.model_playing:
            return "both"
        return "user" if self.user_speaking else ("model" if self.model_playing else "nobody")

    def live_line(self) -> str:
        mic = "muted" if not self.mic_open else ("–" if self.mic_dbfs is None else f"{self.mic_dbfs:.0f} dBFS")
        lat = "–" if self.latency_ms is None else f"{self.latency_ms:.0f} ms"
        line = f"speaking: {self.speaking():<6} | mic {mic:>9} | last turn {lat:>7} | ${self.cost_usd:.4f}"
        if self.api_state in ("disconnected", "reconnecting"):
            line += f" | API {self.api_state}"
        return line + (f" | errors {self.errors}" if self.errors else "")
