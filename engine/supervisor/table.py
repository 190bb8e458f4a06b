"""The supervisor's process table: one :class:`Child` per process it runs, how one is started
(:func:`launch`), and which child a bus message came from.

Rules:

* A child's life is its machine (:mod:`engine.supervisor.children`); :func:`launch` does the
  spawn the machine asked for and tells it (``spawned``), nothing else.
* A launched child gets its spec as one JSON line on stdin (engine/specs.py ``encode``) and the
  pipe stays open: its end of file tells the child the supervisor is gone (engine/child.py).
  The kernel sends it ``death_signal`` if the supervisor dies (PR_SET_PDEATHSIG, set between
  fork and exec).
* With a heartbeat timeout, a ``python -m MODULE`` child runs under
  ``python -m engine.supervisor.heartbeat MODULE`` and beats on a pipe of its own.
* A message is the engine's own (:func:`from_engine`) only if its publisher name carries the pid
  of the latest run of one of the children, under that child's name.
"""
from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from bus.runtime import proc_start_ticks
from engine.child import parent_death_signal
from engine.specs import ChildSpec, encode
from engine.supervisor.children import ChildMachine, Policy
from engine.supervisor.heartbeat import HeartbeatPipe, period_for


@dataclass
class Child:
    name: str
    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    stdout: Any = None
    spec: ChildSpec | None = None        #: written to the child's stdin (engine/specs.py encode, engine.child.main)
    death_signal: int = signal.SIGTERM   #: what the kernel sends it when the supervisor dies
    policy: Policy = field(default_factory=Policy)
    proc: subprocess.Popen[bytes] | None = None
    start_ticks: int | None = None
    last_error: str | None = None        #: the latest engine.error message it published
    heartbeat: HeartbeatPipe | None = None   #: the current process's heartbeat pipe (liveness)
    unresponsive: int = 0                #: times it was found silent and killed
    machine: ChildMachine = field(init=False)

    def __post_init__(self) -> None:
        self.machine = ChildMachine(self.name, self.policy)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def state(self) -> str:
        return self.machine.state.value


def launch(child: Child, env: dict[str, str], heartbeat_timeout_s: float | None) -> None:
    """Start ``child`` (again) with ``env``: its spec on stdin, a heartbeat pipe when
    ``heartbeat_timeout_s`` is set, and its machine told it was spawned. ``env`` is changed."""
    if child.proc is not None and child.proc.stdin is not None:
        child.proc.stdin.close()  # the previous run's pipe
    death_signal = child.death_signal
    # a broker started again takes its subscribers before its publishers' queued messages
    argv = child.argv + ["--restart"] if child.name == "broker" and child.proc is not None else child.argv
    pass_fds = child.pass_fds
    if child.heartbeat is not None:
        child.heartbeat.close()   # the previous run's
        child.heartbeat = None
    if heartbeat_timeout_s is not None and argv[1:2] == ["-m"]:
        # `python -m engine.supervisor.heartbeat MODULE ...`: beats on the pipe, then runs MODULE
        child.heartbeat = HeartbeatPipe(period_for(heartbeat_timeout_s))
        env.update(child.heartbeat.environment())
        pass_fds = (*pass_fds, child.heartbeat.child_fd)
        argv = [argv[0], "-m", "engine.supervisor.heartbeat", *argv[2:]]
    try:
        child.proc = subprocess.Popen(argv, pass_fds=pass_fds, env=env,
                                      stdin=subprocess.PIPE if child.spec is not None else subprocess.DEVNULL,
                                      stdout=child.stdout, start_new_session=True,   # a terminal's signals: the supervisor's
                                      preexec_fn=lambda: parent_death_signal(death_signal))
    finally:
        if child.heartbeat is not None:
            child.heartbeat.child_started()   # the child has its copy (or never will)
    child.start_ticks = proc_start_ticks(child.proc.pid)
    child.last_error = None
    child.machine.spawned(time.monotonic())
    if child.spec is not None and child.proc.stdin is not None:
        try:  # one line; the pipe stays open: its end of file tells the child the supervisor is gone
            child.proc.stdin.write(encode(child.spec))
            child.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died at once: reaped as an exit


def child_of(children: list[Child], body: dict[str, Any]) -> Child | None:
    """The child whose current run published ``body`` (by the pid in its publisher name)."""
    pub = body.get("pub")
    if not isinstance(pub, str):
        return None
    pid = pub.rpartition(":")[2]
    return next((c for c in children if str(c.pid) == pid), None)


def from_engine(children: list[Child], body: dict[str, Any]) -> bool:
    """True if ``body`` was published by one of this engine's own child processes (state and
    fatal errors are accepted only from them): the publisher name against the children's
    live pids. The bus's signature check (bus/security.py) has already dropped a forged
    message on a signed topic; this one says which child sent it, and that it is the child's
    latest run, and it is the only check on a topic that is not signed (``phone.status``)."""
    pub = body.get("pub")
    if not isinstance(pub, str) or ":" not in pub:
        return False
    name, _, pid = pub.rpartition(":")
    own = {str(c.pid) for c in children if c.pid is not None}  # (the latest run of each child)
    return pid in own and name.split("-")[0] in {c.name for c in children}


def status_rows(children: list[Child], now: float) -> list[dict[str, Any]]:
    """The children as ``engine.status`` and engine.json list them."""
    return [{"name": c.name, "pid": c.pid, "start_ticks": c.start_ticks, "state": c.state,
             "restarts": c.machine.restarts, "exit_code": c.machine.exit_code,
             "uptime_s": round(now - c.machine.started_at, 1) if c.machine.alive_states else None,
             "silent_s": round(now - c.machine.last_beat_at, 1)
             if c.heartbeat is not None and c.machine.alive_states else None,
             "unresponsive": c.unresponsive}
            for c in children]
