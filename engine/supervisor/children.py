"""The supervisor's per-child state machine (supervisord's ``states.py``), without I/O.

Rules:

* A child is STARTING from its spawn until it has stayed up ``startsecs``; only then is it
  RUNNING. The supervisor spawns; this module only says when.
* A child that exits while STARTING goes to BACKOFF and is spawned again after
  ``backoff_s * tries`` seconds; after ``startretries`` failed starts in a row it is FATAL.
* A child that exits while RUNNING (a crash mid-call) goes to BACKOFF with a short delay
  (``restart_delay_s``, doubling per exit within ``flap_window_s``); more than
  ``max_restarts`` exits within ``flap_window_s`` is FATAL (it flaps).
* Exit code 3 (:data:`EXIT_DEVICE_FAILED`: the child could not open its device or file) is
  FATAL at once, from any state: restarting cannot fix it.
* Liveness (with ``heartbeat_timeout_s`` set): a child proves it is alive with heartbeats
  (``beat``; :mod:`engine.supervisor.heartbeat`: a byte on a pipe every fraction of the
  timeout, from a thread of its own, never through the bus; or CPU time it used, busy in
  native code that holds the interpreter lock). It is RUNNING only once it is up
  ``startsecs`` *and* has beaten once. A child silent for ``heartbeat_timeout_s`` while RUNNING,
  or without a first beat ``first_beat_timeout_s`` after its spawn while STARTING, goes to
  UNRESPONSIVE: the supervisor reports it and SIGKILLs it (a stopped or hung process cannot
  act on SIGTERM). Its exit then counts as an exit from the state it hung in: a crash while
  RUNNING (restart, flap count), or a failed start while STARTING (backoff, startretries).
  A beat after the verdict changes nothing.
* A stop request: STARTING/RUNNING go to STOPPING (the supervisor sends SIGTERM, then SIGKILL
  at ``kill_at``), UNRESPONSIVE goes to STOPPING too (SIGKILL again at once), BACKOFF goes
  straight to EXITED (nothing runs). STOPPING --exit--> EXITED.
* EXITED and FATAL are final: no event moves a child out of them.
* Every transition is in :data:`TRANSITIONS`; an event not allowed in the current state
  raises :class:`ChildStateError` and changes nothing (a handler never half-applies).

Events are the methods ``spawned``, ``beat``, ``exited``, ``tick`` and ``stop``; each returns the
:class:`Action` the supervisor must carry out (or None) after the state has changed.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.child import EXIT_DEVICE_FAILED
from engine.errors import EngineError


class ChildState(str, enum.Enum):
    STOPPED = "stopped"     # not spawned yet
    STARTING = "starting"   # spawned, not yet up for startsecs
    RUNNING = "running"
    BACKOFF = "backoff"     # exited; waiting to be spawned again
    UNRESPONSIVE = "unresponsive"   # no heartbeat in time: SIGKILL sent, waiting for the exit
    STOPPING = "stopping"   # told to stop (SIGTERM sent)
    EXITED = "exited"       # stopped on request
    FATAL = "fatal"         # gave up: the engine stops


S = ChildState
#: (state, event) -> the states it may go to
TRANSITIONS: dict[tuple[ChildState, str], frozenset[ChildState]] = {
    (S.STOPPED, "spawned"): frozenset({S.STARTING}),
    (S.STOPPED, "stop"): frozenset({S.EXITED}),
    (S.STARTING, "tick"): frozenset({S.STARTING, S.RUNNING, S.UNRESPONSIVE}),
    (S.STARTING, "beat"): frozenset({S.STARTING}),
    (S.STARTING, "exited"): frozenset({S.BACKOFF, S.FATAL}),
    (S.STARTING, "stop"): frozenset({S.STOPPING}),
    (S.RUNNING, "tick"): frozenset({S.RUNNING, S.UNRESPONSIVE}),
    (S.RUNNING, "beat"): frozenset({S.RUNNING}),
    (S.RUNNING, "exited"): frozenset({S.BACKOFF, S.FATAL}),
    (S.RUNNING, "stop"): frozenset({S.STOPPING}),
    (S.UNRESPONSIVE, "tick"): frozenset({S.UNRESPONSIVE}),
    (S.UNRESPONSIVE, "beat"): frozenset({S.UNRESPONSIVE}),    # too late: SIGKILL is on its way
    (S.UNRESPONSIVE, "exited"): frozenset({S.BACKOFF, S.FATAL}),
    (S.UNRESPONSIVE, "stop"): frozenset({S.STOPPING}),
    (S.BACKOFF, "tick"): frozenset({S.BACKOFF}),        # the supervisor spawns when due
    (S.BACKOFF, "spawned"): frozenset({S.STARTING}),
    (S.BACKOFF, "stop"): frozenset({S.EXITED}),
    (S.STOPPING, "tick"): frozenset({S.STOPPING}),
    (S.STOPPING, "beat"): frozenset({S.STOPPING}),
    (S.STOPPING, "exited"): frozenset({S.EXITED}),
    (S.STOPPING, "stop"): frozenset({S.STOPPING}),
    (S.EXITED, "stop"): frozenset({S.EXITED}),
    (S.EXITED, "tick"): frozenset({S.EXITED}),
    (S.FATAL, "stop"): frozenset({S.FATAL}),
    (S.FATAL, "tick"): frozenset({S.FATAL}),
}


class ChildStateError(EngineError):
    """An event the child's current state does not allow (a supervisor bug)."""


