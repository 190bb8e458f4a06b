"""Liveness heartbeats: how each child proves to the supervisor that it is alive, without the bus
(a slow broker must neither fake a beat nor hide one), as gunicorn's workers do with a file
they touch.

The supervisor starts every child through this module, ``python -m engine.supervisor.heartbeat
MODULE ARGS...``, with the write end of a pipe of its own (:class:`HeartbeatPipe`) passed as
the fd named in ``REALTALK_HEARTBEAT_FD``. :func:`main` starts a daemon thread that writes one
byte to it every ``REALTALK_HEARTBEAT_PERIOD_S``, then runs ``MODULE`` as ``python -m MODULE
ARGS`` would, so the children need not know. The supervisor drains each pipe once a round of
its loop (the beats never wake it) and hands "beats came" to the child's state machine
(:mod:`engine.supervisor.children`), which finds a child silent past ``heartbeat_timeout_s``
UNRESPONSIVE.

Proof of life (:meth:`HeartbeatPipe.alive`) is a beat, or CPU time the process used since
the supervisor last looked (``/proc/PID/stat``): native code that holds the interpreter lock
for seconds (the local server's recogniser decoding a long utterance) starves the beating
thread but is working, not hung. A process that is stopped (SIGSTOP), frozen, or blocked
holding the lock gives neither. What it does not catch: a main loop deadlocked in Python
while its other threads run keeps beating; native code spinning for ever keeps using CPU.
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
import time

FD_ENV = "REALTALK_HEARTBEAT_FD"
PERIOD_ENV = "REALTALK_HEARTBEAT_PERIOD_S"
BEAT = b"."


def period_for(timeout_s: float) -> float:
    """The beat period for a timeout: six beats in it, every 50 ms to 500 ms."""
    return min(0.5, max(0.05, timeout_s / 6))


def _beat(fd: int, period_s: float) -> None:
    while True:
        try:
            os.write(fd, BEAT)
        except BlockingIOError:
            pass              # the pipe is full: the supervisor has not read lately, and knows we beat
        except OSError:
            return            # the supervisor is gone (EPIPE): nobody listens
        time.sleep(period_s)


def start_from_environment() -> threading.Thread | None:
    """Start beating on the fd the supervisor named in the environment (and take the variables
    out, so this process's own children do not inherit them). None when there is none."""
    fd_text, period_text = os.environ.pop(FD_ENV, None), os.environ.pop(PERIOD_ENV, None)
    if fd_text is None:
        return None
    try:
        fd, period_s = int(fd_text), float(period_text or 0.5)
        os.set_blocking(fd, False)    # a full pipe must never stop the beating thread
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        return None
    t = threading.Thread(target=_beat, args=(fd, period_s), name="heartbeat", daemon=True)
    t.start()
    return t


def cpu_ticks(pid: int) -> int | None:
    """User and system CPU time ``pid`` has used (clock ticks, /proc/PID/stat fields 14 and 15),
    or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


class HeartbeatPipe:
    """The supervisor's end of one child process's heartbeat pipe: ``child_fd`` goes to the child
    (``pass_fds``, and :meth:`environment`), then :meth:`child_started` closes it here; :meth:`beats`
    drains what came; :meth:`alive` is the proof of life the child's state machine takes as a beat."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.read_fd, self.child_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._cpu_ticks: int | None = None   #: the process's CPU time at the last look

    def alive(self, pid: int) -> bool:
        """Proof of life since the last call: a beat came, or the process ``pid`` used CPU time
        (busy in native code that holds the interpreter lock, its beating thread waiting for it)
        since the last call that found no beat (the first call without a beat after one with a
        beat only takes the CPU time to compare with: a process that stops beating proves it works
        from the second round on)."""
        if self.beats() > 0:
            # a beat is proof enough: /proc is read only in a round without one (three system calls a
            # child a round saved); the CPU time is then compared from the next round without a beat on
            self._cpu_ticks = None
            return True
        ticks = cpu_ticks(pid)
        ran = ticks is not None and self._cpu_ticks is not None and ticks > self._cpu_ticks
        self._cpu_ticks = ticks
        return ran

    def environment(self) -> dict[str, str]:
        return {FD_ENV: str(self.child_fd), PERIOD_ENV: f"{self.period_s:g}"}

    def child_started(self) -> None:
        """The child has its copy of the write end: close ours (the pipe then ends with the child)."""
        if self.child_fd >= 0:
            os.close(self.child_fd)
            self.child_fd = -1

    def beats(self) -> int:
        """Heartbeats that came since the last call (0: none; never blocks)."""
        n = 0
        while True:
            try:
                data = os.read(self.read_fd, 4096)
            except (BlockingIOError, InterruptedError):
                return n
            except OSError:
                return n
            if not data:
                return n      # every write end is closed: the child is gone (its exit is reaped apart)
            n += len(data)

    def close(self) -> None:
        self.child_started()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def main(argv: list[str]) -> None:
    """``python -m engine.supervisor.heartbeat MODULE [ARGS...]``: beat, then run MODULE as ``-m`` does."""
    if not argv:
        print("usage: python -m engine.supervisor.heartbeat MODULE [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    start_from_environment()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
