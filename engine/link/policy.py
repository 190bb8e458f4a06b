"""The API link's policy, with no I/O: when to open a socket, what a close means, which failures
are fatal, how long to back off, when to recycle a session.

The shell (:mod:`engine.link.shell`) owns the socket. It tells the policy what happened (the
methods below: ``start``, ``opened``, ``failed``, ``closed``, ``due``, ``tick``, ``recycle``,
``stop``) and carries out the actions they return, in order. Times are monotonic seconds,
passed in.

Rules:

1. The first socket of a link with no session before it (``resumed`` false: a fresh ``engine
   start``, a new phone call) gets one try. Any failure is FATAL at once and names the URL and
   the cause: a refused key, an HTTP status, a closed port, a host name that does not resolve, a
   TLS failure, a malformed URL, a timeout. Reaching the host (resolve, TCP, TLS) may take
   :data:`FIRST_REACH_TIMEOUT_S`, so a wrong URL or a server that is not there ends ``engine
   start`` within 5 s with one error; the upgrade's answer may take :data:`OPEN_TIMEOUT_S` (a
   server that accepted the connection but is still starting, as the local server's child may
   be, is waited for).
2. A refused key (HTTP 401 or 403) is FATAL whenever it comes: retrying cannot fix it.
3. Once a session has existed (a socket of this link opened, or ``resumed``: the host took over a
   predecessor's conversation), a drop or a failed connect is retried: the n-th try in a row
   waits ``backoff_s[n]`` (0, 0.2, 0.5, 1, 2, 4, 8 s, then 8 s), each with
   :data:`OPEN_TIMEOUT_S`. After ``max_tries`` failed tries in a row it is FATAL
   (``gave_up``). A socket that opens resets the count. Each failed try is reported
   (``engine.error`` ``connect_failed``, not fatal), a drop as ``engine.status`` ``reconnecting``.
4. A close becomes the core's ``Disconnected(code, reason)``: the close frame's code and reason;
   with no close frame, 1006 and "connection lost without a close frame" (or the transport's
   own words).
5. A close with code 4000, or a core that refused the peer's protocol (it spoke the retired beta
   protocol), is FATAL (``protocol_refused``): another socket would hear the same.
6. Recycling: a socket open for ``recycle_after_s`` is closed cleanly (1000) at the first quiet
   moment (the core at a turn boundary), checked at that age and every
   :data:`RECYCLE_CHECK_S` after. A core may ask for it sooner (``Reconnect``), e.g. before its
   session's own expiry. The new socket opens at once, with reason ``recycle``; a recycle is not
   reported as an outage.
7. A stop ends the link from any state; a socket that opens after it is closed, and nothing is
   opened again. FATAL and STOPPED are final.
8. Every transition is in :data:`TRANSITIONS`; an event the state does not allow raises
   :class:`LinkStateError` and changes nothing. A handler computes first and changes state last.

The state machine::

    IDLE --start--> CONNECTING --opened--> OPEN --tick/recycle--> RECYCLING
                     |    ^                 |                       |
                     |    |   (first retry  |--closed--+            |--closed--> CONNECTING (at once)
               failed|    |    at once)     |          v
                     v    +-----due----- BACKOFF <-- (later retries)
                   FATAL (rules 1, 2, 3's limit, 5)            any --stop--> STOPPED
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.errors import EngineError
from engine.realtime.records import Connected, Disconnected, Publish

#: the first socket's way to the host (resolve, TCP, TLS, a proxy): rule 1. With the engine's own
#: start-up before it, a backend that cannot be reached ends ``engine start`` within 5 s
FIRST_REACH_TIMEOUT_S = 3.0
#: any socket's whole opening, the HTTP upgrade's answer included; a later socket's way to the host
OPEN_TIMEOUT_S = 10.0
#: the wait before the n-th try in a row after a drop (the last one repeats): rule 3
BACKOFF_S = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
#: failed tries in a row before the link gives up (about 100 s of outage with BACKOFF_S)
MAX_TRIES = 18
#: the Realtime API closes a session after 60 minutes (code 1001): recycle before, when quiet
SESSION_RECYCLE_S = 55 * 60.0
#: a recycle that is due waits for a quiet moment, looked for this often
RECYCLE_CHECK_S = 0.5
#: HTTP statuses at the handshake that mean the key was refused (rule 2)
KEY_REFUSED_STATUSES = frozenset({401, 403})
#: a close code that means the peer refuses this protocol (rule 5)
PROTOCOL_REFUSED_CODE = 4000
NO_CLOSE_FRAME = 1006


class LinkState(str, enum.Enum):
    IDLE = "idle"               # not started
    CONNECTING = "connecting"   # a socket is being opened
    OPEN = "open"               # a socket is up; the core has had Connected
    RECYCLING = "recycling"     # a clean close was asked for (rule 6); its close is coming
    BACKOFF = "backoff"         # waiting before the next try (rule 3)
    FATAL = "fatal"             # given up: the host reports it and ends (the engine, the call)
    STOPPED = "stopped"         # ended on request


S = LinkState
#: (state, event) -> the states it may go to
TRANSITIONS: dict[tuple[LinkState, str], frozenset[LinkState]] = {
    (S.IDLE, "start"): frozenset({S.CONNECTING}),
    (S.CONNECTING, "opened"): frozenset({S.OPEN}),
    (S.CONNECTING, "failed"): frozenset({S.BACKOFF, S.CONNECTING, S.FATAL}),
    (S.BACKOFF, "due"): frozenset({S.CONNECTING}),
    (S.OPEN, "closed"): frozenset({S.CONNECTING, S.BACKOFF, S.FATAL}),
    (S.OPEN, "tick"): frozenset({S.OPEN, S.RECYCLING}),
    (S.OPEN, "recycle"): frozenset({S.RECYCLING}),
    (S.RECYCLING, "closed"): frozenset({S.CONNECTING, S.FATAL}),
    (S.RECYCLING, "tick"): frozenset({S.RECYCLING}),
    (S.RECYCLING, "recycle"): frozenset({S.RECYCLING}),
    # a stop, and what still comes in after it: the socket's close, a connect that was in flight
    **{(s, "stop"): frozenset({S.STOPPED}) for s in (S.IDLE, S.CONNECTING, S.OPEN, S.RECYCLING, S.BACKOFF,
                                                      S.STOPPED)},
    (S.FATAL, "stop"): frozenset({S.FATAL}),
    (S.STOPPED, "opened"): frozenset({S.STOPPED}),
    (S.STOPPED, "failed"): frozenset({S.STOPPED}),
    (S.STOPPED, "closed"): frozenset({S.STOPPED}),
    (S.STOPPED, "due"): frozenset({S.STOPPED}),
    **{(s, "tick"): frozenset({s}) for s in (S.IDLE, S.CONNECTING, S.BACKOFF, S.FATAL, S.STOPPED)},
}


class LinkStateError(EngineError):
    """An event the link's current state does not allow (a bug in the shell)."""


