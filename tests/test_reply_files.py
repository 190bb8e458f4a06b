"""A reply's saved audio (config ``reply_audio``) stays in the session's replies folder whatever
the server names the response."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def _host(replies: Path) -> Any:
    """The realtime process's host, without its start (only what saving a reply uses)."""
    from engine.realtime.process import RealtimeProcess
    host = object.__new__(RealtimeProcess)
    host.replies_dir = replies
    host.reply_pcm = {}
    host.replies_saved = 0
    return host


@pytest.mark.parametrize("response_id", ["../../outside", "/tmp/abs", "a/b", "..", "", "x" * 300, "resp\x00nul"])
def test_a_servers_response_id_never_names_a_file_outside_the_replies_folder(tmp_path: Path, response_id: str) -> None:
    """A "Realtime-compatible" server behind OPENAI_BASE_URL named response ``../../x``: the reply's
    audio was written to any ``*.wav`` the user could write (the trust review)."""
    replies = tmp_path / "session" / "replies"
    host = _host(replies)
    host.reply_pcm[response_id] = [b"\x01\x00" * 240]
    done = {"response_id": response_id, "status": "completed"}
    host._save_reply(done)
    saved = Path(done["audio_path"])
    assert saved.parent == replies and saved.suffix == ".wav" and saved.is_file()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [saved]


def test_a_plain_response_id_names_its_file() -> None:
    from engine.realtime.process import reply_wav_name
    assert reply_wav_name("resp_ABC-12_x", 3) == "resp_ABC-12_x.wav"
    assert reply_wav_name("../x", 3) == "reply-3.wav"


def test_a_restarted_process_never_overwrites_a_reply_its_predecessor_saved(tmp_path: Path) -> None:
    replies = tmp_path / "replies"
    names = []
    for _ in range(2):                                        # two processes, one after the other
        host = _host(replies)
        host.reply_pcm["../x"] = [b"\x01\x00" * 240]
        done = {"response_id": "../x", "status": "completed"}
        host._save_reply(done)
        names.append(Path(done["audio_path"]).name)
    assert names == ["reply-1.wav", "reply-2.wav"]
