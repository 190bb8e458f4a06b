"""The phone bench's openai-SDK baseline (bench/phone.py): its own process bridges a fake phone to
the local server and reports the figures the engine's bridge reports, counted the same way."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.phone import CALL_FIGURES, SAY, SdkBaseline, b64_bytes, first_delta_figures, on_time, wait_until
from engine.phone.simulator import FRAME_BYTES, FakePhone

pytestmark = pytest.mark.timeout(60)


def test_b64_bytes_counts_what_a_base64_string_decodes_to() -> None:
    import base64
    for n in (0, 1, 2, 3, 159, 160, 800):
        assert b64_bytes(base64.b64encode(b"\xff" * n).decode()) == n


def test_calls_on_time_need_no_late_frame_no_underrun_every_reply_whole_and_every_smaller_level_too() -> None:
    ok = {"calls": 5, "calls_ended": 5, "reply_frames_played_min": 190, "reply_frames_played_max": 190,
          "media_in_late_frames": 0, "media_out_late_frames": 0, "phone_underruns": 0, "phone_stalls_over_500ms": 0}
    one = {**ok, "calls": 1, "calls_ended": 1}
    assert on_time([one, ok]) == 5
    for bad in ({"phone_underruns": 1}, {"phone_stalls_over_500ms": 1}, {"media_out_late_frames": 1}, {"calls_ended": 4},
                {"reply_frames_played_min": 150}):
        assert on_time([one, {**ok, **bad}]) == 1
        # a larger level on time after a smaller one that is not does not count
        assert on_time([one, {**ok, **bad}, {**ok, "calls": 10, "calls_ended": 10}]) == 1


def test_a_replys_first_delta_is_timed_to_the_phones_next_media_and_to_the_tick_that_began_playing_it() -> None:
    phone = FakePhone("ws://127.0.0.1:9/twilio")
    phone.media_in_s = [0.5, 10.012, 10.2, 20.030, 20.2]   # the warm-up's, then the replies' first and later media
    phone.audio_began_s = [0.51, 10.020, 20.045]
    turns = [{"arrival_s": 10.0, "start_delay_ms": 12.0}, {"arrival_s": 20.0, "start_delay_ms": 25.0}]
    got = first_delta_figures(turns, phone)
    assert got["replies"] == 2
    assert (got["first_delta_to_phone_ms_p50"], got["first_delta_to_phone_ms_max"]) == (30.0, 30.0)   # nearest rank
    assert got["first_delta_to_phone_ms_p99"] == 30.0 and got["first_delta_to_playout_ms_p99"] == 45.0
    assert got["start_delay_ms_max"] == 25.0
    # nothing reached the phone after the first delta: not counted, not zero
    none = first_delta_figures([{"arrival_s": 30.0, "start_delay_ms": 12.0}], phone)
    assert none["first_delta_to_phone_ms_p99"] is None and none["first_delta_to_playout_ms_p99"] is None


@pytest.mark.e2e
def test_a_call_through_the_sdk_baseline_plays_the_whole_reply_and_reports_the_engines_figures(
        make_server: Any) -> None:
    server = make_server(speed=4.0)
    sdk = SdkBaseline(server.base, "gpt-realtime")

    async def call() -> tuple[FakePhone, dict[str, Any]]:
        phone = await FakePhone(sdk.url).dial()
        assert await wait_until(lambda: phone.call_sid in sdk.up(), 20)
        sdk.say(phone.call_sid, SAY)
        await asyncio.wait_for(phone.got_audio.wait(), 20)
        # the reply came 4x faster than real time: all of it is at the phone before it has played
        assert await wait_until(lambda: phone.played_frames > 0 and phone.buffer == bytearray()
                                and phone.played_frames == phone.received_frames, 20)
        await phone.hang_up()
        assert await wait_until(lambda: bool(sdk.ended({phone.call_sid})), 10)
        return phone, sdk.ended({phone.call_sid})[0]
    try:
        phone, ended = asyncio.run(call())
    finally:
        sdk.close()
    assert set(CALL_FIGURES) <= set(ended)
    assert ended["media_out_frames"] == phone.received_frames // FRAME_BYTES > 100
    assert ended["media_in_frames"] > 0 and ended["clear_latency_p99_ms"] is None   # no barge-in
    # each figure has its value, counted as the engine's bridge counts it (bench/README.md, "phone"):
    # the late frames are some of the frames, and none is late only if the p99 is within the 20 ms
    for way in ("in", "out"):
        frames, late, p99 = ended[f"media_{way}_frames"], ended[f"media_{way}_late_frames"], ended[f"{way}_latency_p99_ms"]
        assert type(frames) is int and type(late) is int and 0 <= late <= frames, (way, ended)
        assert isinstance(p99, float) and p99 >= 0 and (late > 0 or p99 <= 20.0), (way, ended)
    assert phone.underruns == 0
