"""The supervisor-child contract (engine/specs.py): each spec survives its one JSON line, a spec
that does not fit is refused naming the field, and the docs' table of rings is RINGS."""
from __future__ import annotations

import json
import re
from typing import Any

import pytest

from engine.config import load_config, session_payload
from engine.specs import (RINGS, ApiAccess, BusSpec, CaptureSpec, ConsoleSpec, PhoneSpec, PlaybackSpec, RealtimeSpec,
                          SipSpec, SpecError, encode, parse, ring_kinds)
from tests.helpers import REPO

CFG = load_config(None, {})
BUS = BusSpec(publish="ipc:///tmp/p.sock", subscribe="ipc:///tmp/s.sock", signing_key="ab" * 32)
API = ApiAccess(headers=("Authorization: Bearer sk-x",), provider="azure", deployment="d", key_env="AZURE_KEY")

SPECS: list[Any] = [
    RealtimeSpec(config=CFG, bus=BUS, url="ws://x/v1/realtime?model=m", api=API, session=session_payload(CFG),
                 speaker_ring="realtalk-1", mic_ring="realtalk-2", mic_fd=7, replies_dir=None),
    CaptureSpec(config=CFG, bus=BUS, mic_ring="realtalk-2", mic_fd=7, mic_source=3, speaker_ring="realtalk-1",
                ref_ring="realtalk-3", speaker_is_device=True, browser_ring="realtalk-4", record_path="/tmp/c.wav"),
    PlaybackSpec(config=CFG, bus=BUS, speaker_ring="realtalk-1", speaker_target="null", listen_ring="realtalk-5"),
    PhoneSpec(config=CFG, bus=BUS, url="ws://x", api=API, session={}, phone=CFG["phone"], solo=True),
    SipSpec(config=CFG, bus=BUS, api=API, rest_base="http://x/v1", ws_base="ws://x/v1", sip=CFG["sip"]),
    ConsoleSpec(config=CFG, bus=BusSpec(publish="a", subscribe="b"), port=8080, allowed_hosts=("h.example",),
                rings={"listen": "realtalk-5"}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_a_spec_survives_its_json_line(spec: Any) -> None:
    line = encode(spec)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse(type(spec), json.loads(line)) == spec


def _playback(**change: Any) -> dict[str, Any]:
    data = json.loads(encode(SPECS[2]))
    data.update(change)
    return {k: v for k, v in data.items() if v is not ...}


@pytest.mark.parametrize(("data", "named"), [
    (_playback(speaker_ring=...), "missing field speaker_ring"),
    (_playback(speaker_rign="x"), "unknown field speaker_rign"),
    (_playback(speaker_ring=5), "PlaybackSpec.speaker_ring: 5 is not str"),
    (_playback(speaker_target=True), "PlaybackSpec.speaker_target: True is not str or int"),
    (_playback(bus={"publish": "a"}), "PlaybackSpec.bus: missing field subscribe"),
    (_playback(config=[]), "PlaybackSpec.config: expected a map"),
    ([], "PlaybackSpec: expected a map"),
])
def test_a_spec_that_does_not_fit_is_refused_naming_the_field(data: Any, named: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(PlaybackSpec, data)
    assert named in str(err.value)


def test_the_console_gets_no_signing_key_and_keys_lists_only_what_is_set() -> None:
    assert BusSpec(publish="a", subscribe="b").keys() == {"publish": "a", "subscribe": "b"}
    assert BUS.keys()["signing_key"] == "ab" * 32


def test_a_hand_written_spec_takes_its_key_from_the_environment() -> None:
    api = ApiAccess(headers=("X-Other: 1",), api_key_env="MY_KEY")
    assert api.header_map({"MY_KEY": "sk-env"}) == {"X-Other": "1", "Authorization": "Bearer sk-env"}
    assert api.header_map({}) == {"X-Other": "1"}
    assert api.key_name() == "MY_KEY" and API.key_name() == "AZURE_KEY" and ApiAccess().key_name("K") == "K"


def test_the_rings_made_follow_the_processes_that_run() -> None:
    assert ring_kinds(["realtime", "playback", "console"]) == ["speaker", "listen"]
    assert ring_kinds(["capture", "realtime", "playback", "console"]) == ["mic", "speaker", "ref", "listen", "browser"]
    assert all(r.frames & (r.frames - 1) == 0 for r in RINGS.values()), "a ring's capacity is a power of two"


def test_the_docs_table_of_rings_is_the_ring_table() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \(([\d.]+) s(, eventfd)?\) \| (\w+) → (\w+) \|", text, re.M)
    documented = {kind: (secs, bool(efd), prod, cons) for kind, secs, efd, prod, cons in rows}
    actual = {kind: (f"{r.seconds:.2g}", r.eventfd, r.producer, r.consumer) for kind, r in RINGS.items()}
    assert documented == actual


@pytest.mark.e2e
def test_a_child_refuses_a_spec_that_does_not_fit_before_it_starts(tmp_path: Any) -> None:
    import subprocess
    import sys
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_playback(speaker_rign="x")))
    done = subprocess.run([sys.executable, "-m", "engine.playback.process", str(path)], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert done.returncode == 3, done.stderr
    assert "bad spec: PlaybackSpec: unknown field speaker_rign" in done.stderr
