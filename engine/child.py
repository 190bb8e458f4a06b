"""What every child process of the supervisor shares: how it gets its spec, how it dies
with the supervisor, stop signals, its exit codes, and how a failure is reported. Shared
(layer 1, below the processes and the supervisor): the children import it, and so does the
supervisor, for the exit codes and the death signal it sets between fork and exec.

Spec (engine/specs.py: one frozen type per child): the supervisor writes the child's spec as
one JSON line on the child's stdin and keeps the pipe open; nothing holding a secret (the API key, the bus signing key) is ever
written to a file. ``python -m engine.<process> SPEC.json`` still reads a file, for
running a child by hand.

Dying with the supervisor: the supervisor sets PR_SET_PDEATHSIG in every child between
fork and exec (:func:`parent_death_signal`), and :func:`main` sets it again and watches
stdin: end of file means the supervisor is gone (however it died), and the child stops
(SIGTERM to itself, then a hard exit :data:`PARENT_GONE_EXIT_S` later).

Failures (:func:`run_reporting`): a device or file that cannot be used (:class:`DeviceError`,
or ``OSError`` from PyAudio or the file system) is a fatal ``engine.error`` with code
``device`` and exit code 3: the supervisor does not restart the child and stops the engine
with the message. Anything else is a bug: ``engine.error`` code ``crash`` naming the
exception type and message, exit code 4, and the supervisor restarts the child.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from bus import Publisher, use_keys
from engine.errors import DeviceError
from engine.specs import S, SpecError, parse

EXIT_DEVICE_FAILED = 3     #: the child's device or file cannot be used: FATAL, no restart
EXIT_CRASHED = 4           #: a bug in the child (an unexpected exception): restart with backoff
EXIT_PARENT_GONE = 5       #: the supervisor died; the child left on its own
PARENT_GONE_EXIT_S = 0.7       #: after the supervisor is gone, a child that has not stopped is ended
_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover (not Linux)
    _libc = None


def parent_death_signal(signo: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``signo`` to this process when its parent dies (Linux prctl).
    Safe between fork and exec (``preexec_fn``): no allocation beyond the call. True if set."""
    if _libc is None:
        return False
    return _libc.prctl(_PR_SET_PDEATHSIG, int(signo), 0, 0, 0) == 0


def error_text(exc: BaseException) -> str:
    """``str(exc)``, or the exception's type when it has no message (``EOFError()``). An OSError
    with an errno reads ``No space left on device (ENOSPC): FILE``: the errno's name is what a
    user searches for."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode and exc.strerror:
        return (f"{exc.strerror} ({errno.errorcode[exc.errno]})"
                + (f": {exc.filename}" if exc.filename is not None else ""))
    text = str(exc)
    return text if text else type(exc).__name__


def stop_on_signals(stop: threading.Event, wake: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT only set ``stop`` (and call ``wake``, for a loop that sleeps on
    something else); the process's own loop winds down."""
    def _stop(*_: object) -> None:
        stop.set()
        if wake is not None:
            wake()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def is_device_error(exc: BaseException) -> bool:
    """A device or file that cannot be used (no restart helps), as opposed to a bug."""
    return isinstance(exc, (DeviceError, OSError))


def run_reporting(pub: Publisher, source: str, body: Callable[[], None]) -> int:
    """Run ``body``. A device error becomes a fatal ``engine.error`` (code ``device``) and exit
    code 3; any other exception is a bug: ``engine.error`` code ``crash`` with its type and
    message (and the traceback on stderr), exit code 4 (the supervisor restarts the child)."""
    try:
        body()
    except Exception as exc:
        if is_device_error(exc):
            pub.publish("engine.error", {"source": source, "code": "device", "fatal": True,
                                         "message": error_text(exc)})
            code = EXIT_DEVICE_FAILED
        else:
            traceback.print_exc(file=sys.stderr)
            pub.publish("engine.error", {"source": source, "code": "crash", "exception": type(exc).__name__,
                                         "message": f"{source} crashed: {type(exc).__name__}: {error_text(exc)}"})
            code = EXIT_CRASHED
        time.sleep(0.2)  # let the message leave before the process exits
        return code
    return 0


def next_due(due: float, now: float, every_s: float) -> float:
    """The next time a chore on a fixed ``every_s`` schedule is due, after it ran at ``now`` for the
    time ``due``: one period on (the rate holds however late each run is by less than a period),
    or one period from now after a stall (no burst of catch-up runs)."""
    due += every_s
    return due if due > now else now + every_s


def wake(fd: int) -> None:
    """Make the eventfd ``fd`` readable, so a thread sleeping in a poll on it returns: from any
    thread or a signal handler, never blocking (already readable: nothing more to do)."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def woken(fd: int) -> None:
    """Reset the eventfd ``fd`` after a poll found it readable (nothing to reset: fine)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


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


def read_spec(argv: list[str], stdin: BinaryIO) -> Any:
    """The spec: from the file named in ``argv[1]``, else the first line of ``stdin``."""
    if len(argv) == 2:
        return json.loads(Path(argv[1]).read_text())
    line = stdin.readline()
    if not line:
        raise SystemExit("no spec on stdin (the supervisor writes it; by hand: python -m engine.<process> SPEC.json)")
    return json.loads(line)


def watch_parent(fd: int, exit_after_s: float = PARENT_GONE_EXIT_S) -> threading.Thread:
    """A daemon thread: at end of file on ``fd`` (the supervisor's end of the stdin pipe closed: it
    stopped or died) SIGTERM this process, and end it ``exit_after_s`` later if it is still there.
    Reads the raw fd: a daemon thread blocked inside ``sys.stdin.buffer`` would abort the
    interpreter at exit (it cannot take the buffer's lock)."""
    def run() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(exit_after_s)
        os._exit(EXIT_PARENT_GONE)
    t = threading.Thread(target=run, name="parent-watch", daemon=True)
    t.start()
    return t


def main(process_class: Callable[[S], Any], spec_type: type[S]) -> int:
    """``python -m engine.<process> [SPEC.json]``: parse its spec once, as ``spec_type``
    (engine/specs.py: a spec that does not fit is refused at once, naming the field), build the
    process from it and run it."""
    if len(sys.argv) > 2:
        print(f"usage: python -m {process_class.__module__} [SPEC.json]  (default: the spec on stdin)",
              file=sys.stderr)
        return 2
    parent_death_signal(signal.SIGTERM)
    try:
        spec = parse(spec_type, read_spec(sys.argv, sys.stdin.buffer))
    except SpecError as exc:
        print(f"realtalk: {process_class.__module__}: bad spec: {exc}", file=sys.stderr, flush=True)
        return EXIT_DEVICE_FAILED   # a spec that does not fit does not fit the next time either
    use_keys(spec.bus.keys())  # its sockets sign and verify the control topics, and use CURVE on tcp
    if len(sys.argv) == 1:
        watch_parent(sys.stdin.fileno())
    return process_class(spec).run()
