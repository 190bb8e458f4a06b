"""Console benchmark (issue 11): what the debug console costs the engine, and how fast and how
lean its page stays. One engine (the conversation suite's: virtual devices, 80 ms prebuffer, AEC,
its scenario with 30 ms delta jitter) answers turn after turn the whole run, while the bench
publishes marker messages on the bus (10 a second); first with the console closed, then with
`engine console` serving a headless Chromium page (listening, if the page has the listen switch),
then closed again. Definitions: bench/README.md, section "console".

    python bench/run.py console [--json] [--minutes N]
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
MARKER_HZ = 10.0             #: marker messages a second, in every phase
MARKER_TOPIC = "bench.marker"  #: not one of the page's firehose topics: it is drawn in the event list
CPU_WINDOW_S = 20.0          #: each CPU window
SETTLE_S = 2.0               #: after the page opened (and began to listen), before its CPU window
HEAP_EVERY_S = 60.0

#: installed in the page: the wall-clock time (ms) each marker's text first appears in the event list
OBSERVER_JS = """(token) => {
  window.__marks = {};
  const re = new RegExp("mk-" + token + "-(\\\\d+)");
  const list = document.getElementById("events");
  new MutationObserver((records) => {
    const now = Date.now();
    for (const r of records) for (const n of r.addedNodes) {
      const m = re.exec(n.textContent || "");
      if (m && !(m[1] in window.__marks)) window.__marks[m[1]] = now;
    }
  }).observe(list, { childList: true });
  return true;
}"""


#: the lengths of the page's bounded windows (what its heap holds), by name
PAGE_SIZES_JS = """() => {
  const s = window.consoleState, out = {};
  for (const [k, v] of Object.entries(s.lanes || {})) out["lane_" + k] = v.length;
  for (const k of ["markers", "events", "turnOrder"]) if (s[k] && s[k].length != null) out[k] = s[k].length;
  if (s.turns && s.turns.size != null) out.turns = s.turns.size;
  if (s.items && s.items.size != null) out.items = s.items.size;
  if (s.listen && s.listen.env) out.listen_env = s.listen.env.length;
  out.conversation_nodes = document.getElementById("conversation").getElementsByTagName("*").length;
  out.dom_nodes = document.getElementsByTagName("*").length;
  return out;
}"""


class Markers:
    """Publishes ``{text: "mk-<token>-<n>"}`` on MARKER_TOPIC at MARKER_HZ from its own thread and
    keeps each one's ``time.time()`` just before its publish."""

    def __init__(self, endpoints: dict[str, Any]) -> None:
        from bus import Publisher
        self.token = secrets.token_hex(3)
        self.pub = Publisher(endpoints["publish"], "bench-markers")
        self.pub.join(endpoints["subscribe"])
        self.sent: dict[int, float] = {}
        self._closed = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        from bench.common import paced
        n = 0
        for _ in paced(1 << 30, MARKER_HZ):
            if self._stop.is_set():
                break
            n += 1
            self.sent[n] = time.time()
            self.pub.publish(MARKER_TOPIC, {"text": f"mk-{self.token}-{n}"})

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)
        if not self._closed:
            self._closed = True
            self.pub.close()


class TurnLoop:
    """``Engine.turn`` one after the other in a thread until stopped; a turn that fails is counted."""

    def __init__(self, eng: Any) -> None:
        self.eng = eng
        self.turns = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.eng.turn(1000 + self.turns)
            except TimeoutError as exc:
                self.failed.append(str(exc))
            self.turns += 1

    def stop(self) -> None:
        self._stop.set()
        self._t.join(60)


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc's parent pids)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _watched(console_pid: int) -> dict[int, str]:
    """The console process and every Chromium process the bench started (its audio service
    starts with the page's audio), by pid."""
    out = {console_pid: "console"}
    for pid in _descendants(os.getpid()):
        try:
            if b"chromium" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out[pid] = f"browser:{pid}"
        except OSError:
            pass
    return out


def _cpu_windows(eng: Any, extra: dict[int, str], seconds: float) -> tuple[dict[str, float], float, float]:
    """bench.run's CPU window (``_cpu_window``: schedstat of every thread, % of one core) over the
    engine's processes and ``extra`` {pid: name} (the console, the browser's processes), with the
    floor (bench/floor.py: PyAudio + soxr + AEC3 on the same devices, none of the engine) running
    beside them and measured in the same window, as ``floor:input`` and ``floor:output``: this
    machine's speed moves by a quarter from minute to minute, and windows minutes apart are
    compared here."""
    from bench.floor import running
    from bench.common import cpu_window
    with running(48000, 20, 10, eng.env) as floor_pids:
        named = {**extra, **{pid: f"floor:{side}" for side, pid in floor_pids.items()}}
        conn = {"children": [*eng.conn["children"], *({"pid": p, "name": n} for p, n in named.items())]}
        return cpu_window(eng.proc, conn, seconds)


