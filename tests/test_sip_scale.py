"""Two `engine sip` workers behind haproxy (engine/sip/haproxy.py): each call's two webhooks reach
one worker (hashed on the INVITE's Call-ID), so each call is accepted once. The workers talk to
the local server's stand-in as to OpenAI (provider openai, $OPENAI_BASE_URL)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from engine.errors import ConfigError
from engine.phone.haproxy import parse_address
from engine.sip.haproxy import haproxy_config
from engine.supervisor.rundir import free_port
from tests.helpers import RunningEngine, call_report, engine_workers, place_call, wait_listening

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
SECRET = "whsec_" + base64.b64encode(b"two workers share this secret!!!").decode()


def test_haproxy_config_hashes_each_call_on_its_call_id() -> None:
    text = haproxy_config(("0.0.0.0", 8080), [("10.0.0.5", 8767), ("10.0.0.6", 8767)], "openai/webhook")
    assert "acl webhook path /openai/webhook" in text and "option http-buffer-request" in text
    assert "balance hash var(txn.call_id)" in text and "hash-type consistent" in text
    assert "server w1 10.0.0.5:8767 check" in text and "server w2 10.0.0.6:8767 check" in text
    with pytest.raises(ConfigError, match="at least one worker"):
        haproxy_config(("127.0.0.1", 1), [])


class Worker(RunningEngine):
    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "engine.api.cli", "status", "--json"], capture_output=True,
                             text=True, timeout=30, env={**os.environ, "REALTALK_RUNTIME_DIR": str(self.runtime)})
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))


@pytest.fixture
def stand_in(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", SECRET)
    return make_server(speed=8.0)


@pytest.fixture
def workers(tmp_path: Path, stand_in: Any) -> Iterator[list[Worker]]:
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": f"http://127.0.0.1:{stand_in.port}/v1",
           "OPENAI_WEBHOOK_SECRET": SECRET}
    with engine_workers(tmp_path, Worker, ["sip", "--backend", "openai", "--port", "0"], env=env) as started:
        yield started


@pytest.mark.e2e
@pytest.mark.timeout(90)
@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (tools/setup-system.sh installs it)")
def test_two_workers_behind_haproxy_accept_each_call_once(workers: list[Worker], stand_in: Any,
                                                          tmp_path: Path) -> None:
    assert HAPROXY is not None
    statuses = [w.status() for w in workers]
    ports = [parse_address(st["sip"]["url"].removeprefix("http://").split("/")[0]) for st in statuses]
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(("127.0.0.1", port), ports))
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, haproxy)
        base = f"http://127.0.0.1:{stand_in.port}/v1"

        async def main() -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{port}/openai/webhook"
            ids = await asyncio.gather(*[place_call(base, webhook_url=url, script=[{"pause_ms": 60000}])
                                         for _ in range(16)])
            reports = []
            for i in ids:
                deadline = time.monotonic() + 20
                rep = await call_report(base, i["call_id"])
                while rep["phase"] == "ringing" and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    rep = await call_report(base, i["call_id"])
                reports.append(rep)
            return reports
        reports = asyncio.run(main())
        assert [r["phase"] for r in reports] == ["answered"] * 16
        assert all({d["status"] for d in r["webhooks"]} == {200} for r in reports)
        deadline = time.monotonic() + 10
        while True:
            sips = [w.status()["sip"] for w in workers]
            if sum(s["accepted"] for s in sips) == 16 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [s["accepted"] for s in sips] != [16, 0] and [s["accepted"] for s in sips] != [0, 16]
        assert sum(s["accepted"] for s in sips) == 16
        # each call's other webhook reached the same worker and was ignored there
        assert [s["ignored"] for s in sips] == [s["accepted"] for s in sips]
        assert sum(s["accept_failed"] for s in sips) == 0
    finally:
        haproxy.terminate()
        haproxy.wait(10)
