"""Past one machine (issue 13 point 6), on one machine: two `engine phone` workers behind haproxy
(Debian's; tools/setup-system.sh installs it), fake Twilio calls dialed through haproxy, and one
outside party that reaches both workers' buses over ZeroMQ TCP with CURVE (keys from each
worker's connection file, mode 0600, named by `engine status --json`) and serves every call."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from bus import Publisher, Subscriber
from bus.client import load_endpoints
from engine.errors import ConfigError
from engine.phone.haproxy import haproxy_config, parse_address
from engine.phone.simulator import FakePhone
from engine.supervisor.rundir import free_port
from tests.helpers import RunningEngine, engine_workers, set_twilio_token, wait_listening

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


@pytest.fixture(autouse=True)
def _twilio_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """`engine phone` checks Twilio's signature (phone.auth twilio): a token for the engines and phones here."""
    return set_twilio_token(monkeypatch)


@pytest.mark.timeout(5)
def test_haproxy_config_routes_the_media_stream_path_to_every_worker() -> None:
    text = haproxy_config(("0.0.0.0", 8080), [("10.0.0.5", 8766), ("10.0.0.6", 8766)], "twilio")
    assert "bind 0.0.0.0:8080" in text and "acl media_stream path /twilio" in text
    assert "server w1 10.0.0.5:8766 check" in text and "server w2 10.0.0.6:8766 check" in text
    assert "balance leastconn" in text and "timeout tunnel 3600s" in text
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_address("8766")
    with pytest.raises(ConfigError, match="at least one worker"):
        haproxy_config(("127.0.0.1", 1), [])


class Worker(RunningEngine):
    """One `engine phone` worker with its own runtime directory (its own connection file)."""

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "REALTALK_RUNTIME_DIR": str(self.runtime), "XDG_DATA_HOME": str(self.sessions)}

    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "engine.api.cli", "status", "--json"], capture_output=True,
                             text=True, timeout=30, env=self.env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Worker]]:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("REALTALK_BUS_KEYS", raising=False)
    cfg = tmp_path / "worker.yaml"
    cfg.write_text("bus:\n  transport: tcp\n  tcp_host: 127.0.0.1\n")
    with engine_workers(tmp_path, Worker, ["phone", "--backend", "local", "--port", "0", "--speed", "4",
                                           "--config", str(cfg)]) as started:
        yield started


class Office:
    """The outside party: one subscriber and one publisher per worker's bus (tcp + CURVE), on a thread.
    Every call that starts on a worker gets a cmd.say on that worker's bus; replies' text is kept."""

    def __init__(self, connection_files: list[str]) -> None:
        self.files = connection_files
        self.started: dict[str, int] = {}          # phone_call_id -> worker index
        self.replies: dict[str, str] = {}          # phone_call_id -> the reply's text
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            ends = [load_endpoints(f) for f in self.files]
            assert all(e.curve is not None and e.signing_key is None for e in ends)
            subs = [Subscriber(e, ["engine.status", "phone.call.started", "response.done"]) for e in ends]
            pubs = [Publisher(e, "office") for e in ends]
            seen_status = [False] * len(subs)
            for p in pubs:
                assert p.join(timeout_s=10), "the office's publisher never reached a worker's broker"
            while not self.stop.is_set():
                for i, sub in enumerate(subs):
                    msg = sub.recv(timeout_ms=10)
                    if msg is None:
                        continue
                    topic, body = msg
                    if topic == "engine.status":
                        seen_status[i] = True      # the broker's last value: CURVE let us in
                        if all(seen_status):
                            self.connected.set()
                    elif topic == "phone.call.started":
                        cid = body["phone_call_id"]
                        self.started[cid] = i
                        pubs[i].publish("cmd.say", {"text": f"Hello caller {len(self.started)}",
                                                    "phone_call_id": cid, "id": "hello-" + cid})
                    elif topic == "response.done" and body.get("text") and body.get("phone_call_id"):
                        self.replies[body["phone_call_id"]] = body["text"]
            for s in subs:
                s.close()
            for p in pubs:
                p.close()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc
            self.connected.set()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (tools/setup-system.sh installs it)")
def test_two_workers_behind_haproxy_serve_calls_and_one_office_reaches_both_buses(
        workers: list[Worker], tmp_path: Path) -> None:
    assert HAPROXY is not None
    statuses = [w.status() for w in workers]
    files = []
    for st in statuses:
        assert st["publish"].startswith("tcp://127.0.0.1:") and st["subscribe"].startswith("tcp://127.0.0.1:")
        mode = stat.S_IMODE(os.stat(st["connection_file"]).st_mode)
        assert mode == 0o600, oct(mode)        # the CURVE client keys live in a file only the user reads
        assert "curve_secret_key" not in st     # and not in what status prints
        files.append(st["connection_file"])
    worker_ports = [parse_address(st["phone"]["url"].removeprefix("ws://").split("/")[0]) for st in statuses]

    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(("127.0.0.1", port), worker_ports, "/twilio"))
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stdout + check.stderr
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    office = Office(files)
    try:
        wait_listening(port, haproxy)
        assert office.connected.wait(15) and office.error is None, office.error
        plain = Subscriber(statuses[0]["subscribe"], ["engine.status"], curve=None, verify_key=None)
        try:      # without the CURVE keys the same endpoint gives nothing (the keyed office got its status)
            assert plain.recv(timeout_ms=500) is None
        finally:
            plain.close()

        async def main() -> None:
            url = f"ws://127.0.0.1:{port}/twilio"
            phones: list[FakePhone] = []
            for _ in range(4):                   # one after the other: leastconn alternates the workers
                phone = await FakePhone(url).dial()
                phones.append(phone)
                deadline = time.monotonic() + 15
                while phone.call_sid not in office.started and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)   # the office's thread fills a dict: polled
                assert phone.call_sid in office.started, "a call through haproxy never started on a worker"
            await asyncio.gather(*(asyncio.wait_for(p.got_audio.wait(), 20) for p in phones))
            deadline = time.monotonic() + 20
            while len(office.replies) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)   # (the same)
            await asyncio.gather(*(p.hang_up() for p in phones))
            assert set(office.replies) == {p.call_sid for p in phones}, office.replies
            assert sorted(office.started.values()) == [0, 0, 1, 1], office.started   # calls landed on both
            assert all(p.played_frames > 0 for p in phones)
        asyncio.run(main())
        assert office.error is None, office.error
    finally:
        office.close()
        haproxy.terminate()
        haproxy.wait(10)
