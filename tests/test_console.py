"""The debug console (issue 11): level meters, the server's access rules, and a real headless
Chromium (Playwright driving Debian's /usr/bin/chromium) against a real engine on the local
server and the virtual audio devices. Screenshots go to runs/console-screenshots/."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from engine.audio.levels import FLOOR_DBFS, LevelTap, amplitude_dbfs, dbfs
from engine.console.relay import decode_batch
from tests.helpers import CHROMIUM, console_url, shot



# ---------------------------------------------------------------- level meters (no engine)
@pytest.mark.timeout(10)
def test_level_tap_measures_windows_with_their_time() -> None:
    tap = LevelTap(24000, window_ms=20, capacity_ms=2000)
    t0 = time.monotonic_ns()
    amp = 0.5 * 32767
    sine = (amp * np.sin(2 * np.pi * 1000 * np.arange(24000 * 3 // 10) / 24000)).astype(np.int16)
    for i in range(0, len(sine), 480):            # 15 blocks of 20 ms, as a callback would push them
        tap.push(sine[i:i + 480])
    tap.push(np.zeros(240, dtype=np.int16))       # half a window: waits for the next drain
    t1 = time.monotonic_ns()
    lv = tap.drain()
    assert len(lv.rms_dbfs) == 15 and len(lv.peak_dbfs) == 15 and lv.lost_frames == 0
    assert all(abs(v - (20 * np.log10(0.5 / np.sqrt(2)))) < 0.2 for v in lv.rms_dbfs), lv.rms_dbfs  # -9.0 dBFS
    assert all(abs(v - 20 * np.log10(0.5)) < 0.2 for v in lv.peak_dbfs), lv.peak_dbfs               # -6.0 dBFS
    # the first window started 310 ms (the frames pushed) before the latest push's stamp
    assert lv.start_mono_ns is not None and t0 - 320_000_000 <= lv.start_mono_ns <= t1
    tap.push(np.zeros(240, dtype=np.int16))
    silent = tap.drain()
    assert silent.rms_dbfs == [FLOOR_DBFS] and silent.start_mono_ns is not None
    assert silent.start_mono_ns > lv.start_mono_ns + 290_000_000


def test_one_amplitude_in_dbfs_is_what_the_array_form_gives() -> None:
    values = [0.0, 1e-12, 0.5, 1.0, 1.04, 1.05, 100.0, 3000.0, 23170.0, 32767.0, 32768.0]
    assert [amplitude_dbfs(v) for v in values] == dbfs(np.array(values))
    assert amplitude_dbfs(32768.0) == 0.0 and amplitude_dbfs(0.0) == FLOOR_DBFS
    tap = LevelTap(24000)
    tap.push(np.full(480, -32768, dtype=np.int16))   # full scale, negative: no int16 overflow in the peak
    assert tap.drain().peak_dbfs == [0.0]


@pytest.mark.timeout(10)
def test_level_tap_counts_what_a_late_reader_lost() -> None:
    tap = LevelTap(24000, window_ms=20, capacity_ms=200)   # 4800 frames
    for _ in range(30):                                     # 600 ms unread
        tap.push(np.full(480, 1000, dtype=np.int16))
    lv = tap.drain()
    assert lv.lost_frames > 0 and 0 < len(lv.rms_dbfs) <= 10
    assert (len(lv.rms_dbfs) * 480 + lv.lost_frames) == 30 * 480
    assert tap.drain().rms_dbfs == []
    with pytest.raises(ValueError):
        LevelTap(24000, window_ms=20, capacity_ms=40)


# ---------------------------------------------------------------- helpers
def http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run bash tools/setup-system.sh")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def console_url_of(console: subprocess.Popen[str]) -> str:
    """The URL a standalone `engine console` printed."""
    assert console.stdout is not None
    for line in console.stdout:
        m = re.search(r"realtalk: console (http://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("engine console printed no URL")


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 950})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(url)
    page.wait_for_selector("#conn.ok", timeout=10_000)
    return page


def lane_columns(page: Any, lane: int, rgb: tuple[int, int, int]) -> int:
    """Distinct x columns of the levels canvas where ``lane`` (0 mic, 1 after echo, 2 speaker)
    has pixels of the lane's colour in its lower half (marker lines are one column each)."""
    return page.evaluate("""([lane, rgb]) => {
        const c = document.getElementById('levels'), g = c.getContext('2d');
        const laneH = (c.height - 16 * (window.devicePixelRatio || 1)) / 3;
        const y0 = Math.round(lane * laneH + laneH / 2), h = Math.round(laneH / 2) - 2;
        const d = g.getImageData(0, y0, c.width, h).data, cols = new Set();
        for (let i = 0; i < d.length; i += 4) {
          if (Math.abs(d[i] - rgb[0]) < 30 && Math.abs(d[i + 1] - rgb[1]) < 30 && Math.abs(d[i + 2] - rgb[2]) < 30)
            cols.add((i / 4) % c.width);
        }
        return cols.size; }""", [lane, list(rgb)])


