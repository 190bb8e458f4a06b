"""Shared fixtures: virtual audio devices, an in-process local server, a running
engine, and validation of every server event against the official openai types."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import REPO, TRACES, VAUDIO, LocalServer, PhoneEngine, RunningEngine


# ---------------------------------------------------------------- the quick loop
#: one-shot tools a quick test may run (the local server synthesizes speech with them, like a library call)
QUICK_PROGRAMS = frozenset({"espeak-ng", "sox", "soxi"})
#: fixtures that start processes or need the virtual audio devices: their tests are e2e
PROCESS_FIXTURES = frozenset({"vaudio", "start_engine", "node", "engine", "haproxy", "phone_engine"})


def _program(args: Any) -> str:
    first = args[0] if isinstance(args, (list, tuple)) and args else str(args).split(" ", 1)[0]
    return os.path.basename(str(first))


@pytest.fixture(autouse=True)
def _processes_mean_e2e(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test that starts a process carries ``@pytest.mark.e2e``, so ``pytest -m "not e2e"`` is a
    quick loop with no process, device or engine in it. A test without the marker that starts one
    (or uses a fixture that does) fails, naming what it started."""
    if request.node.get_closest_marker("e2e"):
        return
    node = request.node.nodeid
    used = sorted(PROCESS_FIXTURES & set(request.fixturenames))
    if used:
        raise AssertionError(f"{node} uses {', '.join(used)}, which start processes: mark it @pytest.mark.e2e")
    real_init = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> None:
        if _program(args) not in QUICK_PROGRAMS:
            raise AssertionError(f"{node} starts a process ({_program(args)}): mark it @pytest.mark.e2e")
        real_init(self, args, *rest, **kw)

    def no_fork() -> int:
        raise AssertionError(f"{node} forks a process: mark it @pytest.mark.e2e")

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    monkeypatch.setattr(os, "fork", no_fork)


# ---------------------------------------------------------------- event validation
class EventValidator:
    """Validates server events with pydantic strict mode against openai.types.realtime."""

    def __init__(self) -> None:
        import typing
        import pydantic
        from openai.types.realtime import realtime_server_event as se
        self.pydantic = pydantic
        self.models: dict[str, Any] = {}  # event type -> its pydantic model class
        stack: list[Any] = [se.RealtimeServerEvent]
        while stack:
            t = stack.pop()
            origin = typing.get_origin(t)
            if origin is typing.Annotated:
                stack.append(typing.get_args(t)[0])
            elif origin is typing.Union:
                stack.extend(typing.get_args(t))
            elif isinstance(t, type) and issubclass(t, pydantic.BaseModel):
                ann = t.model_fields["type"].annotation
                for lit in typing.get_args(ann):
                    self.models[lit] = t
        self.checked = 0
        # fields the real service sends that the official types lack (e.g. session.id): learnt from the traces
        self.real_extras: set[tuple[str, str, str]] = set()
        for trace in sorted(TRACES.glob("0*-ga-*.jsonl")):
            for line in trace.read_text().splitlines():
                ev = json.loads(line)
                model = self.models.get(ev.get("type"))
                if model is None:
                    continue
                try:
                    obj = model.model_validate_json(line, strict=True)
                except pydantic.ValidationError:
                    continue
                for path, keys in _extra_keys(obj, pydantic):
                    self.real_extras.update((ev["type"], _norm(path), k) for k in keys)

    def check(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        assert etype in self.models, f"{etype!r} is not a GA server event type"
        try:
            obj = self.models[etype].model_validate_json(json.dumps(event), strict=True)
        except self.pydantic.ValidationError as exc:
            raise AssertionError(f"{etype} does not validate: {exc}\n{json.dumps(event)[:600]}") from None
        extras = [(p, k) for p, keys in _extra_keys(obj, self.pydantic) for k in keys
                  if (etype, _norm(p), k) not in self.real_extras]
        assert not extras, f"{etype} has fields the official types do not know: {extras}"
        self.checked += 1


def _norm(path: str) -> str:
    import re
    return re.sub(r"\[\d+\]", "[]", path)


def _extra_keys(obj: Any, pydantic: Any, path: str = "") -> Iterator[tuple[str, list[str]]]:
    if isinstance(obj, pydantic.BaseModel):
        extra = getattr(obj, "__pydantic_extra__", None) or {}
        if extra:
            yield (path or "<root>", sorted(extra))
        for name in type(obj).model_fields:
            yield from _extra_keys(getattr(obj, name, None), pydantic, f"{path}.{name}" if path else name)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _extra_keys(v, pydantic, f"{path}[{i}]")


@pytest.fixture(scope="session")
def validator() -> EventValidator:
    return EventValidator()


class LiveEventValidator:
    """Validates GPT-Live server events against openai.types.live: dispatch on ``type`` (as
    live-protocol.md section 9.1 shows), pydantic strict mode, and no field the types do not know
    (their models allow extras, so ``model_extra`` is checked at every level). Sideband traffic
    is checked against ``ConnectServerEvent``."""

    def __init__(self) -> None:
        import typing
        import pydantic
        from openai.types.live import ConnectServerEvent, ServerEvent
        self.pydantic = pydantic

        def by_type(union: Any) -> dict[str, Any]:
            members = typing.get_args(typing.get_args(union)[0])
            return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}
        self.primary = by_type(ServerEvent)
        self.sideband = by_type(ConnectServerEvent)
        self.checked = 0

    def check(self, event: dict[str, Any], sideband: bool = False) -> None:
        models = self.sideband if sideband else self.primary
        etype = event.get("type")
        assert etype in models, f"{etype!r} is not a GPT-Live {'sideband' if sideband else 'server'} event type"
        try:
            obj = models[etype].model_validate_json(json.dumps(event), strict=True)
        except self.pydantic.ValidationError as exc:
            raise AssertionError(f"{etype} does not validate: {exc}\n{json.dumps(event)[:600]}") from None
        extras = list(_extra_keys(obj, self.pydantic))
        assert not extras, f"{etype} has fields the official types do not know: {extras}"
        self.checked += 1


