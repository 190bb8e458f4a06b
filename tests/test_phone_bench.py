"""The phone bench's openai-SDK baseline (bench/phone.py): its own process bridges a fake phone to
the local server and reports the figures the engine's bridge reports, counted the same way."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.phone import CALL_FIGURES, SAY, SdkBaseline, b64_bytes, on_time, wait_until
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