# ------------------------------------------------------------------ what went wrong at a connect
class Cause(str, enum.Enum):
    """Why a socket could not be opened (the shell classifies its library's exceptions)."""
    HTTP = "http"               # the server answered the upgrade with an HTTP status
    REFUSED = "refused"         # nothing listens on that port
    DNS = "dns"                 # the host name does not resolve
    TLS = "tls"                 # the TLS handshake failed (certificate, protocol)
    TIMEOUT = "timeout"         # no answer within the open timeout
    BAD_URL = "bad_url"         # the URL is not a ws:// or wss:// URL
    HANDSHAKE = "handshake"     # something answered, but not a WebSocket server
    NETWORK = "network"         # any other socket error (unreachable network, reset)


@dataclass(frozen=True)
class ConnectFailure:
    cause: Cause
    detail: str = ""            #: the library's own words
    status: int | None = None   #: the HTTP status (cause HTTP)

    @property
    def key_refused(self) -> bool:
        return self.cause is Cause.HTTP and self.status in KEY_REFUSED_STATUSES

    def describe(self) -> str:
        """The cause in a few words, then the library's, for an error message."""
        words = {
            Cause.HTTP: f"the server answered HTTP {self.status}",
            Cause.REFUSED: "connection refused (nothing listens on that port)",
            Cause.DNS: "cannot resolve the host name",
            Cause.TLS: "the TLS handshake failed",
            Cause.TIMEOUT: "timed out",
            Cause.BAD_URL: "not a valid ws:// or wss:// URL",
            Cause.HANDSHAKE: "it does not speak WebSocket there",
            Cause.NETWORK: "network error",
        }[self.cause]
        return f"{words} ({self.detail})" if self.detail else words