@pytest.fixture(scope="session")
def live_validator() -> LiveEventValidator:
    return LiveEventValidator()


# ---------------------------------------------------------------- local servers in threads
@pytest.fixture
def make_server() -> Iterator[Any]:
    servers: list[LocalServer] = []

    def make(**kwargs: Any) -> LocalServer:
        kwargs.setdefault("speed", 20.0)
        kwargs.setdefault("asr", False)
        s = LocalServer(**kwargs)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


@pytest.fixture
def server(make_server: Any) -> LocalServer:
    return make_server()


# ---------------------------------------------------------------- speech
@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Make a 24 kHz mono WAV of ``text`` with espeak-ng, padded with silence."""
    out = tmp_path_factory.mktemp("speech")
    cache: dict[tuple[str, float], Path] = {}

    def make(text: str, pad_s: float = 0.3) -> Path:
        if (text, pad_s) not in cache:
            import numpy as np
            from engine.server.voice import synthesize
            from tests.helpers import write_wav
            pcm = synthesize(text, "alloy", 1.0)
            pad = np.zeros(int(24000 * pad_s), dtype=np.int16)
            cache[(text, pad_s)] = write_wav(out / f"{len(cache)}.wav", np.concatenate([pad, pcm, pad]))
        return cache[(text, pad_s)]
    return make


# ---------------------------------------------------------------- virtual audio devices
@pytest.fixture(scope="session")
def vaudio() -> Iterator[dict[str, str]]:
    """PulseAudio null sinks (tools/vaudio.sh); sets PULSE_SERVER and XDG_CONFIG_HOME."""
    if shutil.which("pulseaudio") is None:
        pytest.fail("pulseaudio is not installed: run bash tools/setup-system.sh")
    was_running = subprocess.run(["bash", str(VAUDIO), "status"], capture_output=True).returncode == 0
    out = subprocess.run(["bash", str(VAUDIO), "start"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    env = {}
    for part in out.stdout.strip().split()[1:]:
        k, _, v = part.partition("=")
        env[k] = v
    os.environ.update(env)
    yield env
    if not was_running:
        subprocess.run(["bash", str(VAUDIO), "stop"], capture_output=True, timeout=30)


@pytest.fixture
def node() -> str:
    """The node binary, with the Node.js client's packages installed."""
    path = shutil.which("node")
    if path is None or not (REPO / "clients" / "node" / "node_modules" / "zeromq").exists():
        pytest.fail("node and clients/node/node_modules are needed: run bash tools/setup-system.sh")
    return path