@dataclass(frozen=True)
class Policy:
    startsecs: float = 1.0         #: up this long before it counts as RUNNING
    startretries: int = 3          #: failed starts in a row before FATAL
    backoff_s: float = 0.25        #: delay before the n-th retry of a failed start: n * backoff_s
    restart_delay_s: float = 0.1   #: first restart after a crash while RUNNING (doubles per exit in the window)
    max_restart_delay_s: float = 5.0
    max_restarts: int = 5          #: exits while RUNNING within flap_window_s before FATAL
    flap_window_s: float = 60.0
    stop_grace_s: float = 3.0      #: SIGTERM, then SIGKILL this much later
    heartbeat_timeout_s: float | None = None   #: silent this long while RUNNING: UNRESPONSIVE (None: no liveness check)
    first_beat_timeout_s: float = 10.0         #: no first beat this long after the spawn: UNRESPONSIVE


@dataclass(frozen=True)
class Spawn:
    """Start the child's process now."""


@dataclass(frozen=True)
class Kill:
    """The stop grace is over: SIGKILL the child."""


@dataclass(frozen=True)
class Terminate:
    """Send SIGTERM."""


@dataclass(frozen=True)
class Restarting:
    """The child exited and will be spawned again at ``at`` (report it)."""
    code: int
    at: float
    during_start: bool


@dataclass(frozen=True)
class Unresponsive:
    """No heartbeat for ``silent_s`` (``during_start``: never one since the spawn): report it and
    SIGKILL the child; its exit restarts it."""
    silent_s: float
    during_start: bool


@dataclass(frozen=True)
class GaveUp:
    """The child is FATAL: ``reason`` says why (the engine stops)."""
    reason: str


Action = Spawn | Kill | Terminate | Restarting | Unresponsive | GaveUp