def conversation(page: Any) -> str:
    return page.inner_text("#conversation")


SPK = (0xff, 0xb3, 0x47)
MIC = (0x4f, 0xb3, 0xff)


# ---------------------------------------------------------------- the server's rules (text only)
@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_console_url_status_token_and_commands(start_engine: Any) -> None:
    eng = start_engine("--text-only", "--console")
    url = console_url(eng)
    assert url.startswith("http://127.0.0.1:") and "token=" in url
    base, token = url.split("/?token=")
    st = json.loads(eng.cli("status", "--json").stdout)
    assert st["console"]["url"] == url
    assert url in eng.cli("status").stdout
    assert token not in (eng.runtime / "engine.json").read_text()       # the token is not in the bus's file
    assert (eng.runtime / "console.json").stat().st_mode & 0o077 == 0
    # everything but the static files needs the token
    assert http(base + "/")[0] == 403
    assert http(base + "/?token=wrong")[0] == 403
    assert http(base + "/api/sessions")[0] == 403
    code, page = http(url)
    assert code == 200 and b"realtalk console" in page
    assert http(base + "/static/console.js")[0] == 200
    assert http(base + "/static/../server.py")[0] == 404
    code, body = http(base + "/api/session/events?key=../../etc&token=" + token)
    assert code == 400 and b"not a session folder name" in body
    sessions = json.loads(http(base + "/api/sessions?token=" + token)[1])
    assert sessions["live_session"] in [s["key"] for s in sessions["sessions"]]
    # a second `engine console` finds the running one
    out = eng.cli("console", timeout=20)
    assert out.returncode == 0 and url in out.stdout
    # the WebSocket: the token, then commands checked by name
    from websockets.sync.client import connect
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus):
        connect(base.replace("http", "ws") + "/ws?token=nope", open_timeout=5).close()
    with connect(base.replace("http", "ws") + "/ws?token=" + token, open_timeout=5) as ws:
        assert json.loads(ws.recv(5))["op"] == "hello"
        ws.send(json.dumps({"op": "publish", "topic": "engine.error"}))
        ws.send(json.dumps({"op": "say", "text": "  "}))
        ws.send(json.dumps({"op": "say", "text": "Hello there", "role": "user"}))
        replies, said, answered = [], None, False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not answered:
            raw = ws.recv(30)
            if isinstance(raw, bytes):   # a batch of bus messages (binary: engine.console.relay.encode_batch)
                for ev_topic, ev_body in decode_batch(raw)[2]:
                    if ev_topic == "response.done" and said and ev_body.get("request_id") == said:
                        answered = True
                continue
            msg = json.loads(raw)
            if msg["op"] in ("error", "sent"):
                replies.append(msg)
                said = msg["id"] if msg["op"] == "sent" else said
        assert [r["op"] for r in replies] == ["error", "error", "sent"], replies
        assert "unknown op 'publish'" in replies[0]["message"] and "type some text" in replies[1]["message"]
        assert answered, "the console's cmd.say was not answered"
    # listen works without a speaker device (the null speaker plays in real time); a text-only
    # engine has no mic, so talk is refused with the reason
    from websockets.exceptions import ConnectionClosed
    with connect(base.replace("http", "ws") + "/listen?token=" + token, open_timeout=5) as ws:
        assert json.loads(ws.recv(5))["op"] == "listen"
        assert isinstance(ws.recv(5), bytes)
    with connect(base.replace("http", "ws") + "/talk?token=" + token, open_timeout=5) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert "no browser ring" in closed.value.rcvd.reason, closed.value.rcvd.reason
    assert eng.stop() == 0
    assert not (eng.runtime / "console.json").exists()


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_console_opened_mid_conversation_shows_what_came_before_it(start_engine: Any) -> None:
    """`engine console` started after a reply (or a console child that subscribes late, on a busy
    machine) sends a page what the session said before it joined: the session's event log up to
    the first message the console took from the bus, then the bus, each message once."""
    import sys
    from websockets.sync.client import connect
    from bus import Subscriber
    from tests.helpers import wait_topic
    eng = start_engine("--text-only")
    sub = Subscriber(eng.conn["subscribe"], ["model.text.done"])
    assert eng.cli("say", "What is the capital of France?").returncode == 0
    assert "capital of France" in wait_topic(sub, "model.text.done")["text"]
    sub.close()
    console = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "console"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        url = console_url_of(console)
        base, token = url.split("/?token=")
        seen: list[tuple[str, dict[str, Any]]] = []
        with connect(base.replace("http", "ws") + "/ws?token=" + token, open_timeout=5) as ws:
            assert json.loads(ws.recv(5))["op"] == "hello"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(t == "engine.status" for t, _ in seen):
                raw = ws.recv(10)
                if isinstance(raw, bytes):
                    seen.extend(decode_batch(raw)[2])
        topics = [t for t, _ in seen]
        assert "session.config" in topics and "user.text" in topics, topics[:40]
        replies = [b["text"] for t, b in seen if t == "model.text.done"]
        assert any("capital of France" in r for r in replies), replies
        keys = [(t, b.get("pub"), b.get("seq")) for t, b in seen if b.get("seq") is not None]
        twice = [k for k in set(keys) if keys.count(k) > 1]
        assert not twice, f"came twice: {twice}"
        assert topics.index("session.config") < topics.index("user.text") < topics.index("model.text.done"), topics
    finally:
        console.terminate()
        console.wait(10)
    assert eng.stop() == 0


