"""`engine say --call ID` and `engine tail --call ID` reach one phone call of `engine phone`."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bus import Publisher, Subscriber
from engine.phone.simulator import FakePhone
from tests.conftest import RunningEngine
from tests.helpers import set_twilio_token

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.api.cli", *args], capture_output=True, text=True,
                          timeout=30, env=os.environ.copy())


def test_say_and_tail_name_one_call(runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23 point 7: a say to a phone engine was refused for naming no call, and the CLI had no
    way to name one."""
    set_twilio_token(monkeypatch)   # the fake phones sign their upgrade with it
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "phone", "--backend", "local", "--port", "0",
                             "--speed", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy(), cwd=str(tmp_path))
    eng = RunningEngine(proc, runtime_dir, tmp_path / "data")
    msgs: list[tuple[str, dict[str, Any]]] = []
    stop = threading.Event()
    try:
        assert eng.ready.wait(30), "".join(eng.lines)
        m = re.search(r"phone calls at (ws://\S+)", "".join(eng.lines))
        assert m is not None
        conn = eng.conn
        sub = Subscriber(conn["subscribe"], [""])
        pub = Publisher(conn["publish"], "test")
        assert pub.join(conn["subscribe"])

        def read() -> None:
            while not stop.is_set():
                got = sub.recv(timeout_ms=100)
                if got is not None:
                    msgs.append(got)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        async def wait(topic: str, timeout_s: float = 20, **match: Any) -> dict[str, Any]:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for t, b in list(msgs):
                    if t == topic and all(b.get(k) == v for k, v in match.items()):
                        return b
                await asyncio.sleep(0.02)
            raise AssertionError(f"no {topic} {match}; saw {[t for t, _ in msgs][-30:]}")

        async def main() -> None:
            a = await FakePhone(m.group(1)).dial()
            b = await FakePhone(m.group(1)).dial()
            for phone in (a, b):
                await wait("phone.call.status", state="connected", phone_call_id=phone.call_sid)
            tail = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.api.cli", "tail", "--call", a.call_sid, "--seconds", "6",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            await asyncio.sleep(1.0)   # the tail's subscriber is connected
            said = await asyncio.to_thread(_cli, "say", "--call", a.call_sid, "Good morning to you")
            assert said.returncode == 0, said.stderr
            assert "added as item_" in said.stdout
            done = await wait("response.done", phone_call_id=a.call_sid)
            assert done["status"] == "completed"
            pub.publish("cmd.say", {"text": "Hello there caller b", "phone_call_id": b.call_sid, "id": "b1"})
            await wait("response.done", request_id="b1")
            # without --call: refused at once, naming the option and the calls
            refused = await asyncio.to_thread(_cli, "say", "Hello whoever")
            assert refused.returncode != 0
            assert "--call" in refused.stderr and a.call_sid in refused.stderr and b.call_sid in refused.stderr
            out, err = await asyncio.wait_for(tail.communicate(), 20)
            text = out.decode()
            assert "Good morning to you" in text, (text, err.decode())
            assert "caller b" not in text, text
            for phone in (a, b):
                await phone.hang_up()
        try:
            asyncio.run(main())
        finally:
            stop.set()
            reader.join(2)
            sub.close()
            pub.close()
    finally:
        assert eng.stop() == 0, "".join(eng.lines)
