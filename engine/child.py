"""What every child process of the supervisor shares: its spec file, stop signals, and
how a failure to open its device is reported (a fatal ``engine.error`` and exit code 3)."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bus import Publisher

DEVICE_FAILED = 3


def stop_on_signals(stop: threading.Event, wake: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT only set ``stop`` (and call ``wake``, for a loop that sleeps on
    something else); the process's own loop winds down."""
    def _stop(*_: object) -> None:
        stop.set()
        if wake is not None:
            wake()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def run_reporting(pub: Publisher, source: str, body: Callable[[], None]) -> int:
    """Run ``body``; an exception becomes a fatal ``engine.error`` from ``source`` and exit code 3."""
    try:
        body()
    except Exception as exc:
        pub.publish("engine.error", {"source": source, "code": "device", "fatal": True, "message": str(exc)})
        time.sleep(0.2)  # let the message leave before the process exits
        return DEVICE_FAILED
    return 0


def every_period(stop: threading.Event, period_s: float) -> Iterator[None]:
    """Yield once per ``period_s`` on a fixed schedule until ``stop`` is set (the stand-in for a
    device clock in the WAV and null backends). After a stall the schedule restarts from now:
    no burst of catch-up periods, as a sound card would not give one either."""
    next_t = time.monotonic()
    while not stop.is_set():
        yield
        next_t += period_s
        delay = next_t - time.monotonic()
        if delay > 0:
            # a plain sleep: Event.wait costs a third more CPU per wake-up, and wake-ups are
            # most of what an idle engine spends; ``stop`` is seen within one period
            time.sleep(delay)
        else:
            next_t = time.monotonic()


def main(process_class: Callable[[dict[str, Any]], Any]) -> int:
    """``python -m engine.<process> SPEC.json``: build the process from its spec and run it."""
    if len(sys.argv) != 2:
        print(f"usage: python -m {process_class.__module__} SPEC.json", file=sys.stderr)
        return 2
    return process_class(json.loads(Path(sys.argv[1]).read_text())).run()