# ---------------------------------------------------------------- a spoken conversation in Chromium
@pytest.mark.e2e
@pytest.mark.audio
@pytest.mark.timeout(240)
def test_console_in_chromium_during_a_spoken_conversation(vaudio: dict[str, str], start_engine: Any,
                                                          speech_wav: Any, tmp_path: Path, browser: Any) -> None:
    scenario = tmp_path / "sc.yaml"
    story = ("Once upon a time, in a small village by the sea, there lived an old fisherman who told long "
             "stories every evening, about storms and whales and the lights he saw far out on the water.")
    scenario.write_text(f'turns:\n  - match: {{text: "Tell me a story"}}\n    reply: "{story}"\n'
                        '  - match: {turn: 1}\n    reply: "The capital of France is Paris."\n'
                        '  - match: {text: "Italy"}\n    reply: "Rome is the capital of Italy."\n'
                        'default_reply: "All right, I stop."\n')
    record = tmp_path / "rec"
    cfg = tmp_path / "cfg.yaml"
    # no echo path between the virtual devices; without the residual-echo guard the user's quieter
    # voice over the model's is not taken for echo, so the barge-in below happens
    cfg.write_text(f"record: {record}\naudio:\n  echo_guard_db: null\n")
    # real time: the barge-in below cuts a reply the server is still streaming
    eng = start_engine("--config", str(cfg), "--mic", "vmic", "--speaker", "vspk", "--scenario", str(scenario),
                       "--console", "--speed", "1")
    page = open_page(browser, console_url(eng))
    env = os.environ.copy()

    # 1. spoken question: the user's speech, the reply's words, the envelopes while the model speaks
    subprocess.run(["paplay", "--device=micsink", str(speech_wav("What is the capital of France?", pad_s=0.3))],
                   check=True, timeout=20, env=env)
    page.wait_for_function("() => window.consoleState.markers.some(m => m.kind === 'played')", timeout=30_000)
    page.wait_for_function("() => window.consoleState.lanes.spk.some(p => p.db > -40)", timeout=10_000)
    for _ in range(25):   # the envelope scrolls in as the reply plays: up to 5 s of drawing
        page.wait_for_timeout(200)
        spk_cols, mic_cols = lane_columns(page, 2, SPK), lane_columns(page, 0, MIC)
        if spk_cols > 20 and mic_cols > 20:
            break
    shot(page, "1-model-speaking.png")
    assert spk_cols > 20, f"the speaker lane is blank while the model speaks ({spk_cols} columns)"
    assert mic_cols > 20, f"the mic lane is blank after the user spoke ({mic_cols} columns)"
    page.wait_for_function("() => document.getElementById('conversation').innerText.includes('Paris')", timeout=30_000)
    page.wait_for_function("() => [...document.querySelectorAll('.turn.model .nums')].some(n => n.innerText.includes('speaker'))",
                           timeout=30_000)
    text = conversation(page)
    assert "The capital of France is Paris." in text and "speech end → first delta" in text, text
    kinds = page.evaluate("() => [...new Set(window.consoleState.markers.map(m => m.kind))]")
    assert {"speech", "response", "delta", "played"} <= set(kinds), kinds
    assert page.locator("#events .ev").count() > 10

    # 2. a cmd.say typed into the page is answered
    page.fill("#say-text", "And the capital of Italy?")
    page.click("#say-send")
    page.wait_for_function("() => document.getElementById('conversation').innerText.includes('Rome is the capital of Italy.')",
                           timeout=30_000)
    assert "And the capital of Italy?" in conversation(page)
    page.wait_for_function("() => document.getElementById('say-status').innerText.startsWith('added as')", timeout=10_000)

    # 3. barge-in: the user talks over a long reply; the page shows where it was cut
    # (on a loaded machine the model's own echo can cut a reply before its first sample: ask again once)
    played = page.evaluate("() => window.consoleState.markers.filter(m => m.kind === 'played').length")
    for attempt in range(2):
        page.fill("#say-text", "Tell me a story.")
        page.click("#say-send")
        try:
            page.wait_for_function(f"() => window.consoleState.markers.filter(m => m.kind === 'played').length > {played}",
                                   timeout=30_000)
            break
        except Exception:
            if attempt == 1:
                raise
    page.wait_for_timeout(1500)
    subprocess.run(["paplay", "--device=micsink", str(speech_wav("Wait, please stop.", pad_s=0.3))],
                   check=True, timeout=20, env=env)
    page.wait_for_function("() => window.consoleState.markers.some(m => m.kind === 'bargein')", timeout=20_000)
    page.wait_for_function("() => document.querySelector('.turn.interrupted') !== null", timeout=20_000)
    page.wait_for_timeout(400)
    shot(page, "2-barge-in.png")
    cut = page.inner_text(".turn.interrupted")
    assert "cut at" in cut and story not in cut, cut
    page.wait_for_function("() => document.getElementById('conversation').innerText.includes('All right, I stop.')",
                           timeout=30_000)
    # the inspector: filter, search, expand, pause
    page.fill("#ev-filter", "response.done")
    assert page.locator("#events .ev").count() >= 3
    assert all(t.split()[1] == "response.done" for t in page.locator("#events .ev").all_inner_texts())
    page.locator("#events .ev").first.click()
    assert '"usd"' in page.inner_text("#events .ev pre")
    page.click("#ev-pause")
    shot(page, "3-after-barge-in-events.png")
    assert page.errors == [], page.errors
    page.close()
    session_key = Path(eng.conn["session_dir"]).name
    assert eng.stop() == 0

    # 4. look back: the finished session opens in a console of the next engine, and plays
    wav = record / session_key / "conversation.wav"
    assert wav.exists()
    eng2 = start_engine("--config", str(cfg), "--text-only", "--console")
    page = open_page(browser, console_url(eng2))
    page.evaluate("() => loadSessions()")
    page.wait_for_function(f"() => [...document.querySelectorAll('#sessions option')].some(o => o.value === '{session_key}')",
                           timeout=10_000)
    page.select_option("#sessions", session_key)
    page.click("#open-session")
    page.wait_for_function("() => document.getElementById('conversation').innerText.includes('Rome is the capital of Italy.')",
                           timeout=15_000)
    page.wait_for_function("() => document.getElementById('lookback-audio').duration > 5", timeout=15_000)
    page.evaluate("() => { const a = document.getElementById('lookback-audio'); a.currentTime = 1; return a.play(); }")
    page.wait_for_function("() => document.getElementById('lookback-audio').currentTime > 1.5", timeout=15_000)
    # seek to the barge-in: the markers and the envelopes of that moment are drawn
    page.evaluate("() => seekTo(window.consoleState.markers.find(m => m.kind === 'bargein').t)")
    page.evaluate("() => document.getElementById('lookback-audio').pause()")
    page.wait_for_timeout(300)
    shot(page, "4-look-back.png")
    assert lane_columns(page, 2, SPK) > 20
    assert "cut at" in conversation(page)
    assert page.errors == [], page.errors