def _split(by_process: dict[str, float]) -> tuple[float, float, float]:
    """(engine total, console, browser) of one window's per-process figures (the floor left out)."""
    browser = sum(v for k, v in by_process.items() if k.startswith("browser"))
    console = by_process.get("console", 0.0)
    floor = _floor(by_process)
    return round(sum(by_process.values()) - browser - console - floor, 2), round(console, 2), round(browser, 2)


def _floor(by_process: dict[str, float]) -> float:
    """The floor's % of one core in one window (both its sides)."""
    return round(sum(v for k, v in by_process.items() if k.startswith("floor:")), 2)


def _heap(cdp: Any, collect: bool) -> dict[str, float]:
    """The page's JS heap (CDP Runtime.getHeapUsage), MB; after a full garbage collection
    (HeapProfiler.collectGarbage, which stalls the page: only outside the marker window) if ``collect``."""
    if collect:
        cdp.send("HeapProfiler.collectGarbage")
    h = cdp.send("Runtime.getHeapUsage")
    return {"used_mb": round(h["usedSize"] / 1e6, 2), "total_mb": round(h["totalSize"] / 1e6, 2)}


def _start_console(eng: Any) -> tuple[subprocess.Popen[str], str]:
    """``engine console`` for the bench's engine; (its process, its URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "console"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=eng.env, cwd=str(REPO))
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"realtalk: console (http://\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("engine console printed no URL:\n" + "".join(lines))


def _listen(page: Any) -> dict[str, Any]:
    """Turn the page's listen switch on if the page has one; whether PCM arrived within 10 s."""
    if not page.evaluate("() => !!document.getElementById('listen')"):
        return {"console_listen_switch": False, "console_listening": False}
    page.click("#listen")
    try:
        page.wait_for_function("() => { const L = window.consoleState && window.consoleState.listen;"
                               " return !!(L && L.on && L.received > 0); }", timeout=10_000)
        ok = True
    except Exception:   # Playwright's TimeoutError: the switch did not bring audio
        ok = False
    got = page.evaluate("() => { const L = window.consoleState.listen || {}; return {received: L.received,"
                        " played: L.played, underrunFrames: L.underrunFrames}; }")
    return {"console_listen_switch": True, "console_listening": ok, "console_listen_at_start": got}


