"""The broker's command intake (bus/intake.py): acks at once, holds for the realtime process,
hands over in order, releases what the process's state says it took."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from bus import Publisher, Subscriber, decode, encode, generate_keys
from bus.intake import MAX_HELD, REMEMBERED_OUTCOMES, REOFFER_S, Intake, Mode
from bus.security import sign, verify
from tests.helpers import thread_broker, wait_topic

pytestmark = pytest.mark.timeout(30)


def state_of(ack: dict[str, Any] | None) -> str:
    assert ack is not None
    return str(ack["state"])


def frames_of(topic: str, seq: int, **payload: Any) -> tuple[str, dict[str, Any], list[bytes]]:
    frames = encode(topic, payload, "client:1", seq)
    return topic, decode(frames)[1], frames


# ------------------------------------------------------------------ pure
def test_a_command_is_acked_queued_and_held_with_its_frames_as_they_came() -> None:
    intake = Intake()
    topic, body, frames = frames_of("cmd.say", 1, text="hi", id="s1")
    frames = frames + [b"x" * 64]   # a third frame is kept too
    assert intake.command(topic, body, frames, 0.0) == {"id": "s1", "ok": True, "state": "queued", "topic": "cmd.say"}
    assert intake.handover(0.0) == [frames]
    # a client's copy is acked again, not held twice
    assert state_of(intake.command(topic, body, frames, 0.1)) == "queued"
    assert len(intake.held) == 1


def test_the_state_releases_what_it_took_and_a_late_copy_is_acked_taken() -> None:
    intake = Intake()
    for n in range(3):
        intake.command(*frames_of("cmd.say", n + 1, text=f"q{n}", id=f"s{n}"), 0.0)
    assert intake.state({"taken": ["s0", "s2", 7]}) == 2
    assert [decode(f)[1]["id"] for f in intake.handover(0.0)] == ["s1"]
    assert state_of(intake.command(*frames_of("cmd.say", 9, text="q0", id="s0"), 0.0)) == "taken"
    assert len(intake.held) == 1 and intake.held_bytes == sum(len(f) for f in intake.held["s1"].frames)


def test_the_outcomes_the_realtime_process_publishes_are_kept_and_answer_a_re_send() -> None:
    """A restarted realtime process knew which commands were taken, not their outcomes: a sender's
    re-send got no cmd.done. The intake keeps them (the last REMEMBERED_OUTCOMES) for the hand-over,
    and answers a re-send with them while no realtime process is there."""
    intake = Intake()
    said = {"id": "s1", "ok": True, "item_id": "i1"}
    intake.state({"taken": ["s1"], "outcomes": {"s1": {"topic": "cmd.say", "done": said}}})
    intake.state({"taken": ["t1"], "outcomes": {"t1": {"topic": "cmd.tool.register", "done": {"id": "t1", "ok": False}},
                                                "x": {"topic": None, "done": {"id": "y"}}, "z": "junk",
                                                "w": {"topic": 7, "done": {"id": "w"}}}})   # odd entries: skipped
    assert list(intake.outcomes) == ["s1", "t1"]
    assert intake.answer("cmd.say", {"id": "s1", "text": "hi"}) == {**said, "repeated": True}
    reused = intake.answer("cmd.cancel", {"id": "s1"})
    assert reused is not None and reused["ok"] is False and reused["code"] == "id_reused" and "cmd.say" in reused["error"]
    assert intake.answer("cmd.say", {"id": "new"}) is None and intake.answer("cmd.done", {"id": "s1"}) is None
    for n in range(REMEMBERED_OUTCOMES):
        intake.state({"taken": [f"k{n}"], "outcomes": {f"k{n}": {"topic": "cmd.mic", "done": {"id": f"k{n}", "ok": True}}}})
    assert len(intake.outcomes) == REMEMBERED_OUTCOMES and "s1" not in intake.outcomes   # the oldest go first
    calls = Intake(Mode.ACK)   # engine phone: each call's core answers its own commands (ids are per call)
    calls.state({"taken": ["s1"], "outcomes": {"s1": {"topic": "cmd.say", "done": said}}})
    assert not calls.outcomes and calls.answer("cmd.say", {"id": "s1", "text": "hi"}) is None


def test_commands_without_an_id_are_held_by_publisher_and_seq_without_an_ack() -> None:
    intake = Intake()
    assert intake.command(*frames_of("cmd.tool.result", 4, call_id="c", output="x"), 0.0) is None
    assert list(intake.held) == ["client:1#4"]
    assert intake.state({"taken": ["client:1#4"]}) == 1


@pytest.mark.parametrize("topic, payload, words", [
    ("cmd.bogus", {"id": "b"}, "unknown command 'cmd.bogus'"),
    ("cmd.say", {"id": "x" * 300, "text": "t"}, "at most 200"),
])
def test_what_the_engine_cannot_take_is_refused_at_once(topic: str, payload: dict[str, Any], words: str) -> None:
    intake = Intake()
    ack = intake.command(*frames_of(topic, 1, **payload), 0.0)
    assert ack is not None and ack["ok"] is False and ack["state"] == "refused" and words in ack["error"]
    assert not intake.held and intake.refused == 1


def test_acks_and_outcomes_are_not_commands() -> None:
    intake = Intake()
    assert intake.command(*frames_of("cmd.ack", 1, id="a", ok=True), 0.0) is None
    assert intake.command(*frames_of("cmd.done", 2, id="a", ok=True), 0.0) is None
    assert not intake.held and intake.refused == 0


def test_a_full_hold_refuses_and_says_why() -> None:
    intake = Intake(max_held=2)
    for n in range(2):
        intake.command(*frames_of("cmd.say", n + 1, text="t", id=f"s{n}"), 0.0)
    ack = intake.command(*frames_of("cmd.say", 3, text="t", id="s2"), 0.0)
    assert ack is not None and ack["state"] == "refused" and "holds 2 commands" in ack["error"]
    assert MAX_HELD >= 1000


def test_what_stays_untaken_is_offered_again() -> None:
    intake = Intake()
    intake.command(*frames_of("cmd.say", 1, text="t", id="s1"), 0.0)
    assert intake.due(REOFFER_S / 2) == [] and intake.next_due() == pytest.approx(REOFFER_S)
    assert len(intake.due(REOFFER_S)) == 1
    assert intake.due(REOFFER_S + 0.1) == []   # offered again just now


def test_ack_mode_holds_nothing() -> None:
    intake = Intake(Mode.ACK)
    assert state_of(intake.command(*frames_of("cmd.say", 1, text="t", id="s1"), 0.0)) == "accepted"
    assert not intake.held


# ------------------------------------------------------------------ in the broker
@pytest.fixture
def keys() -> Any:
    return generate_keys()


@pytest.fixture
def broker(tmp_path: Path, keys: Any) -> Iterator[tuple[str, str]]:
    with thread_broker(tmp_path, signing_key=keys.signing_key, intake=Mode.HOLD) as endpoints:
        yield endpoints


def test_the_broker_acks_at_once_and_hands_over_in_order(broker: tuple[str, str], keys: Any) -> None:
    pub_ep, sub_ep = broker
    client = Publisher(pub_ep, "client", signing_key=None)
    acks = Subscriber(sub_ep, ["cmd.ack"], verify_key=None)
    assert client.join(sub_ep)
    latencies = []
    for n in range(5):
        sent = time.monotonic()
        client.publish("cmd.say", {"text": f"q{n}", "id": f"s{n}"})
        wait_topic(acks, "cmd.ack", 3, id=f"s{n}")
        latencies.append(time.monotonic() - sent)
    assert max(latencies) < 0.05, latencies
    # the realtime process comes: one signed message with what is held, in order, frames as they came
    realtime = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    handed = wait_topic(realtime, "intake.realtime", 3, restore=True)
    assert [msgpack.unpackb(f[1])["id"] for f in handed["commands"]] == [f"s{n}" for n in range(5)]
    assert all(msgpack.unpackb(f[1])["pub"] == "client" for f in handed["commands"])
    assert handed["state"] is None
    # it took the first three: published in its state, which the broker keeps for the next one
    engine = Publisher(pub_ep, "realtime:1", signing_key=keys.signing_key)
    assert engine.join(sub_ep)
    engine.publish("conversation.history", {"items": [], "taken": ["s0", "s1", "s2"], "core": "c", "state_seq": 2})
    again = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    second = wait_topic(again, "intake.realtime", 3, restore=True)
    assert [msgpack.unpackb(f[1])["id"] for f in second["commands"]] == ["s3", "s4"]
    state = second["state"]
    assert verify(keys.signing_key, state[0], state[1], state[2])
    assert msgpack.unpackb(state[1])["taken"] == ["s0", "s1", "s2"]
    # what stays untaken is offered again, to whoever subscribes
    offered = wait_topic(again, "intake.realtime", REOFFER_S * 3, restore=False)
    assert [msgpack.unpackb(f[1])["id"] for f in offered["commands"]] == ["s3", "s4"]
    # a command that changed nothing in the state is let go on intake.taken, signed; a forged one lets nothing go
    forger = Publisher(pub_ep, "realtime:1", signing_key=None)
    assert forger.join(sub_ep)
    forger.publish("intake.taken", {"taken": ["s4"], "outcomes": {"s1": {"topic": "cmd.say", "done": {"id": "s1", "ok": False}}}})
    s3 = {"topic": "cmd.say", "done": {"id": "s3", "ok": True, "item_id": "i3"}}
    engine.publish("intake.taken", {"taken": ["s3"], "outcomes": {"s3": s3}})
    third = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    last = wait_topic(third, "intake.realtime", 3, restore=True)
    assert [msgpack.unpackb(f[1])["id"] for f in last["commands"]] == ["s4"]
    # the outcomes it published come in the hand-over too (a forger's are not kept)
    assert last["outcomes"] == {"s3": s3}
    for s in (client, acks, realtime, engine, again, forger, third):
        s.close()


def test_the_broker_answers_a_re_send_only_while_no_realtime_process_is_there(broker: tuple[str, str],
                                                                              keys: Any) -> None:
    """A re-send while the realtime process restarted was acked taken and answered by nobody."""
    pub_ep, sub_ep = broker
    engine = Publisher(pub_ep, "realtime:1", signing_key=keys.signing_key)
    client = Publisher(pub_ep, "client", signing_key=None)
    dones = Subscriber(sub_ep, ["cmd.done", "_join."], verify_key=None)
    assert engine.join(sub_ep) and client.join(sub_ep)
    said = {"id": "s1", "ok": True, "item_id": "i1"}
    engine.publish("intake.taken", {"taken": ["s1"], "outcomes": {"s1": {"topic": "cmd.say", "done": said}}})
    assert engine.join(sub_ep)
    client.publish("cmd.say", {"text": "hi", "id": "s1"})            # no realtime process: the broker answers
    done = wait_topic(dones, "cmd.done", 3, id="s1")
    assert done["repeated"] is True and done["item_id"] == "i1" and done["pub"].startswith("broker:")
    realtime = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    wait_topic(realtime, "intake.realtime", 3, restore=True)         # it is there: it answers, not the broker
    client.publish("cmd.say", {"text": "hi", "id": "s1"})
    assert client.join(sub_ep)                                        # the probe came back after the re-send
    seen = []
    while (msg := dones.recv(timeout_ms=100)) is not None:
        seen.append(msg[0])
    assert "cmd.done" not in seen
    for s in (engine, client, dones, realtime):
        s.close()


def test_an_unsigned_state_is_not_kept(broker: tuple[str, str], keys: Any) -> None:
    """Any client could replace the conversation a restarted realtime process starts from."""
    pub_ep, sub_ep = broker
    engine = Publisher(pub_ep, "realtime:1", signing_key=keys.signing_key)
    forger = Publisher(pub_ep, "forger", signing_key=None)
    assert engine.join(sub_ep) and forger.join(sub_ep)
    engine.publish("conversation.history", {"items": [{"type": "message"}], "taken": [], "core": "c", "state_seq": 5})
    forger.publish("conversation.history", {"items": [], "taken": []})
    forged = encode("conversation.history", {"items": [], "taken": []}, "realtime:1", 99)
    forger.send_raw(forged + [sign(b"not the key", *forged)])
    engine.publish("conversation.history", {"items": [], "taken": [], "core": "c", "state_seq": 4})   # older
    # each one's probe comes back after all it sent: the keeper's queue holds them before the late subscription
    assert engine.join(sub_ep) and forger.join(sub_ep)
    late = Subscriber(sub_ep, ["conversation.history"], verify_key=keys.signing_key)
    body = wait_topic(late, "conversation.history", 3)
    assert body["items"] == [{"type": "message"}] and body["state_seq"] == 5
    for s in (engine, forger, late):
        s.close()


# ------------------------------------------------------------------ the one call
def test_call_sends_once_when_acked_and_returns_the_outcome(broker: tuple[str, str], keys: Any) -> None:
    import asyncio
    from bus import Endpoints
    from bus.aio import BusClient
    endpoints = Endpoints(*broker)
    copies: list[dict[str, Any]] = []

    async def main() -> dict[str, Any]:
        engine = await BusClient.connect(endpoints, "stand-in", ["cmd.say"])   # carries commands out

        def carry_out(topic: str, body: dict[str, Any]) -> None:
            if topic == "cmd.say":
                copies.append(body)
                engine.publish("cmd.done", {"id": body["id"], "ok": True, "item_id": "item_1"})
        engine.listen(carry_out)
        client = await BusClient.connect(endpoints, "caller")
        try:
            ack = await client.call("cmd.mic", {"open": True})
            assert ack["ok"] and ack["state"] == "queued"
            return await client.call("cmd.say", {"text": "hi"}, outcome=True, outcome_timeout_s=5)
        finally:
            await client.close()
            await engine.close()
    done = asyncio.run(main())
    assert done["item_id"] == "item_1" and len(copies) == 1


def test_call_without_an_intake_says_nothing_acked_it(tmp_path: Path) -> None:
    import asyncio
    from bus import Endpoints
    from bus.aio import RESEND_S, BusClient, NoAck
    with thread_broker(tmp_path) as endpoints:   # no intake: nothing acks
        sent: list[dict[str, Any]] = []

        async def main() -> None:
            watcher = await BusClient.connect(Endpoints(*endpoints), "watcher", ["cmd.say"])
            watcher.listen(lambda t, b: sent.append(b) if t == "cmd.say" else None)
            client = await BusClient.connect(Endpoints(*endpoints), "caller")
            try:
                with pytest.raises(NoAck, match="no cmd.ack for cmd.say"):
                    await client.call("cmd.say", {"text": "hi"}, ack_timeout_s=RESEND_S * 2.5)
                last = watcher.expect(lambda t, b: t == "cmd.say.last")
                client.publish("cmd.say.last", {})   # comes after every copy: one publisher's messages keep their order
                await asyncio.wait_for(last, 5)
            finally:
                await client.close()
                await watcher.close()
        asyncio.run(main())
    # sent again (every RESEND_S) while no ack came, always the same command; once acked, once (the test above)
    assert len(sent) >= 2 and len({b["id"] for b in sent}) == 1


def test_a_tool_owner_that_left_while_no_realtime_process_was_there_is_named_in_the_hand_over(
        broker: tuple[str, str], keys: Any) -> None:
    """``engine.presence.gone`` went out once: an owner that left while the realtime process was
    restarting kept its tools in the successor, which offered the model a tool nobody served."""
    pub_ep, sub_ep = broker
    gone = Subscriber(sub_ep, ["engine.presence.gone"], verify_key=keys.signing_key)
    owner = Subscriber(sub_ep, ["_presence.tools:1"])
    stays = Subscriber(sub_ep, ["_presence.tools:2"])
    probe = Publisher(pub_ep, "probe", signing_key=None)
    assert probe.join(sub_ep)
    owner.close()                                       # its process exits while no realtime process runs
    wait_topic(gone, "engine.presence.gone", 3, owner="tools:1")
    realtime = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    handed = wait_topic(realtime, "intake.realtime", 3, restore=True)
    assert handed["gone_owners"] == ["tools:1"]
    again = Subscriber(sub_ep, ["_presence.tools:1"])   # it came back: no longer gone
    realtime2 = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    deadline = time.monotonic() + 3
    while wait_topic(realtime2, "intake.realtime", 3, restore=True)["gone_owners"] and time.monotonic() < deadline:
        realtime2.close()
        realtime2 = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    assert time.monotonic() < deadline
    for s in (gone, stays, probe, realtime, again, realtime2):
        s.close()


def test_a_lost_outcome_is_asked_for_again(broker: tuple[str, str], keys: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A cmd.done lost with a broker that crashed never came again: the client waited out its
    timeout on a command the engine had carried out (the review). While it waits for the outcome it
    now sends the command again now and then; the engine answers a copy with the outcome, repeated."""
    import asyncio
    from bus import Endpoints
    from bus import aio
    monkeypatch.setattr(aio, "OUTCOME_RESEND_S", 0.3)
    endpoints = Endpoints(*broker)
    copies: list[dict[str, Any]] = []

    async def main() -> dict[str, Any]:
        engine = await aio.BusClient.connect(endpoints, "stand-in", ["cmd.say"])

        def carry_out(topic: str, body: dict[str, Any]) -> None:
            if topic == "cmd.say":
                copies.append(body)
                if len(copies) > 1:                    # the first outcome was lost on its way
                    engine.publish("cmd.done", {"id": body["id"], "ok": True, "item_id": "i1", "repeated": True})
        engine.listen(carry_out)
        client = await aio.BusClient.connect(endpoints, "caller")
        try:
            return await client.call("cmd.say", {"text": "hi"}, outcome=True, outcome_timeout_s=5)
        finally:
            await client.close()
            await engine.close()
    done = asyncio.run(main())
    assert done["item_id"] == "i1" and done["repeated"] and len(copies) >= 2


