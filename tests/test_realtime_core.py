"""The realtime core, fed real server traces and hand-made sequences as if from the socket.
No I/O: the clock and the heard index are given with each record."""
from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from bus.intake import Intake
from engine.errors import ConfigError
from engine.realtime.core import RealtimeCore
from engine.realtime.records import (Command, Connected, Disconnected, EndOfAudio, Flush, MicAudio, Play,
                                     PlaybackReport, Publish, Send, SendAudio, ServerEvent, Tick)
from tests.helpers import TRACES

GA_TRACES = sorted(p.name for p in TRACES.glob("*.jsonl") if "-beta-" not in p.name)
BETA_TRACES = sorted(p.name for p in TRACES.glob("*.jsonl") if "-beta-" in p.name)
#: prices per 1M tokens (in, cached in, out), written out here (not read from the code under test)
GPT_REALTIME_USD_PER_M = {"text": (4.0, 0.4, 16.0), "audio": (32.0, 0.4, 64.0), "image": (5.0, 0.5, 0.0)}
USD_PER_M = {"gpt-realtime": GPT_REALTIME_USD_PER_M,
             "gpt-realtime-2.1": {"text": (4.0, 0.4, 24.0), "audio": (32.0, 0.4, 64.0), "image": (5.0, 0.5, 0.0)}}


class Harness:
    """A core with a clock and a heard index the test moves."""

    def __init__(self, core: RealtimeCore | None = None, heard: int = 0, **kw: Any) -> None:
        self.core = core or RealtimeCore("gpt-realtime", {"type": "realtime"}, **kw)
        self.now = 0.0
        self.heard = heard
        self.broker = Intake()   #: the broker's intake, fed what this core publishes to it (its hand-over)

    def __call__(self, rec: Any) -> list[Any]:
        acts = self.core.handle(rec, self.now, self.heard)
        for a in acts:
            if isinstance(a, Publish) and a.topic in ("conversation.history", "intake.taken"):
                self.broker.state(a.payload)
        return acts

    def ev(self, event: dict[str, Any]) -> list[Any]:
        return self(ServerEvent(event))

    def cmd(self, topic: str, body: dict[str, Any], offered: bool = False) -> list[Any]:
        return self(Command(topic, body, offered))

    def report(self, kind: str, start: int | None, index: int | None, **body: Any) -> list[Any]:
        return self(PlaybackReport(kind, start, index, body))

    def tick(self) -> list[Any]:
        return self(Tick())


def connected(**kw: Any) -> Harness:
    h = Harness(**kw)
    h(Connected())
    return h


def published(acts: list[Any], topic: str) -> list[dict[str, Any]]:
    return [a.payload for a in acts if isinstance(a, Publish) and a.topic == topic]


def sent(acts: list[Any], etype: str | None = None, ids: bool = False) -> list[dict[str, Any]]:
    """Client events sent (of ``etype``); without their ``event_id`` unless ``ids``."""
    return [a.event if ids else {k: v for k, v in a.event.items() if k != "event_id"}
            for a in acts if isinstance(a, Send) and (etype is None or a.event["type"] == etype)]


def only_taken(acts: list[Any], key: str) -> bool:
    """Nothing done but ``key`` said taken again (a copy of a command taken before: the broker lets it go)."""
    return [(type(a).__name__, getattr(a, "topic", None), getattr(a, "payload", None)) for a in acts] == \
        [("Publish", "intake.taken", {"taken": [key]})]


def replay(name: str, h: Harness | None = None) -> tuple[Harness, list[Any], list[dict[str, Any]]]:
    # nothing heard yet: the replay barges in where the trace does (trace 08)
    h = h or connected()
    events = [json.loads(line) for line in (TRACES / name).read_text().splitlines() if line.strip()]
    acts: list[Any] = []
    for ev in events:
        acts.extend(h.ev(ev))
    return h, acts, events


def test_there_are_traces() -> None:
    assert len(GA_TRACES) >= 10 and len(BETA_TRACES) == 3


def _usd(usage: dict[str, Any] | None, rates: dict[str, tuple[float, float, float]] = GPT_REALTIME_USD_PER_M) -> float:
    if not usage:
        return 0.0
    ind, outd = usage.get("input_token_details") or {}, usage.get("output_token_details") or {}
    cached = ind.get("cached_tokens_details") or {}
    usd = 0.0
    for m, (rate_in, rate_cached, rate_out) in rates.items():
        total, c = ind.get(f"{m}_tokens", 0) or 0, min(cached.get(f"{m}_tokens", 0) or 0, ind.get(f"{m}_tokens", 0) or 0)
        usd += (total - c) * rate_in + c * rate_cached + (outd.get(f"{m}_tokens", 0) or 0) * rate_out
    return usd / 1e6


