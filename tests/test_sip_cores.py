"""The protocol cores on a SIP call's control socket: the Live sideband (no session.start, no
audio either way, DTMF both ways) and the Realtime call socket (the caller's keys)."""
from __future__ import annotations

from engine.realtime.core import RealtimeCore
from engine.realtime.live_core import LiveCore, LiveState
from engine.realtime.records import Command, Connected, Play, Publish, Send, ServerEvent, Tick


def published(acts: list, topic: str) -> list[dict]:
    return [a.payload for a in acts if isinstance(a, Publish) and a.topic == topic]


def test_live_sideband_attaches_without_session_start_or_audio() -> None:
    core = LiveCore("gpt-live-1", {"instructions": "x"}, sideband=True)
    waiting = core.handle(Command("cmd.commentary", {"text": "The booking is ZX9.", "id": "c1"}), 0.0, 0)
    assert not [a for a in waiting if isinstance(a, Send)]          # waits for the socket
    acts = core.handle(Connected(reconnect=False, reason="start"), 1.0, 0)
    sends = [a.event for a in acts if isinstance(a, Send)]
    assert core.state is LiveState.ACTIVE and [e["type"] for e in sends] == ["session.commentary.append"]
    replay = core.handle(ServerEvent({"type": "session.started", "event_id": "e", "session": {"id": "live_1"}}), 1.1, 0)
    assert core.session_id == "live_1" and not [a for a in replay if isinstance(a, Send)]
    audio = core.handle(ServerEvent({"type": "session.output_audio.delta", "delta": "AAAA", "start_ms": 0,
                                     "end_ms": 1}), 1.2, 0)
    assert not [a for a in audio if isinstance(a, Play)]
    reflected = core.handle(ServerEvent({"type": "session.input_audio.append", "audio": "AAAA"}), 1.3, 0)
    assert not published(reflected, "server.session.input_audio.append")
    assert core.next_deadline() is None or not [a for a in core.handle(Tick(), 5.0, 0) if isinstance(a, Send)]


def test_live_sideband_dtmf_both_ways() -> None:
    core = LiveCore("gpt-live-1", {}, sideband=True)
    core.handle(Connected(reconnect=False, reason="start"), 0.0, 0)
    got = core.handle(ServerEvent({"type": "transport.dtmf.received", "event": "5", "event_id": "e1"}), 0.1, 0)
    assert published(got, "sip.dtmf") == [{"key": "5", "from": "caller"}]
    acts = core.handle(Command("cmd.dtmf", {"keys": "1#", "id": "d1"}), 0.2, 0)
    sends = [a.event for a in acts if isinstance(a, Send)]
    assert [(e["type"], e["event"]) for e in sends] == [("transport.dtmf.send", "1"), ("transport.dtmf.send", "#")]
    core.handle(ServerEvent({"type": "transport.dtmf.sent", "event": "1", "client_event_id": sends[0]["event_id"]}),
                0.3, 0)
    done = core.handle(ServerEvent({"type": "transport.dtmf.sent", "event": "#",
                                    "client_event_id": sends[1]["event_id"]}), 0.4, 0)
    assert published(done, "cmd.done") == [{"id": "d1", "ok": True, "key": "#"}]
    bad = core.handle(Command("cmd.dtmf", {"keys": "x", "id": "d2"}), 0.5, 0)
    assert published(bad, "cmd.done")[0]["ok"] is False
    plain = LiveCore("gpt-live-1", {})
    refused = plain.handle(Command("cmd.dtmf", {"keys": "1", "id": "d3"}), 0.0, 0)
    assert "SIP" in published(refused, "cmd.done")[0]["error"]


def test_realtime_call_socket_publishes_the_callers_keys_and_refuses_sending() -> None:
    core = RealtimeCore("gpt-realtime", {"type": "realtime"})
    acts = core.handle(ServerEvent({"type": "input_audio_buffer.dtmf_event_received", "event": "#",
                                    "received_at": 1791000000}), 0.0, 0)
    assert published(acts, "sip.dtmf") == [{"key": "#", "from": "caller", "received_at": 1791000000}]
    refused = core.handle(Command("cmd.dtmf", {"keys": "1", "id": "x"}), 0.0, 0)
    assert "live" in published(refused, "cmd.done")[0]["error"]


def test_a_call_socket_that_reconnects_replays_no_history() -> None:
    from engine.realtime.records import Disconnected
    for keeps, replayed in ((False, True), (True, False)):
        core = RealtimeCore("gpt-realtime", {"type": "realtime"}, keeps_session=keeps)
        core.handle(Connected(reconnect=False, reason="start"), 0.0, 0)
        core.conversation.restore([{"id": "item_1", "type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": "hi"}]}])
        core.handle(Disconnected(1006, "lost"), 0.2, 0)
        acts = core.handle(Connected(reconnect=True, reason="reconnect"), 0.3, 0)
        items = [a for a in acts if isinstance(a, Send) and a.event["type"] == "conversation.item.create"]
        assert bool(items) is replayed