def run(minutes: float = 10.0, closed_minutes: float | None = None) -> dict[str, Any]:
    """The figures (bench/README.md, "console"); ``minutes`` of events with the page listening, and
    ``closed_minutes`` (default a third of that, at least the CPU window) of turns before the console opens."""
    from bench.common import vaudio, vaudio_env
    from bench.conversation import JITTER_MS, Engine, count_gaps, gap_lengths_ms, response_spans, scenario
    if closed_minutes is None:
        closed_minutes = max(CPU_WINDOW_S / 60, minutes / 3)
    from bench.common import pct, stop_engine
    from playwright.sync_api import sync_playwright
    vaudio_env()
    tmp = Path(tempfile.mkdtemp(prefix="rtconsole"))
    scen = scenario(tmp)   # the conversation suite's reply with delta_jitter_ms 30 (seed 7)
    result: dict[str, Any] = {"jitter_ms": JITTER_MS, "minutes": minutes, "closed_minutes": closed_minutes,
                              "marker_hz": MARKER_HZ,
                              "cpu_window_s": CPU_WINDOW_S,
                              "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    vaudio("echo-on", "60%")
    eng = Engine(tmp, scen)
    markers = Markers(eng.conn)
    loop: TurnLoop | None = None
    console: subprocess.Popen[str] | None = None
    try:
        eng.turn(0)   # warm-up: its first sample anchors the recording's response spans
        loop = TurnLoop(eng)
        closed_from_ns = time.monotonic_ns()
        cpu_closed, _, _ = _cpu_windows(eng, {}, CPU_WINDOW_S)
        time.sleep(max(0.0, closed_minutes * 60 - CPU_WINDOW_S))   # more closed turns, for the underruns
        closed_to_ns = time.monotonic_ns()
        console, url = _start_console(eng)
        # the page's listening goes to a sink nobody records, not to the engine's speaker
        env: dict[str, str | float | bool] = {**os.environ, "PULSE_SINK": "hole"}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, env=env,
                                        args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.goto(url)
            page.wait_for_selector("#conn.ok", timeout=15_000)
            page.wait_for_function("() => document.getElementById('events').childElementCount > 0", timeout=15_000)
            page.evaluate(OBSERVER_JS, markers.token)
            time.sleep(SETTLE_S)
            cpu_page, _, _ = _cpu_windows(eng, _watched(console.pid), CPU_WINDOW_S)   # the page open, not listening
            result.update(_listen(page))
            listen_from_ns = time.monotonic_ns()
            cdp = page.context.new_cdp_session(page)
            heap_start = _heap(cdp, collect=True)
            time.sleep(SETTLE_S)
            observed_from = time.time()   # (the garbage collection above stalled the page: markers from here)
            cpu_open, _, _ = _cpu_windows(eng, _watched(console.pid), CPU_WINDOW_S)   # open and listening
            t0 = time.monotonic()
            end = t0 + minutes * 60
            heaps: list[tuple[float, dict[str, float]]] = [(0.0, heap_start)]
            collections: list[tuple[float, float]] = []   #: wall-clock spans of the forced collections
            next_heap = t0 + HEAP_EVERY_S
            while time.monotonic() < end:
                time.sleep(max(0.0, min(next_heap, end) - time.monotonic()))
                if time.monotonic() >= next_heap:
                    g0 = time.time()
                    heaps.append((round((time.monotonic() - t0) / 60, 2), _heap(cdp, collect=True)))
                    collections.append((g0, time.time()))
                    next_heap += HEAP_EVERY_S
            open_to_ns = time.monotonic_ns()
            observed_to = time.time()
            time.sleep(1.0)   # the last markers reach the page
            marks = page.evaluate("() => window.__marks")
            listen_end = page.evaluate("() => { const L = (window.consoleState || {}).listen || {}; return "
                                       "{received: L.received, played: L.played, underrunFrames: L.underrunFrames,"
                                       " droppedFrames: L.droppedFrames, serverDropped: L.serverDropped}; }")
            page_state = page.evaluate("() => ({events: window.consoleState.eventCount,"
                                       " rows: document.getElementById('events').childElementCount,"
                                       " errors: window.consoleState.errors})")
            sizes = page.evaluate(PAGE_SIZES_JS)
            heap_end = _heap(cdp, collect=True)
            browser.close()
        stop_engine(console)
        console = None
        time.sleep(SETTLE_S)
        closed2_from_ns = time.monotonic_ns()
        cpu_closed2, _, _ = _cpu_windows(eng, {}, CPU_WINDOW_S)
        closed2_to_ns = time.monotonic_ns()
        loop.stop()
        markers.stop()
    finally:
        if loop is not None:
            loop.stop()
        markers.stop()
        if console is not None:
            stop_engine(console)
        eng.stop()
        vaudio("echo-off")

    # --- CPU: engine closed (twice) vs open; the console's own; the browser apart
    eng_c1, _, _ = _split(cpu_closed)
    eng_c2, _, _ = _split(cpu_closed2)
    eng_page, console_page, browser_page = _split(cpu_page)
    eng_open, console_cpu, browser_cpu = _split(cpu_open)
    eng_closed = round((eng_c1 + eng_c2) / 2, 2)
    # each window's engine less the floor measured in it: the machine's speed mostly cancels
    above = {name: round(eng - _floor(w), 2) for name, eng, w in
             (("closed", eng_c1, cpu_closed), ("closed2", eng_c2, cpu_closed2),
              ("page", eng_page, cpu_page), ("open", eng_open, cpu_open))}
    above_closed = round((above["closed"] + above["closed2"]) / 2, 2)
    result.update({
        "floor_cpu_percent_of_one_core_runs": {"closed": _floor(cpu_closed), "closed2": _floor(cpu_closed2),
                                               "page": _floor(cpu_page), "open": _floor(cpu_open)},
        "engine_cpu_percent_above_floor_runs": above,
        "console_added_cpu_percent_above_floor": round(console_cpu + above["open"] - above_closed, 2),
        "console_added_cpu_percent_above_floor_not_listening": round(console_page + above["page"] - above_closed, 2),
        "engine_cpu_percent_console_closed": eng_closed,
        "engine_cpu_percent_console_closed_runs": [eng_c1, eng_c2],
        "engine_cpu_percent_console_open": eng_open,
        "engine_cpu_percent_by_process_closed": {k: v for k, v in cpu_closed.items() if not k.startswith("floor:")},
        "engine_cpu_percent_by_process_open": {k: v for k, v in cpu_open.items()
                                               if not k.startswith(("browser", "floor:"))},
        "console_process_cpu_percent": console_cpu,
        "console_added_cpu_percent_of_one_core": round(console_cpu + eng_open - eng_closed, 2),
        "console_added_cpu_goal_percent": 1.0,
        "console_added_cpu_percent_not_listening": round(console_page + eng_page - eng_closed, 2),
        "console_process_cpu_percent_not_listening": console_page,
        "browser_cpu_percent_of_one_core": browser_cpu,
        "browser_cpu_percent_of_one_core_not_listening": browser_page,
    })
    # --- bus message -> drawn in the page
    window = {n: sent for n, sent in markers.sent.items() if observed_from <= sent <= observed_to
              and not any(g0 - 0.5 <= sent <= g1 + 1.0 for g0, g1 in collections)}   # a collection stalls the page
    lat = [marks[str(n)] - sent * 1000 for n, sent in window.items() if str(n) in marks]
    result.update({
        "bus_to_page_ms_p50": round(pct(lat, 50), 1) if lat else None,
        "bus_to_page_ms_p99": round(pct(lat, 99), 1) if lat else None,
        "bus_to_page_ms_max": round(max(lat), 1) if lat else None,
        "bus_to_page_goal_ms": 100.0,
        "bus_to_page_markers_drawn": len(lat),
        "bus_to_page_markers_not_drawn": len(window) - len(lat),
        "page_events_received": page_state["events"], "page_event_rows": page_state["rows"],
        "page_errors_shown": page_state["errors"],
        "console_listen_at_end": listen_end,
    })
    if os.environ.get("REALTALK_BENCH_DUMP"):   # the raw material, to look into a bad figure
        dump = Path(os.environ["REALTALK_BENCH_DUMP"])
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "console_markers.json").write_text(json.dumps(
            [[n, sent, marks.get(str(n))] for n, sent in sorted(window.items())]))
    # --- the page's memory
    result.update({
        "page_js_heap_used_mb_start": heap_start["used_mb"], "page_js_heap_used_mb_end": heap_end["used_mb"],
        "page_js_heap_growth_mb": round(heap_end["used_mb"] - heap_start["used_mb"], 2),
        "page_js_heap_minutes": round((open_to_ns - listen_from_ns) / 60e9, 2),
        "page_js_heap_used_mb_by_minute": [[m, h["used_mb"]] for m, h in heaps],
        "page_window_sizes_at_end": sizes,
    })
    # --- underruns: count_gaps per response, in what playback handed out (the session recording),
    # on the responses whose recording is exact (capture zero-pads the played channel where playback
    # was behind the mic, `far_missing_frames`: such padding would read as a gap)
    starts = [(b["first_sample_mono_ns"]) for t, b in eng.log if t == "playout.started"]
    played = eng.played()
    spans = response_spans(played, starts)
    echoes = [(b.get("mono_ns", 0), b.get("far_missing_frames", 0)) for t, b in eng.log if t == "capture.echo"]

    def padded(i: int) -> bool:
        a = starts[i]
        b = starts[i + 1] if i + 1 < len(starts) else a + 10_000_000_000
        before = [f for ns, f in echoes if ns <= a]
        after = [f for ns, f in echoes if ns >= b]
        return not before or not after or after[0] > before[-1]
    phases = {"closed": [(closed_from_ns, closed_to_ns), (closed2_from_ns, closed2_to_ns)],
              "open": [(listen_from_ns, open_to_ns)]}
    for phase, ranges in phases.items():
        idx = [i for i, st in enumerate(starts) if i > 0 and any(a <= st < b for a, b in ranges)
               and spans[i][1] > spans[i][0]]
        exact = [i for i in idx if not padded(i)]
        gaps = {i: count_gaps(played[spans[i][0]:spans[i][1]]) for i in idx}
        reported = [b for t, b in eng.log if t == "playout.underrun"
                    and any(a <= b.get("mono_ns", 0) < bb for a, bb in ranges)]
        result[f"engine_underruns_jitter30_console_{phase}"] = sum(gaps[i] for i in exact)
        result[f"engine_underruns_responses_checked_console_{phase}"] = len(exact)
        result[f"engine_underruns_responses_padded_console_{phase}"] = len(idx) - len(exact)
        result[f"engine_underruns_incl_padded_console_{phase}"] = sum(gaps.values())
        result[f"engine_underruns_reported_console_{phase}"] = len(reported)
        result[f"engine_underrun_gaps_ms_console_{phase}"] = [
            round(g, 1) for i in exact if gaps[i] for g in gap_lengths_ms(played, [spans[i]])]
    result["engine_recording_padded_frames"] = (echoes[-1][1] - echoes[0][1]) if echoes else None
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["turns"] = loop.turns + 1
    result["turns_failed"] = len(loop.failed)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)))