# ------------------------------------------------------------------ actions
@dataclass(frozen=True)
class Connect:
    """Open a socket now: reach the host within ``reach_timeout_s`` (resolve, TCP, TLS) and have
    the upgrade answered within ``open_timeout_s`` of the start; then ``opened`` or ``failed``."""
    reach_timeout_s: float
    open_timeout_s: float = 10.0


@dataclass(frozen=True)
class Wait:
    """Wait until ``until_s``, then ``due``."""
    until_s: float


@dataclass(frozen=True)
class ToCore:
    """Hand this record to the protocol core (and apply what it decides) before anything else."""
    record: Connected | Disconnected


@dataclass(frozen=True)
class Close:
    """Close the socket cleanly with this code and reason; its close comes back as ``closed``."""
    code: int
    reason: str


@dataclass(frozen=True)
class Fatal:
    """The link is over: the host reports ``message`` (naming the URL and the cause) and ends."""
    code: str          #: auth_refused, unreachable, gave_up, protocol_refused
    message: str


LinkAction = Connect | Wait | ToCore | Close | Fatal | Publish


@dataclass(frozen=True)
class LinkRules:
    """One link's settings. ``url`` is named in errors (give it without the query string)."""
    url: str
    key_env: str = "OPENAI_API_KEY"     #: named when the key is refused
    hint: str = ""                      #: what to do when the first socket cannot be opened (rule 1)
    resumed: bool = False               #: a session existed before this link (rule 3 from its first try)
    recycle_after_s: float = SESSION_RECYCLE_S
    max_tries: int = MAX_TRIES
    backoff_s: tuple[float, ...] = BACKOFF_S


