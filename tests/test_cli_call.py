"""`engine say --call ID` and `engine tail --call ID` reach one phone call of `engine phone`."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.phone.simulator import FakePhone
from tests.helpers import BusRecorder, RunningEngine, set_twilio_token

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
    try:
        assert eng.ready.wait(30), "".join(eng.lines)
        m = re.search(r"phone calls at (ws://\S+)", "".join(eng.lines))
        assert m is not None
        bus = BusRecorder(eng.conn)
        wait, pub = bus.wait, bus.pub

        async def main() -> None:
            a = await FakePhone(m.group(1)).dial()
            b = await FakePhone(m.group(1)).dial()
            for phone in (a, b):
                await wait("phone.call.status", state="connected", phone_call_id=phone.call_sid)
            tail = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.api.cli", "tail", "--call", a.call_sid, "--seconds", "60",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            assert tail.stdout is not None
            shown: list[bytes] = []

            async def tail_prints(mark: str) -> None:
                """Say ``mark`` on call a until the tail prints it: it has read all that came before."""
                assert tail.stdout is not None
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    pub.publish("system.text", {"text": mark, "phone_call_id": a.call_sid})
                    with contextlib.suppress(asyncio.TimeoutError):
                        while True:
                            shown.append(await asyncio.wait_for(tail.stdout.readline(), 0.1))
                            if mark.encode() in shown[-1]:
                                return
                raise AssertionError(f"`engine tail --call` did not print {mark!r}; it printed {b''.join(shown)!r}")
            await tail_prints("tail probe")   # it is subscribed
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
            # b's reply reached the tail before our mark did (the broker forwards each message to every
            # subscriber at once): then it can stop, without waiting out a time (SIGTERM: a shell's
            # background job ignores SIGINT, and so would the tail)
            await tail_prints("tail end")
            tail.terminate()
            out, err = await asyncio.wait_for(tail.communicate(), 20)
            text = b"".join(shown).decode() + out.decode()
            assert "Good morning to you" in text, (text, err.decode())
            assert "caller b" not in text, text
            for phone in (a, b):
                await phone.hang_up()
        try:
            asyncio.run(main())
        finally:
            bus.close()
    finally:
        assert eng.stop() == 0, "".join(eng.lines)