def test_a_gone_owners_held_tool_registration_is_dropped() -> None:
    """A tool registered while the realtime process was down, by an owner that then left, was
    carried out by the successor after it had dropped that owner's tools (the review)."""
    intake = Intake()
    intake.command(*frames_of("cmd.tool.register", 1, name="lookup", owner="tools:1", id="r1"), 0.0)
    intake.command(*frames_of("cmd.say", 2, text="hi", id="s1"), 0.0)
    assert intake.drop_owner("tools:1") == ["r1"]
    assert [decode(f)[1]["id"] for f in intake.handover(0.0)] == ["s1"]


def test_a_register_that_comes_after_its_owner_left_is_not_handed_over(broker: tuple[str, str], keys: Any) -> None:
    """A register that reached the broker after its owner's presence ended (it travels on another
    socket) was held and carried out by the successor, after it had dropped the owner's tools."""
    pub_ep, sub_ep = broker
    gone = Subscriber(sub_ep, ["engine.presence.gone"], verify_key=keys.signing_key)
    owner = Subscriber(sub_ep, ["_presence.tools:1"])
    client = Publisher(pub_ep, "tools:1", signing_key=None)
    acks = Subscriber(sub_ep, ["cmd.ack"], verify_key=None)
    assert client.join(sub_ep)
    owner.close()
    wait_topic(gone, "engine.presence.gone", 3, owner="tools:1")
    client.publish("cmd.tool.register", {"name": "lookup", "owner": "tools:1", "id": "late"})
    wait_topic(acks, "cmd.ack", 3, id="late")
    realtime = Subscriber(sub_ep, ["intake.realtime"], verify_key=keys.signing_key)
    handed = wait_topic(realtime, "intake.realtime", 3, restore=True)
    assert [msgpack.unpackb(f[1]).get("id") for f in handed["commands"]] == []
    for s in (gone, client, acks, realtime):
        s.close()