@pytest.mark.parametrize("name", GA_TRACES)
def test_ga_trace_replays(name: str) -> None:
    h, acts, events = replay(name)
    server_msgs = [a for a in acts if isinstance(a, Publish) and a.topic.startswith("server.")]
    assert len(server_msgs) == len(events)
    assert not any("delta" in a.payload for a in server_msgs if a.topic == "server.response.output_audio.delta")
    api_errors = [e for e in events if e["type"] == "error"]
    failed_tr = [e for e in events if e["type"].endswith("transcription.failed")]
    errors = published(acts, "engine.error")
    assert len(errors) == len(api_errors) + len(failed_tr), errors
    assert all(e["source"] == "api" for e in errors)
    assert h.core.handler_failures == 0
    want_text = [e["text"] for e in events if e["type"] == "response.output_text.done"]
    assert [p["text"] for p in published(acts, "model.text.done")] == want_text
    want_user = [e["transcript"] for e in events if e["type"].endswith("input_audio_transcription.completed")]
    assert sorted(p["text"] for p in published(acts, "user.transcript.done")) == sorted(want_user)
    assert_turn_order(acts, events)
    # responses priced at the prices written out above for the model the session names (trace 06: gpt-realtime-2.1;
    # without a session.created, the core's own gpt-realtime)
    model = next((e["session"]["model"] for e in events if e["type"] == "session.created"), "gpt-realtime")
    want_usd = sum(_usd(e["response"].get("usage"), USD_PER_M[model]) for e in events if e["type"] == "response.done")
    assert h.core.budget.responses_usd == pytest.approx(want_usd)
    if want_usd:
        assert published(acts, "cost.session")[-1]["usd"] >= want_usd > 0
    pcm = b"".join(a.pcm for a in acts if isinstance(a, Play))
    want_pcm = _played(events)
    want_pcm = want_pcm[:len(want_pcm) // 2 * 2]   # (an odd last byte waits for a next delta)
    assert pcm == want_pcm, f"played {len(pcm)} bytes; the deltas not cut give {len(want_pcm)}"


def _played(events: list[dict[str, Any]]) -> bytes:
    """The audio a replay plays: every delta but those of a reply cut (a Flush: trace 08's barge-in)
    before they came."""
    h, cut, last_response = connected(), set(), None
    pcm = b""
    for ev in events:
        if any(isinstance(a, Flush) for a in h.ev(ev)) and last_response is not None:
            cut.add(last_response)
        if ev["type"] == "response.output_audio.delta":
            last_response = ev["response_id"]
            if ev["response_id"] not in cut:
                pcm += base64.b64decode(ev["delta"])
    return pcm


def test_trace_08_barges_in_and_truncates() -> None:
    """Trace 08 interrupts the reply: replayed with nothing heard, the core flushes and truncates it."""
    h, acts, events = replay("08-ga-barge-in-cancel-truncate.jsonl")
    assert any(isinstance(a, Flush) for a in acts)
    h.now = 1.0
    truncs = sent(h.tick(), "conversation.item.truncate")
    assert truncs and all(t["audio_end_ms"] == 0 for t in truncs)


def test_ga_transcripts_match_when_everything_is_heard() -> None:
    for name in GA_TRACES:
        h, acts, events = replay(name, connected(heard=1 << 62))
        want_tr = [e["transcript"] for e in events if e["type"] == "response.output_audio_transcript.done"]
        assert [p["text"] for p in published(acts, "model.transcript.done")] == want_tr, name
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
        assert "".join(p["text"] for p in published(acts, "model.transcript.delta")) == deltas


def assert_turn_order(acts: list[Any], events: list[dict[str, Any]]) -> None:
    """Each user turn's transcript is on the bus before the words of the responses that follow it."""
    transcribed = {e["item_id"] for e in events if e["type"].endswith("input_audio_transcription.completed")}
    committed: list[str] = []
    follows: dict[str, set[str]] = {}
    for e in events:
        if e["type"] == "input_audio_buffer.committed" and e["item_id"] in transcribed:
            committed.append(e["item_id"])
        elif e["type"] == "response.created":
            follows[e["response"]["id"]] = set(committed)
    seen_user: set[str] = set()
    for a in acts:
        if not isinstance(a, Publish):
            continue
        if a.topic == "user.transcript.done":
            seen_user.add(a.payload["item_id"])
        elif a.topic.startswith(("model.transcript.", "model.text.")):
            missing = follows.get(str(a.payload.get("response_id")), set()) - seen_user
            assert not missing, f"{a.topic} of {a.payload['response_id']} before the user transcript of {missing}"


def test_trace_with_late_user_transcripts_reads_in_turn_order() -> None:
    _, acts, _ = replay("08-ga-barge-in-cancel-truncate.jsonl", connected(heard=1 << 62))
    order = [a.topic for a in acts if isinstance(a, Publish) and a.topic in ("user.transcript.done", "model.transcript.done")]
    assert order == ["user.transcript.done", "model.transcript.done"] * 2


@pytest.mark.parametrize("name", BETA_TRACES)
def test_beta_trace_is_refused_by_name(name: str) -> None:
    h, acts, _ = replay(name)
    errors = published(acts, "engine.error")
    assert errors and errors[0]["code"] == "beta_protocol" and errors[0]["fatal"]
    assert "retired beta" in errors[0]["message"] and "GA" in errors[0]["message"]
    assert h.core.protocol_refused
    assert not published(acts, "model.text.done") and not any(isinstance(a, Play) for a in acts)


def test_conversation_item_created_is_a_ga_event() -> None:
    h = connected()
    acts = h.ev({"type": "conversation.item.created", "event_id": "e", "previous_item_id": None,
                 "item": {"id": "i", "type": "message", "role": "user", "content": []}})
    assert not published(acts, "engine.error") and not h.core.protocol_refused


# ------------------------------------------------------------------ barge-in and truncation
def _audio_turn(h: Harness, rid: str = "resp_1", item: str = "item_a", ms: int = 1000, done: bool = False) -> None:
    h.ev({"type": "response.created", "response": {"id": rid, "conversation_id": "conv_1"}})
    h.ev({"type": "response.output_item.added", "response_id": rid, "item": {"id": item, "type": "message",
                                                                             "role": "assistant"}})
    for _ in range(ms // 100):
        h.ev({"type": "response.output_audio.delta", "response_id": rid, "item_id": item,
              "delta": base64.b64encode(bytes(4800)).decode()})
    h.ev({"type": "response.output_audio_transcript.delta", "response_id": rid, "item_id": item,
          "delta": "one two three four"})
    if done:
        h.ev({"type": "response.output_audio.done", "response_id": rid, "item_id": item})
        h.ev({"type": "response.done", "response": {"id": rid, "status": "completed", "output": []}})


def _session(interrupt: bool) -> dict[str, Any]:
    return {"type": "session.updated", "session": {"model": "gpt-realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "interrupt_response": interrupt}}}}}


@pytest.mark.parametrize("played_ms, want", [(0, 0), (250, 250), (999, 999), (5000, 1000)])
def test_barge_in_truncates_at_what_playback_played(played_ms: int, want: int) -> None:
    h = connected(heard=100 * 24)  # the estimate before the flush: 100 ms
    h.ev(_session(interrupt=True))
    _audio_turn(h, ms=1000)
    acts = h.ev({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "u"})
    assert any(isinstance(a, Flush) for a in acts)
    assert not sent(acts)  # the server cancels by itself; truncation waits for playback
    acts = h.report("flushed", 0, played_ms * 24)
    assert sent(acts, "conversation.item.truncate") == [{"type": "conversation.item.truncate", "item_id": "item_a",
                                                         "content_index": 0, "audio_end_ms": want}]
    assert published(acts, "playout.interrupted")[0]["measured"]
    late = h.ev({"type": "response.output_audio.delta", "response_id": "resp_1", "item_id": "item_a",
                 "delta": base64.b64encode(bytes(480)).decode()})
    assert not any(isinstance(a, Play) for a in late)


def test_truncation_falls_back_to_the_estimate_without_a_playback_report() -> None:
    h = connected(heard=300 * 24)
    h.ev(_session(interrupt=True))
    _audio_turn(h, ms=1000)
    h.ev({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "u"})
    assert h.tick() == []
    h.now = 1.0
    acts = h.tick()
    assert sent(acts, "conversation.item.truncate")[0]["audio_end_ms"] == 300
    assert not published(acts, "playout.interrupted")[0]["measured"]


def test_cancel_command_cancels_when_server_would_not() -> None:
    h = connected(heard=2400)
    h.ev(_session(interrupt=False))
    _audio_turn(h)
    acts = h.cmd("cmd.cancel", {"id": "c1"})
    assert [e["type"] for e in sent(acts)] == ["response.cancel"]
    assert published(acts, "cmd.done") == [{"id": "c1", "ok": True}]
    acts = h.report("flushed", 0, 2400)
    assert [e["type"] for e in sent(acts)] == ["conversation.item.truncate"]
    heard = published(acts, "model.transcript.done")[0]
    assert heard["truncated"] and heard["text"] == ""  # 100 ms of 1000: not one of four words yet


def test_a_finished_reply_is_never_cut_by_the_next_utterance() -> None:
    """Issue 12's sequence: playback.stopped at 1565 ms, then speech 3.5 s later. The heard index in
    shared memory lags the end (read position minus the output latency), yet nothing is flushed."""
    h = connected()
    h.ev(_session(interrupt=True))
    _audio_turn(h, ms=1600, done=True)
    h.heard = 1561 * 24                              # the lagging estimate
    stopped = h.report("stopped", 0, 1600 * 24)
    assert published(stopped, "playout.stopped")[0]["item_id"] == "item_a"
    h.now = 3.5
    acts = h.ev({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5000, "item_id": "u2"})
    assert not any(isinstance(a, Flush) for a in acts) and not sent(acts)
    h.now = 4.0
    assert not sent(h.tick(), "conversation.item.truncate")


def test_every_item_of_a_response_plays_and_truncates_on_its_own() -> None:
    """A preamble and an answer in one response: two streams; a barge-in in the second truncates
    the second at what was heard of it and leaves the first (wholly heard) alone."""
    h = connected()
    h.ev(_session(interrupt=True))
    h.ev({"type": "response.created", "response": {"id": "r", "conversation_id": "c"}})
    starts = []
    for item in ("pre", "ans"):
        for _ in range(5):
            acts = h.ev({"type": "response.output_audio.delta", "response_id": "r", "item_id": item,
                         "delta": base64.b64encode(bytes(4800)).decode()})
            starts += [a.starts_item for a in acts if isinstance(a, Play)]
        assert any(isinstance(a, EndOfAudio) for a in h.ev({"type": "response.output_audio.done", "response_id": "r",
                                                             "item_id": item}))
    assert starts == [True, False, False, False, False] * 2
    assert published(h.report("started", 0, 0, first_sample_mono_ns=1), "playout.started")[0]["item_id"] == "pre"
    assert published(h.report("started", 500 * 24, 500 * 24), "playout.started")[0]["item_id"] == "ans"
    h.report("stopped", 0, 500 * 24)
    h.heard = 700 * 24
    h.ev({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "u"})
    truncs = sent(h.report("flushed", 500 * 24, 720 * 24), "conversation.item.truncate")
    assert truncs == [{"type": "conversation.item.truncate", "item_id": "ans", "content_index": 0, "audio_end_ms": 220}]


def test_back_to_back_replies_each_get_started_and_latency() -> None:
    """Issue 15 point 19: replies queued back to back each get playout.started and latency.turn."""
    h = connected()
    for i in range(3):
        h.cmd("cmd.say", {"text": f"q{i}", "id": f"s{i}"})
    latencies = []
    for i in range(3):
        rid, item = f"r{i}", f"a{i}"
        h.now = float(i)
        h.ev({"type": "response.created", "response": {"id": rid, "conversation_id": "c"}})
        h.ev({"type": "response.output_audio.delta", "response_id": rid, "item_id": item,
              "delta": base64.b64encode(bytes(4800)).decode()})
        h.ev({"type": "response.output_audio.done", "response_id": rid, "item_id": item})
        latencies += published(h.ev({"type": "response.done", "response": {"id": rid, "status": "completed",
                                                                              "output": []}}), "latency.turn")
        start = h.core.playout.items[item].start_index
        started = h.report("started", start, start, first_sample_mono_ns=int((i + 0.2) * 1e9))
        assert published(started, "playout.started")[0]["item_id"] == item
        latencies += published(started, "latency.turn")
    assert [lat["response_id"] for lat in latencies] == ["r0", "r1", "r2"]


def test_no_barge_in_when_audio_already_heard() -> None:
    h = connected(heard=10**9)
    h.ev(_session(interrupt=True))
    _audio_turn(h)
    h.ev({"type": "response.done", "response": {"id": "resp_1", "status": "completed", "output": []}})
    acts = h.ev({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "u"})
    assert not any(isinstance(a, (Send, Flush)) for a in acts)


# ------------------------------------------------------------------ client text
def test_say_waits_for_the_active_response_and_appears_on_user_text() -> None:
    h = connected()
    h.ev({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}})
    assert not sent(h.cmd("cmd.say", {"text": "hi", "id": "s1"}))
    acts = h.ev({"type": "response.done", "response": {"id": "r1", "status": "completed", "output": []}})
    assert [e["type"] for e in sent(acts)] == ["conversation.item.create", "response.create"]
    item_id = sent(acts)[0]["item"]["id"]
    added = h.ev({"type": "conversation.item.added", "item": {"id": item_id, "type": "message", "role": "user",
                                                               "content": []}})
    assert published(added, "cmd.done") == [{"id": "s1", "ok": True, "item_id": item_id}]
    assert published(added, "user.text")[0]["text"] == "hi"
    assert only_taken(h.cmd("cmd.say", {"text": "hi", "id": "s1"}, offered=True), "s1")  # the broker's copy


def test_a_sender_that_sends_a_command_again_hears_its_outcome_again() -> None:
    """A client whose reply subscriber joined the bus after the command's cmd.done went out (ZeroMQ's
    slow joiner) sends it again: it is not carried out twice, and its cmd.done comes again. Before
    its outcome is known, a re-send is only said taken: the cmd.done still comes, once."""
    h = connected()
    item_id = sent(h.cmd("cmd.say", {"text": "hi", "id": "s1"}), "conversation.item.create")[0]["item"]["id"]
    early = h.cmd("cmd.say", {"text": "hi", "id": "s1"})
    assert only_taken(early, "s1") and not sent(early)
    added = h.ev({"type": "conversation.item.added", "item": {"id": item_id, "type": "message", "role": "user",
                                                               "content": []}})
    assert published(added, "cmd.done") == [{"id": "s1", "ok": True, "item_id": item_id}]
    again = h.cmd("cmd.say", {"text": "hi", "id": "s1"})
    assert not sent(again) and published(again, "intake.taken") == [{"taken": ["s1"]}]
    assert published(again, "cmd.done") == [{"id": "s1", "ok": True, "item_id": item_id, "repeated": True}]
    reused = h.cmd("cmd.cancel", {"id": "s1"})                    # another command under s1's id: a mistake
    (err,) = published(reused, "engine.error")
    assert err["code"] == "id_reused" and "cmd.say" in err["message"] and "id of its own" in err["message"]
    assert published(reused, "cmd.done") == [{"id": "s1", "ok": False, "error": err["message"], "code": "id_reused"}]
    assert not sent(reused)                                        # not carried out
    assert published(h.cmd("cmd.say", {"text": "hi", "id": "s1"}), "cmd.done")[0]["item_id"] == item_id
    bad = {"name": "", "id": "t1"}                                 # an outcome that failed comes again the same
    (failed,) = published(h.cmd("cmd.tool.register", bad), "cmd.done")
    assert published(h.cmd("cmd.tool.register", bad), "cmd.done") == [{**failed, "repeated": True}]


def test_say_while_the_socket_is_down_is_kept_and_sent_on_reconnect() -> None:
    """Issue 15 point 4: a say with the socket down and nothing active was lost for good."""
    h = Harness()
    assert not sent(h.cmd("cmd.say", {"text": "hello", "id": "s1"}))
    assert only_taken(h.cmd("cmd.say", {"text": "hello", "id": "s1"}), "s1")  # the client's retry: held once
    acts = h(Connected(reconnect=True))
    assert [e["type"] for e in sent(acts)] == ["session.update", "conversation.item.create", "response.create"]


def test_an_unacknowledged_say_is_sent_again_after_a_drop() -> None:
    h = connected()
    first = sent(h.cmd("cmd.say", {"text": "hello", "id": "s1"}), "conversation.item.create")[0]
    acts = h(Disconnected(1006, "lost"))
    assert published(acts, "engine.status")[0]["state"] == "disconnected"
    assert not published(acts, "response.done")  # it will be answered on the next socket
    again = sent(h(Connected(reconnect=True)), "conversation.item.create")
    assert again[-1]["item"]["content"] == first["item"]["content"]


def test_an_answer_cut_by_a_drop_is_reported_failed_with_its_request() -> None:
    """Issue 15 point 5: no response.done, so a waiter hung."""
    h = connected()
    item_id = sent(h.cmd("cmd.say", {"text": "hello", "id": "s1"}), "conversation.item.create")[0]["item"]["id"]
    h.ev({"type": "conversation.item.added", "item": {"id": item_id, "type": "message", "role": "user", "content": []}})
    h.ev({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}})
    h.ev({"type": "response.output_audio.delta", "response_id": "r1", "item_id": "a",
          "delta": base64.b64encode(bytes(4800)).decode()})
    acts = h(Disconnected(1006, "lost"))
    done = published(acts, "response.done")
    assert done == [{**done[0], "response_id": "r1", "request_id": "s1", "status": "failed"}]
    assert any(isinstance(a, EndOfAudio) for a in acts)  # playback ends the stream: not an underrun
    # the next socket replays the conversation, and new requests go through
    acts = h(Connected(reconnect=True))
    replayed = [e["item"] for e in sent(acts, "conversation.item.create")]
    assert replayed[0]["content"][0]["text"] == "hello"
    assert sent(h.cmd("cmd.say", {"text": "again", "id": "s2"}), "response.create")


def test_a_restarted_core_takes_the_conversation_and_fails_what_was_in_flight() -> None:
    h = connected(heard=1 << 62)
    item_id = sent(h.cmd("cmd.say", {"text": "hello", "id": "s1"}), "conversation.item.create")[0]["item"]["id"]
    h.ev({"type": "conversation.item.added", "item": {"id": item_id, "type": "message", "role": "user", "content": []}})
    history = published(h.ev({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}}),
                        "conversation.history")[-1]
    assert history["in_flight"] == ["s1"]
    fresh = Harness()
    failed = published(fresh.core.restore_history(history), "response.done")
    assert failed[0]["request_id"] == "s1" and failed[0]["status"] == "failed"
    replay_items = sent(fresh(Connected(reconnect=True, reason="restart")), "conversation.item.create")
    assert replay_items[0]["item"]["content"][0]["text"] == "hello"


def test_system_message_without_response() -> None:
    h = connected()
    sends = sent(h.cmd("cmd.say", {"text": "The user is Ada.", "role": "system", "respond": False}))
    assert len(sends) == 1 and sends[0]["item"]["role"] == "system"


@pytest.mark.parametrize("body, words", [({"text": ""}, "non-empty"), ({"text": "x", "role": "robot"}, "role"),
                                         ({"text": "x", "respond": "yes"}, "respond")])
def test_bad_commands_are_reported(body: dict[str, Any], words: str) -> None:
    h = connected()
    acts = h.cmd("cmd.say", {**body, "id": "bad"})
    assert words in published(acts, "engine.error")[0]["message"]
    assert published(acts, "cmd.done")[0]["ok"] is False
    assert h.core.malformed_commands == 1


def test_unregister_without_a_name_and_bad_session_tools_are_refused() -> None:
    h = connected()
    assert published(h.cmd("cmd.tool.unregister", {"id": "u"}), "cmd.done")[0]["ok"] is False
    acts = h.cmd("cmd.session.update", {"id": "t", "session": {"tools": "lookup"}})
    assert published(acts, "cmd.done")[0]["ok"] is False and not sent(acts)
    # the next registration still works
    assert published(h.cmd("cmd.tool.register", {"name": "lookup", "id": "r"}), "cmd.done")[0]["ok"]


def test_an_error_caused_by_a_command_names_its_request() -> None:
    h = connected()
    acts = h.cmd("cmd.say", {"text": "x", "id": "s1"})
    event_id = sent(acts, "conversation.item.create", ids=True)[0]["event_id"]
    acts = h.ev({"type": "error", "event_id": "e", "error": {"type": "invalid_request_error", "code": "invalid_value",
                                                             "message": "bad", "event_id": event_id}})
    assert published(acts, "engine.error")[0]["request_id"] == "s1"
    assert published(acts, "cmd.done") == [{"id": "s1", "ok": False, "error": "bad", "code": "invalid_value"}]


def test_budget_stops_new_responses() -> None:
    h = connected(budget_usd=0.0001)
    usage = {"input_token_details": {"text_tokens": 1000}, "output_token_details": {"audio_tokens": 100}}
    acts = h.ev({"type": "response.done", "response": {"id": "r", "status": "completed", "output": [], "usage": usage}})
    assert published(acts, "engine.budget")[0]["exceeded"]
    assert not sent(h.cmd("cmd.say", {"text": "more"}), "response.create")


def test_an_unpriced_model_is_a_config_error_naming_the_priced_ones() -> None:
    with pytest.raises(ConfigError, match="gpt-realtime"):
        RealtimeCore("gpt-imaginary", {})


def test_a_failing_handler_is_reported_and_the_queue_still_drains() -> None:
    """Issue 14 point 2: a handler that raised left the response slot half-applied; queued says waited forever."""
    h = connected()
    h.ev({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}})
    h.cmd("cmd.say", {"text": "next", "id": "s1"})
    acts = h.ev({"type": "response.done", "response": {"id": "r1", "status": "completed", "output": [],
                                                        "usage": {"input_token_details": "garbage"}}})
    assert published(acts, "engine.error")[0]["code"] == "handler_failed"
    assert h.core.requests.slot.value == "active"  # untouched by the failed handler ...
    acts = h.ev({"type": "response.done", "response": {"id": "r1", "status": "completed", "output": []}})
    assert sent(acts, "response.create")           # ... so the next done still drains the queue