# ---------------------------------------------------------------- the engine
@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("REALTALK_RUNTIME_DIR", str(d))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return d


#: how many times faster than real time the engine's local server streams its replies, unless the
#: test passes its own ``--speed`` (``1`` where timing is measured or a reply must still be streaming)
ENGINE_SPEED = "8"


def _sets_speed(args: tuple[str, ...]) -> bool:
    """True if ``engine start`` arguments set the local server's speed (``--speed``, or a
    ``--config`` file's ``local_server.speed``)."""
    if "--speed" in args:
        return True
    if "--config" in args:
        import yaml
        cfg = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text()) or {}
        return "speed" in (cfg.get("local_server") or {})
    return False


@pytest.fixture
def start_engine(runtime_dir: Path, tmp_path: Path) -> Iterator[Any]:
    engines: list[RunningEngine] = []

    def start(*args: str, ready_timeout: float = 30) -> RunningEngine:
        speed = () if _sets_speed(args) else ("--speed", ENGINE_SPEED)
        proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", *speed, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
                                cwd=str(tmp_path))
        eng = RunningEngine(proc, runtime_dir, tmp_path / "data")
        engines.append(eng)
        if not eng.ready.wait(ready_timeout):
            eng.stop()
            raise AssertionError("engine did not become ready:\n" + "".join(eng.lines))
        return eng
    yield start
    for e in engines:
        e.stop()


@pytest.fixture
def phone_engine(runtime_dir: Path, tmp_path: Path) -> Iterator[Any]:
    engines: list[PhoneEngine] = []

    def start(*args: str) -> PhoneEngine:
        proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "phone", "--backend", "local", "--port", "0",
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=os.environ.copy(), cwd=str(tmp_path))
        eng = PhoneEngine(proc, runtime_dir, tmp_path / "data")
        engines.append(eng)
        if not eng.ready.wait(30):
            eng.stop()
            raise AssertionError("engine phone did not print its URL:\n" + "".join(eng.lines))
        return eng
    yield start
    for e in engines:
        e.stop()


#: fixtures of the tests that play and record through the virtual devices (timing measured at the device)
DEVICE_FIXTURES = frozenset({"vaudio", "browser", "talking_browser", "echo_path"})
#: modules whose engines run at real time on WAV mics (speed 1: a reply must still be streaming),
#: or whose assertions are start delays at real time (the jitter buffer follows measured jitter, so
#: a starved local server beside other tests is jitter it rightly measures)
REAL_TIME_MODULES = frozenset({"test_client_control.py", "test_live_engine.py", "test_jitter_engine.py"})
#: untimed e2e modules that run in the timed tests' lane (``timed_lane``), after the timed tests and
#: at the others' priority: the slowest of the others (a wheel build, npm, long conversations, fault
#: drills), so that both lanes take about as long. Without them the timed lane ended ~4 minutes
#: before the others, and one core idled while the others ran on alone (CI: 336 s against 578 s).
#: Between the timed tests, at their priority, they starved the others' lane (a test of the local
#: server's barge-in at 10x speed missed its window).
TIMED_LANE_MODULES = frozenset({"test_install.py", "test_node_client.py", "test_server_memory.py",
                                "test_faults_terminal.py", "test_faults_liveness.py", "test_faults_capture.py"})


@pytest.hookimpl(tryfirst=True)   # before -m selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """An e2e test on the virtual devices, or at real time on a WAV mic, also carries ``timed``.
    ``tools/test.sh`` runs those alone, one at a time, while everything else (the pure tests and
    the other e2e tests) runs beside them in a second pytest at a lower priority; the e2e tests of
    TIMED_LANE_MODULES carry ``timed_lane`` and run in the first lane, after the timed tests, at the
    lower priority."""
    for item in items:
        if not item.get_closest_marker("e2e"):
            continue
        if DEVICE_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in REAL_TIME_MODULES:
            item.add_marker(pytest.mark.timed)
        elif item.path.name in TIMED_LANE_MODULES:
            item.add_marker(pytest.mark.timed_lane)