class LinkPolicy:
    """One link's state (see the module's rules). Each event method returns the actions to carry
    out, in order."""

    def __init__(self, rules: LinkRules) -> None:
        self.rules = rules
        self.state = S.IDLE
        self.had_session = rules.resumed     #: rule 3 applies (a socket opened, or resumed)
        self.opened_at_s: float | None = None
        self.tries = 0                       #: failed tries since the last socket opened
        self.next_reason = "restart" if rules.resumed else "start"
        self.recycle_check_s: float | None = None   #: when ``tick`` is next due (None: no recycle pending)
        self.last_failure: str = ""

    # ------------------------------------------------------------ the table
    def _go(self, event: str, new: LinkState) -> None:
        allowed = TRANSITIONS.get((self.state, event))
        if allowed is None or new not in allowed:
            raise LinkStateError(f"link: {event!r} is not allowed in state {self.state.value}"
                                 + (f" (to {new.value})" if allowed else ""))
        self.state = new

    def _check(self, event: str) -> None:
        if (self.state, event) not in TRANSITIONS:
            raise LinkStateError(f"link: {event!r} is not allowed in state {self.state.value}")

    @property
    def final(self) -> bool:
        return self.state in (S.FATAL, S.STOPPED)

    # ------------------------------------------------------------ events
    def start(self, now_s: float) -> list[LinkAction]:
        self._check("start")
        acts: list[LinkAction] = [self._connect() if self.had_session else Connect(FIRST_REACH_TIMEOUT_S, OPEN_TIMEOUT_S)]
        self._go("start", S.CONNECTING)
        return acts

    def opened(self, now_s: float) -> list[LinkAction]:
        """The socket is up: the core gets ``Connected`` first (its replay precedes anything else)."""
        self._check("opened")
        if self.state is S.STOPPED:
            return [Close(1000, "stopping")]
        record = Connected(reconnect=self.had_session, reason=self.next_reason)
        self.had_session, self.tries, self.opened_at_s = True, 0, now_s
        self.recycle_check_s = now_s + self.rules.recycle_after_s
        self._go("opened", S.OPEN)
        return [ToCore(record)]

    def failed(self, failure: ConnectFailure, now_s: float) -> list[LinkAction]:
        """The socket could not be opened."""
        self._check("failed")
        if self.state is S.STOPPED:
            return []
        url, cause = self.rules.url, failure.describe()
        if failure.key_refused:
            self._go("failed", S.FATAL)
            return [Fatal("auth_refused", f"the API refused the credentials (HTTP {failure.status}) at {url}: "
                                          f"check ${self.rules.key_env}, or run without a key: "
                                          "engine start --backend local")]
        if not self.had_session:
            self._go("failed", S.FATAL)
            return [Fatal("unreachable", f"cannot reach the API at {url}: {cause}"
                                         + (f"; {self.rules.hint}" if self.rules.hint else ""))]
        tries = self.tries + 1
        if tries >= self.rules.max_tries:
            self._go("failed", S.FATAL)
            return [Fatal("gave_up", f"could not reconnect to the API at {url} after {tries} tries "
                                     f"(the last: {cause}); giving up")]
        report = Publish("engine.error", {"source": "socket", "code": "connect_failed", "first_try": tries == 1,
                                          "tries": tries, "message": f"cannot reach the API at {url}: {cause}"
                                          + ("; retrying with backoff" if tries == 1 else "")})
        acts: list[LinkAction] = [report, *self._retry(tries, now_s, "failed")]
        self.tries, self.last_failure = tries, cause
        return acts

    def closed(self, code: int | None, reason: str, now_s: float, protocol_refused: bool = False) -> list[LinkAction]:
        """The socket closed (``code`` None: no close frame). ``protocol_refused``: the core
        refused the peer's protocol (rule 5)."""
        self._check("closed")
        if code is None:
            code, reason = NO_CLOSE_FRAME, reason or "connection lost without a close frame"
        record = ToCore(Disconnected(code, reason))
        if self.state is S.STOPPED:
            return [record]
        if protocol_refused or code == PROTOCOL_REFUSED_CODE:
            self._go("closed", S.FATAL)
            return [record, Fatal("protocol_refused", f"the API at {self.rules.url} refused the protocol "
                                                      f"(close {code}{': ' + reason if reason else ''}); "
                                                      "not reconnecting")]
        recycling = self.state is S.RECYCLING
        self.opened_at_s, self.recycle_check_s = None, None
        if recycling:
            self.next_reason = "recycle"
            self._go("closed", S.CONNECTING)
            return [record, self._connect()]
        self.next_reason = "reconnect"
        acts: list[LinkAction] = [record, Publish("engine.status", {"state": "reconnecting", "close_code": code})]
        return acts + self._retry(0, now_s, "closed")

    @staticmethod
    def _connect() -> Connect:
        return Connect(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S)

    def _retry(self, tries: int, now_s: float, event: str) -> list[LinkAction]:
        """The next try after ``tries`` failed ones in a row: at once, or after its backoff."""
        delays = self.rules.backoff_s
        delay = delays[min(tries, len(delays) - 1)]
        if delay <= 0:
            self._go(event, S.CONNECTING)
            return [self._connect()]
        self._go(event, S.BACKOFF)
        return [Wait(now_s + delay)]

    def due(self, now_s: float) -> list[LinkAction]:
        """The backoff's wait is over."""
        self._check("due")
        if self.state is S.STOPPED:
            return []
        self._go("due", S.CONNECTING)
        return [self._connect()]

    def tick(self, now_s: float, quiet: bool) -> list[LinkAction]:
        """A recycle check (at ``recycle_check_s``); ``quiet``: the core is at a turn boundary."""
        self._check("tick")
        if self.state is not S.OPEN or self.recycle_check_s is None or now_s < self.recycle_check_s:
            return []
        if not quiet:
            self.recycle_check_s = now_s + RECYCLE_CHECK_S
            return []
        return self.recycle(now_s, "session age")

    def recycle(self, now_s: float, reason: str) -> list[LinkAction]:
        """Renew the session now (a core's ``Reconnect``, or a due recycle at a quiet moment)."""
        self._check("recycle")
        if self.state is S.RECYCLING:
            return []
        self.recycle_check_s = None
        self._go("recycle", S.RECYCLING)
        return [Close(1000, f"session recycle: {reason}")]

    def stop(self) -> list[LinkAction]:
        """End the link; an open socket is closed (its close still comes back as ``closed``)."""
        self._check("stop")
        was_open = self.state in (S.OPEN, S.RECYCLING)
        self.recycle_check_s = None
        self._go("stop", S.FATAL if self.state is S.FATAL else S.STOPPED)
        return [Close(1000, "stopping")] if was_open else []