@dataclass
class ChildMachine:
    """One child's state; ``now`` is monotonic seconds, passed in by the supervisor."""
    name: str
    policy: Policy = field(default_factory=Policy)
    state: ChildState = ChildState.STOPPED
    started_at: float = 0.0
    restart_at: float | None = None
    kill_at: float | None = None
    failed_starts: int = 0
    restarts: int = 0                  #: spawns after the first
    exits: list[float] = field(default_factory=list)   #: exits while RUNNING, within the flap window
    exit_code: int | None = None
    last_beat_at: float = 0.0          #: the latest heartbeat (the spawn until the first)
    beats: int = 0                     #: heartbeats of the current process
    hung_in: ChildState | None = None  #: the state it was in when found UNRESPONSIVE

    def _go(self, event: str, new: ChildState) -> None:
        allowed = TRANSITIONS.get((self.state, event))
        if allowed is None or new not in allowed:
            raise ChildStateError(f"child {self.name}: {event!r} is not allowed in state {self.state.value}"
                                  f" (to {new.value})")
        self.state = new

    def check(self, event: str) -> None:
        """Raise :class:`ChildStateError` if ``event`` is not allowed now (changes nothing)."""
        if (self.state, event) not in TRANSITIONS:
            raise ChildStateError(f"child {self.name}: {event!r} is not allowed in state {self.state.value}")

    def spawned(self, now: float) -> None:
        """The supervisor has just started the process."""
        self.check("spawned")
        if self.state is S.BACKOFF:
            self.restarts += 1
        self._go("spawned", S.STARTING)
        self.started_at = now
        self.restart_at = None
        self.exit_code = None
        self.last_beat_at = now
        self.beats = 0
        self.hung_in = None

    def beat(self, now: float) -> None:
        """The child said it is alive (one or more heartbeats read since the last call); only
        while its process may exist (``alive_states``)."""
        self.check("beat")
        if self.state in (S.STARTING, S.RUNNING):
            self.last_beat_at = now
            self.beats += 1

    def exited(self, code: int, now: float, message: str | None = None) -> Action | None:
        """The process has exited with ``code`` (negative: killed by that signal)."""
        self.check("exited")
        self.exit_code = code
        if self.state is S.STOPPING:
            self._go("exited", S.EXITED)
            self.kill_at = None
            return None
        what = f"{self.name} exited with code {code}" + (f": {message}" if message else "")
        if code == EXIT_DEVICE_FAILED:
            self._go("exited", S.FATAL)
            return GaveUp(message or f"{self.name} could not open its device (exit code {code})")
        p = self.policy
        was = self.hung_in if self.state is S.UNRESPONSIVE else self.state
        if was is S.STARTING:
            tries = self.failed_starts + 1
            if tries >= p.startretries:
                self._go("exited", S.FATAL)
                self.failed_starts = tries
                how = (f"did not answer (no heartbeat) within {p.first_beat_timeout_s:g} s of its start"
                       if self.hung_in is S.STARTING else f"did not stay up {p.startsecs:g} s")
                return GaveUp(f"{what}; it {how} in {tries} tries")
            self._go("exited", S.BACKOFF)
            self.failed_starts = tries
            self.restart_at = now + p.backoff_s * tries
            return Restarting(code, self.restart_at, during_start=True)
        exits = [t for t in self.exits if now - t < p.flap_window_s] + [now]
        if len(exits) > p.max_restarts:
            self._go("exited", S.FATAL)
            self.exits = exits
            return GaveUp(f"{what}; it exited {len(exits)} times in {p.flap_window_s:g} s")
        self._go("exited", S.BACKOFF)
        self.exits = exits
        self.restart_at = now + min(p.max_restart_delay_s, p.restart_delay_s * 2 ** (len(exits) - 1))
        return Restarting(code, self.restart_at, during_start=False)

    def tick(self, now: float) -> Action | None:
        """Time passes: STARTING becomes RUNNING after startsecs (and a first beat, with
        heartbeats), a silent child becomes UNRESPONSIVE, BACKOFF asks for a spawn when due,
        STOPPING asks for SIGKILL after the grace."""
        if self.state is S.STOPPED:
            return None
        self.check("tick")
        p = self.policy
        if self.state in (S.STARTING, S.RUNNING) and p.heartbeat_timeout_s is not None:
            first = self.beats == 0
            silent_s = now - self.last_beat_at
            if silent_s > (p.first_beat_timeout_s if first else p.heartbeat_timeout_s):
                was = self.state
                self._go("tick", S.UNRESPONSIVE)
                self.hung_in = was
                return Unresponsive(silent_s, during_start=was is S.STARTING)
        if self.state is S.STARTING and now - self.started_at >= p.startsecs and (
                p.heartbeat_timeout_s is None or self.beats > 0):
            self._go("tick", S.RUNNING)
            self.failed_starts = 0
        elif self.state is S.BACKOFF and self.restart_at is not None and now >= self.restart_at:
            return Spawn()
        elif self.state is S.STOPPING and self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            return Kill()
        return None

    def stop(self, now: float) -> Action | None:
        """Stop requested: terminate what runs; a child in BACKOFF is simply not restarted."""
        self.check("stop")
        if self.state in (S.STARTING, S.RUNNING):
            self._go("stop", S.STOPPING)
            self.kill_at = now + self.policy.stop_grace_s
            return Terminate()
        if self.state is S.UNRESPONSIVE:
            self._go("stop", S.STOPPING)
            self.kill_at = now   # SIGKILL again at the next tick: a hung process does not act on SIGTERM
            return None
        if self.state in (S.STOPPED, S.BACKOFF):
            self._go("stop", S.EXITED)
            self.restart_at = None
        return None

    @property
    def alive_states(self) -> bool:
        """True while a process may exist (the supervisor must reap it)."""
        return self.state in (S.STARTING, S.RUNNING, S.UNRESPONSIVE, S.STOPPING)