def test_tool_timeout_answers_the_model() -> None:
    h = connected()
    h.cmd("cmd.tool.register", {"name": "ask_client", "timeout_s": 2})
    h.ev({"type": "response.function_call_arguments.done", "call_id": "call_1", "name": "ask_client",
          "arguments": "{}", "item_id": "i", "response_id": "r"})
    assert h.tick() == []
    h.now = 3.0
    sends = sent(h.tick())
    assert sends[0]["item"]["type"] == "function_call_output" and "did not answer" in sends[0]["item"]["output"]
    assert sends[1]["type"] == "response.create"


def test_mic_audio_goes_through_the_core_only_when_connected() -> None:
    h = Harness()
    assert h(MicAudio(bytes(960), 1.0)) == []
    h(Connected())
    assert h(MicAudio(bytes(960), 1.0)) == [SendAudio(bytes(960))]


def test_next_deadline_names_the_earliest_timer() -> None:
    h = connected(min_speech_ms=300)
    assert h.core.next_deadline() is None
    h.cmd("cmd.tool.register", {"name": "lookup", "timeout_s": 30})
    h.ev({"type": "response.function_call_arguments.done", "call_id": "c1", "name": "lookup", "arguments": "{}"})
    h.ev({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u"})
    assert h.core.next_deadline() == pytest.approx(0.3)


# ------------------------------------------------------------------ conversation control (issue 12)
def test_push_to_talk_commit_acks_on_committed_then_responds() -> None:
    h = connected()
    acts = h.cmd("cmd.input.commit", {"id": "p1"})
    assert [e["type"] for e in sent(acts)] == ["input_audio_buffer.commit", "response.create"]
    assert not published(acts, "cmd.done")
    acks = published(h.ev({"type": "input_audio_buffer.committed", "item_id": "u1", "previous_item_id": None}), "cmd.done")
    assert acks == [{"id": "p1", "ok": True, "item_id": "u1"}]


def test_an_empty_commit_is_refused_on_its_ack() -> None:
    h = connected()
    event_id = sent(h.cmd("cmd.input.commit", {"id": "p1", "respond": False}), ids=True)[0]["event_id"]
    acts = h.ev({"type": "error", "event_id": "e", "error": {"type": "invalid_request_error",
                                                             "code": "input_audio_buffer_commit_empty",
                                                             "message": "buffer too small", "event_id": event_id}})
    assert published(acts, "cmd.done") == [{"id": "p1", "ok": False, "error": "buffer too small",
                                           "code": "input_audio_buffer_commit_empty"}]


def test_mic_gate_and_clear() -> None:
    h = connected()
    assert published(h.cmd("cmd.mic", {"open": False, "id": "m"}), "cmd.done")[0]["ok"]
    assert h(MicAudio(bytes(960), 1.0)) == []
    h.cmd("cmd.mic", {"open": True})
    assert h(MicAudio(bytes(960), 1.0)) == [SendAudio(bytes(960))]
    assert [e["type"] for e in sent(h.cmd("cmd.input.clear", {"id": "c"}))] == ["input_audio_buffer.clear"]
    assert published(h.cmd("cmd.mic", {"open": "yes", "id": "m2"}), "cmd.done")[0]["ok"] is False


def test_an_out_of_band_reply_is_tagged_silent_and_outside_the_conversation() -> None:
    h = connected()
    h.ev({"type": "response.created", "response": {"id": "r_main", "conversation_id": "c"}})  # the model is talking
    acts = h.cmd("cmd.respond", {"id": "q1", "response": {"conversation": "none", "instructions": "Classify.",
                                                          "input": [], "metadata": {"topic": "x"}}})
    create = sent(acts, "response.create")[0]  # not behind the active response
    assert create["response"]["metadata"] == {"topic": "x", "realtalk_request_id": "q1"}
    assert create["response"]["output_modalities"] == ["text"]
    h.ev({"type": "response.created", "response": {"id": "r_oob", "conversation_id": None,
                                                   "metadata": create["response"]["metadata"]}})
    assert h.core.requests.active_response == "r_main"
    audio = h.ev({"type": "response.output_audio.delta", "response_id": "r_oob", "item_id": "o",
                  "delta": base64.b64encode(bytes(480)).decode()})
    assert not any(isinstance(a, Play) for a in audio)
    text = h.ev({"type": "response.output_text.done", "response_id": "r_oob", "item_id": "o", "text": "positive"})
    assert published(text, "model.text.done")[0]["request_id"] == "q1"
    assert not published(text, "conversation.history")
    done = h.ev({"type": "response.done", "response": {"id": "r_oob", "status": "completed", "output": []}})
    assert published(done, "response.done")[0]["request_id"] == "q1"
    assert h.core.requests.active_response == "r_main"


@pytest.mark.parametrize("options, word", [({"colour": "red"}, "unknown response option 'colour'"),
                                           ({"output_modalities": ["smell"]}, "output_modalities"),
                                           ({"max_output_tokens": 10**6}, "max_output_tokens")])
def test_bad_response_options_are_refused_naming_the_known_ones(options: dict[str, Any], word: str) -> None:
    h = connected()
    ack = published(h.cmd("cmd.say", {"text": "x", "id": "s", "response": options}), "cmd.done")[0]
    assert ack["ok"] is False and word in ack["error"]


def test_a_refused_session_update_is_refused_on_its_ack_and_rolled_back() -> None:
    """Issue 12: session.update with a removed GA field was acked ok while the server refused it."""
    h = connected()
    h.ev({"type": "session.updated", "session": {"type": "realtime"}})  # confirms the update sent at connect
    event_id = sent(h.cmd("cmd.session.update", {"id": "u1", "session": {"temperature": 0.7}}), ids=True)[0]["event_id"]
    assert "temperature" in h.core.session_config
    acts = h.ev({"type": "error", "event_id": "e", "error": {"type": "invalid_request_error",
                                                             "code": "unknown_parameter", "param": "session.temperature",
                                                             "message": "Unknown parameter", "event_id": event_id}})
    assert published(acts, "cmd.done") == [{"id": "u1", "ok": False, "error": "Unknown parameter",
                                           "code": "unknown_parameter"}]
    assert "temperature" not in h.core.session_config
    sent(h.cmd("cmd.session.update", {"id": "u2", "session": {"instructions": "Be brief."}}))
    assert published(h.ev({"type": "session.updated", "session": {"type": "realtime"}}), "cmd.done") == \
        [{"id": "u2", "ok": True}]


def test_every_client_event_carries_an_event_id() -> None:
    h = connected(heard=0)
    acts = h.cmd("cmd.say", {"text": "x", "id": "s"})
    h.ev(_session(interrupt=False))
    _audio_turn(h, rid="r9", item="a9")
    acts += h.cmd("cmd.cancel", {}) + h.report("flushed", 0, 0) + h.cmd("cmd.input.clear", {})
    acts += h.cmd("cmd.tool.register", {"name": "t"})
    events = [a.event for a in acts if isinstance(a, Send)]
    assert {e["type"] for e in events} >= {"conversation.item.create", "response.create", "response.cancel",
                                           "conversation.item.truncate", "input_audio_buffer.clear", "session.update"}
    assert all(e.get("event_id") for e in events)


def test_a_bad_playback_report_is_reported_not_ignored() -> None:
    """Issue 15 point 8: a playback.flushed without an index was dropped silently."""
    h = connected()
    errors = published(h.report("flushed", None, None), "engine.error")
    assert errors and errors[0]["code"] == "bad_playback_report" and "index" in errors[0]["message"]
    assert published(h.report("cadence", None, None), "engine.error") == []


# ------------------------------------------------------------------ the state a restarted process starts from
def _restart(h: Harness) -> tuple[Harness, list[Any]]:
    """A fresh core started from ``h``'s latest published state, its first socket opened."""
    state = h.core.history_message().payload
    fresh = Harness()
    acts = fresh.core.restore_history(state)
    return fresh, acts + fresh(Connected(reconnect=True, reason="restart"))


def test_a_say_taken_but_not_yet_added_is_sent_by_the_successor_after_the_conversation() -> None:
    """A command the crashed process had taken (so the broker let it go) was lost with it."""
    h = connected()
    first = sent(h.cmd("cmd.say", {"text": "my code is ZX9", "id": "s1", "respond": False}),
                 "conversation.item.create")[0]["item"]["id"]
    h.ev({"type": "conversation.item.added", "item": {"id": first, "type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "my code is ZX9"}]}})
    h.ev({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}})
    h.cmd("cmd.say", {"text": "which code?", "id": "s2"})          # queued behind r1
    fresh, acts = _restart(h)
    assert not published(acts, "response.done")                   # nothing of s2 was in flight
    items = [e["item"] for e in sent(acts, "conversation.item.create")]
    assert [i["content"][0]["text"] for i in items] == ["my code is ZX9", "which code?"]
    assert items[0]["id"] == first                                  # its echo is known, not added twice
    assert not published(fresh.ev({"type": "conversation.item.added", "item": {
        "id": first, "type": "message", "role": "user", "content": [{"type": "input_text", "text": "my code is ZX9"}]}}),
        "conversation.history")
    assert sent(acts, "response.create")                            # s2 is answered in the new session
    assert only_taken(fresh.cmd("cmd.say", {"text": "which code?", "id": "s2"}), "s2")   # the broker's copy: once


def test_a_restarted_process_repeats_the_outcomes_its_predecessor_published() -> None:
    """A sender's re-send across a restart got only ``taken``: the successor knew the keys its
    predecessor took, not their outcomes, so a client that had missed the cmd.done waited on."""
    h = connected()
    item_id = sent(h.cmd("cmd.say", {"text": "hi", "id": "s1"}), "conversation.item.create")[0]["item"]["id"]
    added = h.ev({"type": "conversation.item.added", "item": {"id": item_id, "type": "message", "role": "user",
                                                               "content": []}})
    assert published(added, "cmd.done") == [{"id": "s1", "ok": True, "item_id": item_id}]
    acts = h.cmd("cmd.tool.register", {"name": "lookup", "id": "t1"})
    assert published(acts, "cmd.done") == [{"id": "t1", "ok": True}]
    bad = h.cmd("cmd.tool.register", {"name": "", "id": "t2"})      # an outcome that failed
    assert [p["taken"] for p in published(bad, "intake.taken")] == [["t2"]]   # one message: the key and its outcome
    fresh = Harness()                                               # started as the process is: the broker's hand-over
    fresh.core.restore_outcomes(dict(h.broker.outcomes))
    fresh.core.restore_history(h.core.history_message().payload)
    assert fresh.core.taken["t1"] == "cmd.tool.register"             # the state's keys keep the outcomes' topics
    fresh(Connected(reconnect=True, reason="restart"))
    again = fresh.cmd("cmd.say", {"text": "hi", "id": "s1"})
    assert not sent(again) and published(again, "cmd.done") == [{"id": "s1", "ok": True, "item_id": item_id,
                                                                 "repeated": True}]
    assert published(fresh.cmd("cmd.tool.register", {"name": "lookup", "id": "t1"}), "cmd.done") == [
        {"id": "t1", "ok": True, "repeated": True}]
    assert published(fresh.cmd("cmd.tool.register", {"name": "", "id": "t2"}), "cmd.done")[0]["ok"] is False
    offered = fresh(Command("cmd.say", {"text": "hi", "id": "s1"}, offered=True))   # the broker's copy: none
    assert only_taken(offered, "s1") and not published(offered, "cmd.done")
    reused = fresh.cmd("cmd.cancel", {"id": "t1"})                  # the successor knows t1's topic too
    assert published(reused, "cmd.done")[0]["code"] == "id_reused" and not sent(reused)
    fresh.core.restore_outcomes({"x": {"topic": None, "done": {"id": "y"}}, 3: {}, "z": "junk",
                                 "w": {"topic": 5, "done": {"id": "w"}}})            # odd entries: skipped
    assert not {"x", "z", "w"} & (set(fresh.core.outcomes) | set(fresh.core.taken))


def test_a_say_sent_with_its_response_but_not_added_is_sent_again_not_failed() -> None:
    h = connected()
    h.cmd("cmd.say", {"text": "hello", "id": "s1"})                # item.create and response.create sent
    assert h.core.history_message().payload["in_flight"] == ["s1"]
    _, acts = _restart(h)
    assert not published(acts, "response.done")
    assert [e["type"] for e in sent(acts)] == ["session.update", "conversation.item.create", "response.create"]


def test_the_successor_keeps_tools_session_and_mic_gate_and_refuses_a_lost_commit() -> None:
    h = connected()
    h.cmd("cmd.tool.register", {"name": "lookup", "owner": "tools:1", "timeout_s": 3, "id": "t"})
    h.ev({"type": "session.updated", "session": {"type": "realtime"}})
    h.cmd("cmd.session.update", {"session": {"instructions": "Be brief."}, "id": "u"})
    h.cmd("cmd.mic", {"open": False, "id": "m"})
    h.cmd("cmd.input.commit", {"id": "p1", "respond": False})
    fresh, acts = _restart(h)
    done = {d["id"]: d for d in published(acts, "cmd.done")}
    assert sorted(done) == ["p1", "u"]                  # the update in flight is answered too (R5)
    assert done["u"]["ok"] is True and done["u"]["applied"] == "on reconnect"
    assert done["p1"]["ok"] is False and "speak again" in done["p1"]["error"]
    assert published(fresh.cmd("cmd.input.commit", {"id": "p1", "respond": False}), "cmd.done")[0]["repeated"]
    update = sent(acts, "session.update")[0]["session"]
    assert update["instructions"] == "Be brief." and [t["name"] for t in update["tools"]] == ["lookup"]
    assert fresh.core.tools.registered["lookup"].owner == "tools:1" and fresh.core.mic_open is False


def test_the_conversation_is_every_item_in_the_apis_order_with_text_for_audio() -> None:
    """Trace 08: the first user turn's transcript comes after the reply to the second has begun."""
    h, _, events = replay("08-ga-barge-in-cancel-truncate.jsonl")
    items = h.core.history
    added = [e["item"]["id"] for e in events if e["type"] == "conversation.item.added"]
    assert [i["id"] for i in items] == [i for i in added if i in {x["id"] for x in items}]
    # the first answer was cut before a word of it was heard (nothing plays in this replay): not replayed
    assert [i["role"] for i in items] == ["user", "user", "assistant"]
    transcripts = {e["item_id"]: e["transcript"] for e in events
                   if e["type"] == "conversation.item.input_audio_transcription.completed"}
    assert [i["content"][0]["text"] for i in items if i["role"] == "user"] == [transcripts[i["id"]] for i in items
                                                                              if i["role"] == "user"]
    assert all(i["content"][0]["type"] == ("output_text" if i["role"] == "assistant" else "input_text") for i in items)


def test_a_user_turn_without_a_transcript_is_replayed_as_such() -> None:
    from engine.realtime.history import UNTRANSCRIBED
    h = connected()
    h.ev({"type": "conversation.item.added", "previous_item_id": None,
          "item": {"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_audio", "transcript": None}]}})
    h.ev({"type": "conversation.item.added", "previous_item_id": "u1",
          "item": {"id": "a1", "type": "message", "role": "assistant", "content": []}})
    assert [i["id"] for i in h.core.history] == ["u1"]              # the answer is still coming
    h.ev({"type": "conversation.item.done", "previous_item_id": "u1", "item": {
        "id": "a1", "type": "message", "role": "assistant", "content": [{"type": "output_audio", "transcript": "Hi."}]}})
    assert [i["content"][0]["text"] for i in h.core.history] == [UNTRANSCRIBED, "Hi."]
    h.ev({"type": "conversation.item.deleted", "item_id": "u1"})
    assert [i["id"] for i in h.core.history] == ["a1"]


def test_a_command_id_that_is_not_a_string_is_refused() -> None:
    h = connected()
    acts = h.cmd("cmd.say", {"text": "x", "id": 5})   # no ack can name it: the core reports it
    assert "'id' must be a non-empty string" in published(acts, "engine.error")[0]["message"]
    assert not sent(acts)


def test_an_unknown_command_the_intake_refused_is_not_reported_again() -> None:
    """The broker's intake refuses an unknown cmd.* topic on its cmd.ack (naming the known ones);
    the core, which sees the same message live, counts it and stays silent (issue 23 point 7:
    each malformed bus message is reported once)."""
    from bus.intake import Intake
    h = connected()
    acts = h.cmd("cmd.bogus", {"id": "b1"})
    assert not published(acts, "engine.error") and not published(acts, "cmd.done") and not sent(acts)
    assert h.core.malformed_commands == 1
    ack = Intake().command("cmd.bogus", {"id": "b1"}, [b"", b""], 0.0)
    assert ack is not None and ack["ok"] is False and "unknown command 'cmd.bogus'" in ack["error"]
    (err,) = published(h.cmd("cmd.bogus", {}), "engine.error")   # with no id the intake cannot say it
    assert "unknown command topic 'cmd.bogus'" in err["message"]


def test_a_tool_answer_to_a_call_made_before_a_restart_still_reaches_the_model() -> None:
    """The call was in the dead process's memory only: its answer, held by the broker, was ignored."""
    h = connected()
    h.ev({"type": "conversation.item.added", "previous_item_id": None, "item": {
        "id": "f1", "type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "",
        "status": "in_progress"}})
    h.ev({"type": "response.function_call_arguments.done", "call_id": "call_1", "name": "lookup",
          "arguments": "{}", "item_id": "f1", "response_id": "r"})
    fresh, _ = _restart(h)
    sends = sent(fresh.cmd("cmd.tool.result", {"call_id": "call_1", "output": {"ok": 1}, "id": "t1"}))
    assert sends[0]["item"]["type"] == "function_call_output" and sends[0]["item"]["output"] == '{"ok": 1}'
    assert sends[1]["type"] == "response.create"
    assert published(fresh.cmd("cmd.tool.result", {"call_id": "call_1", "output": "again", "id": "t2"}),
                     "cmd.done")[0]["late"] is True


def test_taking_a_command_tells_the_broker_with_the_state_only_when_it_changed_it() -> None:
    """A junk command made the realtime process publish its whole state (50 items) for each one."""
    h = connected()
    say = h.cmd("cmd.say", {"text": "hello", "id": "s1", "respond": False})
    assert "s1" in published(say, "conversation.history")[-1]["taken"]     # the say is pending in the state
    cancel = h.cmd("cmd.cancel", {"id": "c1"})
    assert not published(cancel, "conversation.history")
    assert published(cancel, "intake.taken") == [{"taken": ["c1"], "outcomes": {
        "c1": {"topic": "cmd.cancel", "done": {"id": "c1", "ok": True}}}}]
    bad = h.cmd("cmd.mic", {"open": "yes", "id": "m1"})
    (failed,) = published(bad, "cmd.done")
    assert failed["ok"] is False and published(bad, "intake.taken") == [{"taken": ["m1"], "outcomes": {
        "m1": {"topic": "cmd.mic", "done": failed}}}]
    mic = h.cmd("cmd.mic", {"open": False, "id": "m2"})
    assert published(mic, "conversation.history")[-1]["mic_open"] is False


def _refuse(h: Harness, event_id: str) -> list[Any]:
    return h(ServerEvent({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value",
                                                     "message": "Invalid value: 'purple'.", "event_id": event_id}}))


def test_a_refused_update_reverts_only_its_own_keys_and_a_refused_replay_falls_back() -> None:
    """A refused update reset the config to its own ``before``, erasing a later update that had been
    confirmed ok; and a bad value set while disconnected became its own rollback point, so it was
    sent and refused again on every reconnect, the whole update with it (the review)."""
    h = connected()
    h.ev({"type": "session.updated", "session": {"type": "realtime"}})   # the connect's own update, confirmed
    a = sent(h.cmd("cmd.session.update", {"session": {"voice": "purple"}, "id": "a"}), "session.update", ids=True)[0]
    sent(h.cmd("cmd.session.update", {"session": {"instructions": "Be brief."}, "id": "b"}), "session.update")
    _refuse(h, a["event_id"])
    assert h.core.session_config.get("instructions") == "Be brief." and "voice" not in h.core.session_config
    # a bad value while disconnected: acked on reconnect, then refused with the whole replay
    h(Disconnected(1006))
    h.cmd("cmd.session.update", {"session": {"voice": "purple"}, "id": "c"})
    replay = sent(h(Connected(reconnect=True)), "session.update", ids=True)[0]
    assert replay["session"]["voice"] == "purple"
    acts = _refuse(h, replay["event_id"])
    (lost,) = published(acts, "engine.error")[1:]
    assert lost["code"] == "session_config_refused" and lost["updates"] == ["b", "c"]   # acked, then not applied
    (fallback,) = sent(acts, "session.update")        # at once: the session must not run on the defaults
    assert "voice" not in fallback["session"] and "instructions" not in fallback["session"]
    assert sent(_refuse(h, sent(acts, "session.update", ids=True)[0]["event_id"]), "session.update") == []   # once
    h(Disconnected(1006))
    again = sent(h(Connected(reconnect=True)), "session.update")[0]["session"]
    assert "voice" not in again and "instructions" not in again      # the config the server last confirmed