# ---------------------------------------------------------------- GPT-Live in Chromium
def band_columns(page: Any, rgb: tuple[int, int, int]) -> int:
    """Distinct x columns of the speaker lane's track band (GPT-Live: 14-19 px below the lane's
    top) that have pixels of colour ``rgb``."""
    return page.evaluate("""(rgb) => {
        const c = document.getElementById('levels'), g = c.getContext('2d'), dpr = window.devicePixelRatio || 1;
        const laneH = (c.height - 16 * dpr) / 3, y0 = Math.round(2 * laneH + 15 * dpr), h = Math.max(1, Math.round(3 * dpr));
        const d = g.getImageData(0, y0, c.width, h).data, cols = new Set();
        for (let i = 0; i < d.length; i += 4) {
          if (Math.abs(d[i] - rgb[0]) < 12 && Math.abs(d[i + 1] - rgb[1]) < 12 && Math.abs(d[i + 2] - rgb[2]) < 12)
            cols.add((i / 4) % c.width);
        }
        return cols.size; }""", list(rgb))


TRACK = (0x3a, 0x46, 0x54)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_console_on_gpt_live_shows_the_track_fragments_context_and_cost(start_engine: Any, speech_wav: Any,
                                                                         tmp_path: Path, browser: Any) -> None:
    """A Live engine (the local server's GPT-Live, a spoken question as the mic, the null speaker):
    the page knows it is GPT-Live, draws the model's continuous track with where the model speaks on
    it, shows each turn's raw transcript fragments with their times on the session's timeline,
    places context and commentary typed into it, and shows the cost by the second."""
    scenario = tmp_path / "sc.yaml"
    scenario.write_text('turns:\n  - match: {turn: 1}\n    hear: "what is the capital of france"\n'
                        '    reply: "The capital of France is Paris, a city on the Seine."\n')
    mic = speech_wav("What is the capital of France?", pad_s=4.0)   # time for the page to open first
    eng = start_engine("--model", "gpt-live-1", "--mic", str(mic), "--speaker", "null", "--scenario", str(scenario),
                       "--console", "--speed", "1")
    page = open_page(browser, console_url(eng))
    page.wait_for_function("() => window.consoleState.api === 'live'", timeout=10_000)
    assert page.inner_text("#api") == "GPT-Live"
    assert page.is_hidden("#cancel") and page.is_visible("#track-stat")
    assert page.evaluate("() => [...document.querySelectorAll('#say-role option')].map(o => o.value)") == \
        ["system", "instructions", "commentary"]
    page.wait_for_function("() => window.consoleState.track.segments.length >= 1", timeout=10_000)

    # the spoken question and the answer, as turns of raw fragments with their session times
    page.wait_for_function("() => document.querySelector('.turn.user .frag[data-start-ms]') !== null", timeout=30_000)
    page.wait_for_function("() => window.consoleState.track.now === 'model speaking'", timeout=30_000)
    page.wait_for_timeout(1000)
    shot(page, "live-1-model-speaking.png")
    assert band_columns(page, SPK) > 10, "the track band shows no speech while the model speaks"
    assert band_columns(page, TRACK) > 10, "the track band shows no silent track"
    page.wait_for_function("() => document.getElementById('conversation').innerText.includes('a city on the Seine')",
                           timeout=30_000)
    frags = page.evaluate("() => [...document.querySelectorAll('.turn.model .frag')].map(f => [f.textContent, "
                          "Number(f.dataset.startMs), Number(f.dataset.endMs)])")
    assert len(frags) >= 3 and all(e - s == 200 and s % 200 == 0 for _, s, e in frags), frags
    assert "".join(t for t, _, _ in frags).startswith("The capital of France is Paris")
    page.wait_for_function("() => [...document.querySelectorAll('.turn.model .nums')].some(n => "
                           "n.innerText.includes('fragments') && n.innerText.includes('session'))", timeout=10_000)
    # the turn's latency: speech end -> the reply's first sound heard, which is about the gap between the
    # turns on the session's timeline (the engine closes the user's turn 800 ms after its last fragment,
    # when the reply has already begun: measured from then, it read 800 ms and more too long). With a
    # 600 ms gap it reads 870-890 ms on an idle machine, 1,262 once under CI's two test processes, and
    # read ~1,800 with that defect: the bound is the gap and 900 ms
    page.wait_for_function("() => [...document.querySelectorAll('.turn.model .nums')].some(n => "
                           "n.innerText.includes('first sound heard'))", timeout=10_000)
    spans = page.evaluate("() => [...document.querySelectorAll('.turn.user .nums, .turn.model .nums')]"
                          ".map(n => n.innerText)")
    user_end_s = float(re.search(r"session [\d.]+[–-]([\d.]+) s", spans[0]).group(1))   # type: ignore[union-attr]
    heard_ms = float(re.search(r"first sound heard (\d+) ms", spans[1]).group(1))        # type: ignore[union-attr]
    model_start_s = float(re.search(r"session ([\d.]+)[–-]", spans[1]).group(1))          # type: ignore[union-attr]
    assert 0 < heard_ms < (model_start_s - user_end_s) * 1000 + 900, spans
    # the user's speech is marked where it was, not when its fragments came (after it)
    marks = page.evaluate("() => Object.fromEntries(window.consoleState.markers.map(m => [m.label, m.t]))")
    assert abs(marks["speech stopped"] - marks["speech end"]) < 50, marks
    assert 0 < marks["speech end"] - marks["speech started"] < 3000, marks
    page.wait_for_function("() => window.consoleState.track.now === 'silent'", timeout=15_000)

    # context and commentary typed into the page are placed; the model says the commentary
    page.select_option("#say-role", "system")
    page.fill("#say-text", "The booking is ZX9.")
    page.click("#say-send")
    page.wait_for_function("() => document.getElementById('say-status').innerText.startsWith('placed at')", timeout=15_000)
    page.select_option("#say-role", "commentary")
    page.fill("#say-text", "The museum opens at nine.")
    page.click("#say-send")
    page.wait_for_function("() => [...document.querySelectorAll('.turn.model')].some(t => "
                           "t.innerText.includes('The museum opens at nine.'))", timeout=30_000)
    placed = page.evaluate("() => [...document.querySelectorAll('.turn.system')].map(t => t.innerText)")
    assert any("context (silent) placed" in t and "ZX9" in t and "of the session" in t for t in placed), placed
    assert any("commentary placed" in t and "museum" in t for t in placed), placed

    # cost by the second (session.usage.updated every 15 s of the session)
    page.wait_for_function("() => /\\d+ s at \\$0.05\\/min/.test(document.getElementById('cost-seconds').innerText)",
                           timeout=30_000)
    shot(page, "live-2-context-and-cost.png")
    assert page.errors == [], page.errors
    page.close()
    assert eng.stop() == 0
