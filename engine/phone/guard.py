"""The phone port's guard, pure (no I/O): who may connect, how long a connection may wait and how
fast it may talk, and how often what goes wrong is reported. The bridge (:mod:`engine.phone.bridge`)
asks it and carries out what it decides.

Rules:
- **Authentication** (``phone.auth``), checked before any API session opens:
  - ``twilio``: the WebSocket upgrade carries ``X-Twilio-Signature``, base64 HMAC-SHA1 of the
    stream URL Twilio was given (``wss://…``, query string included; a GET upgrade has no
    parameters to append), keyed with the account's auth token (from the environment, never
    config, bus or logs). As twilio-python's ``RequestValidator``, the URL is tried as given,
    without its port and with the scheme's default port (Twilio's signing is not consistent
    about ports). The URL is ``phone.public_url`` plus the request's query, or, when that is
    null, the request's ``Host`` and path under ``wss://`` and ``ws://`` (TLS ended in front).
    A bad or missing signature is refused at the upgrade: HTTP 403, no detail.
  - ``token``: a per-deployment token (from the environment) in the URL's query (``?token=``,
    checked at the upgrade: a wrong one is a 403) or, when the URL has none, in
    ``start.customParameters.token``, checked at ``start``: a missing or wrong one closes the
    socket (1008) before the API socket opens. The token is taken out of the custom parameters
    before they go anywhere. Compared in constant time.
  - ``none``: only on a loopback address (tests); anything else is a config error.
- **Admission**: ``max_calls`` is held at ``start`` (one more is closed with 1013 and its reason);
  the upgrade also answers 503 when the calls are at ``max_calls`` or as many sockets as that
  already wait for their ``start``.
- **Per connection** (:class:`ConnectionGuard`, states and transitions below): frames over
  ``max_frame_bytes`` are refused by the WebSocket layer (1009); more than ``max_messages_per_s``
  (a bucket of one second of them) closes the socket (1008); a socket that sends no ``start``
  within ``start_timeout_s`` is closed (1008), and so is one that sends nothing for
  ``idle_timeout_s`` at any time.
- **Reports** (:class:`ErrorSampler`): what goes wrong is counted, always; it is published at most
  once a second per call (and per port-wide code), with the count since the last report and
  the first example of them. The first goes out at once.

Connection states (anything else is refused with :class:`GuardError`):

    AWAITING_START --frame-->                 AWAITING_START
    AWAITING_START --start (allowed)-->       ADMITTED
    AWAITING_START --start (refused)-->       CLOSED   unauthenticated / at_capacity
    AWAITING_START/ADMITTED --frame (over the rate)--> CLOSED   rate_limited
    AWAITING_START --tick (no start in time)-->        CLOSED   start_timeout
    AWAITING_START/ADMITTED --tick (idle)-->           CLOSED   idle_timeout
    ADMITTED       --frame-->                 ADMITTED
"""
from __future__ import annotations

import base64
import enum
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from engine.sampling import REPORT_EVERY_S, ErrorSampler, Report  # noqa: F401 - the guard's reports
from engine.config import is_loopback
from engine.errors import ConfigError, EngineError

AUTH_MODES = ("twilio", "token", "none")
TOKEN_PARAMETER = "token"              #: the custom parameter / query key that carries phone.auth token's token
SIGNATURE_HEADER = "X-Twilio-Signature"

# WebSocket close codes (RFC 6455 §7.4.1)
CLOSE_POLICY = 1008                    #: unauthenticated, over the message rate, no start in time, idle
CLOSE_TOO_BIG = 1009                   #: a frame over max_frame_bytes (sent by the WebSocket layer)
CLOSE_TRY_LATER = 1013                 #: at max_calls


class GuardError(EngineError):
    """An event the connection guard does not take in its state (a bug in the caller)."""


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Limits:
    """Per-connection limits (``phone.*``)."""
    max_frame_bytes: int = 65536
    max_messages_per_s: float = 200.0
    start_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0


@dataclass(frozen=True)
class Auth:
    """How callers prove who they are. ``secret`` is the auth token (twilio) or the deployment's
    token (token); it comes from the environment and is never shown (``repr`` hides it)."""
    mode: str
    secret: str = ""
    public_url: str | None = None

    def __repr__(self) -> str:
        return f"Auth(mode={self.mode!r}, public_url={self.public_url!r})"


def auth_from_config(phone: Mapping[str, Any], environ: Mapping[str, str]) -> Auth:
    """The port's :class:`Auth` from the ``phone`` config section and the environment;
    ConfigError naming the key or the variable and what to do."""
    mode = phone.get("auth", "twilio")
    if mode not in AUTH_MODES:
        raise ConfigError(f"config key 'phone.auth': {mode!r} is not one of: {', '.join(AUTH_MODES)}")
    public_url = phone.get("public_url")
    if public_url is not None and urlsplit(str(public_url)).scheme not in ("ws", "wss"):
        raise ConfigError(f"config key 'phone.public_url': {public_url!r} is not a ws:// or wss:// URL "
                          "(the stream URL exactly as given to Twilio, e.g. wss://phone.example.com/twilio)")
    host = str(phone.get("host", "127.0.0.1"))
    if mode == "none":
        if not is_loopback(host):
            raise ConfigError(f"config key 'phone.auth': none (no authentication) is only allowed on a loopback "
                              f"address, and phone.host is {host!r}: anyone who reaches the port would open paid "
                              "API sessions; use phone.auth: twilio (the default) or token")
        return Auth("none")
    if mode == "twilio" and public_url is None and not is_loopback(host):
        raise ConfigError(f"config key 'phone.public_url' is null and phone.host is {host!r}: Twilio's signature "
                          "would be checked against the request's own Host header, so a signature Twilio made for "
                          "another application of the account would be taken here; set phone.public_url to the "
                          "stream URL exactly as given to Twilio (e.g. wss://phone.example.com/twilio)")
    env_key = "auth_token_env" if mode == "twilio" else "token_env"
    default_env = "TWILIO_AUTH_TOKEN" if mode == "twilio" else "REALTALK_PHONE_TOKEN"
    name = str(phone.get(env_key) or default_env)
    secret = environ.get(name, "")
    if not secret:
        what = "your Twilio account's auth token" if mode == "twilio" else "the deployment's phone token"
        raise ConfigError(f"phone.auth is {mode} but ${name} is empty: set it to {what} (phone.{env_key} names "
                          f"the variable){'' if mode == 'twilio' else '; give the same token to the provider'}, "
                          "or use phone.auth: none on a loopback address for tests")
    return Auth(mode, secret, str(public_url) if public_url is not None else None)


def limits_from_config(phone: Mapping[str, Any]) -> Limits:
    d = Limits()
    return Limits(max_frame_bytes=int(phone.get("max_frame_bytes", d.max_frame_bytes)),
                  max_messages_per_s=float(phone.get("max_messages_per_s", d.max_messages_per_s)),
                  start_timeout_s=float(phone.get("start_timeout_s", d.start_timeout_s)),
                  idle_timeout_s=float(phone.get("idle_timeout_s", d.idle_timeout_s)))


# ---------------------------------------------------------------- Twilio's request validation
def twilio_signature(auth_token: str, url: str) -> str:
    """``X-Twilio-Signature`` for a request to ``url`` with no POST parameters (a WebSocket
    upgrade is a GET): base64 HMAC-SHA1 of the URL, keyed with the auth token."""
    mac = hmac.new(auth_token.encode("utf-8"), url.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def url_variants(url: str) -> list[str]:
    """``url`` as given, without its port, and with the scheme's default port (443 for wss and
    https, 80 otherwise): the forms twilio-python's RequestValidator accepts."""
    parts = urlsplit(url)
    out = [url]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = userinfo + "@" if userinfo else ""
    try:
        port = parts.port
    except ValueError:
        return out
    if port is not None:
        out.append(urlunsplit(parts._replace(netloc=prefix + host)))
    else:
        default = 443 if parts.scheme in ("wss", "https") else 80
        out.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    return list(dict.fromkeys(out))


def signed_urls(public_url: str | None, host_header: str | None, target: str) -> list[str]:
    """The URLs Twilio may have signed for an upgrade to ``target`` (path and query as received):
    ``public_url`` (plus the query), or ``wss://`` and ``ws://`` with the Host header; each
    with :func:`url_variants`."""
    query = target.partition("?")[2]
    if public_url is not None:
        bases = [public_url + ("?" + query if query and "?" not in public_url else "")]
    elif host_header:
        bases = [f"{scheme}://{host_header}{target}" for scheme in ("wss", "ws")]
    else:
        return []
    return [v for base in bases for v in url_variants(base)]


def twilio_signature_ok(auth_token: str, signature: str | None, urls: list[str]) -> bool:
    """The signature matches one of ``urls`` (constant-time comparison)."""
    if not signature:
        return False
    given = signature.strip().encode("ascii", "replace")
    ok = False
    for url in urls:
        ok |= hmac.compare_digest(twilio_signature(auth_token, url).encode("ascii"), given)
    return ok


def token_ok(expected: str, given: object) -> bool:
    """A token matches (constant time); anything but a non-empty string does not."""
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


@dataclass(frozen=True)
class UpgradeVerdict:
    """What the upgrade's check decided: ``status`` None lets it through (``authenticated``: no
    token is needed at start); otherwise the HTTP status and the refusal's code."""
    status: int | None
    code: str = ""
    authenticated: bool = False


def _header(headers: Mapping[str, str], name: str) -> str | None:
    try:
        return headers.get(name)
    except LookupError:      # given more than once (websockets' Headers raises): as good as none
        return None


def check_upgrade(auth: Auth, headers: Mapping[str, str], target: str) -> UpgradeVerdict:
    """Authenticate an upgrade request (``headers``: a case-insensitive mapping; ``target``: its
    path and query). Capacity is the caller's (it knows the calls)."""
    if auth.mode == "none":
        return UpgradeVerdict(None, authenticated=True)
    if auth.mode == "twilio":
        urls = signed_urls(auth.public_url, _header(headers, "Host"), target)
        if twilio_signature_ok(auth.secret, _header(headers, SIGNATURE_HEADER), urls):
            return UpgradeVerdict(None, authenticated=True)
        return UpgradeVerdict(403, "unauthenticated")
    from urllib.parse import parse_qs
    given = parse_qs(target.partition("?")[2]).get(TOKEN_PARAMETER)
    if given is None:
        return UpgradeVerdict(None, authenticated=False)   # the token may come in start.customParameters
    if token_ok(auth.secret, given[-1]):
        return UpgradeVerdict(None, authenticated=True)
    return UpgradeVerdict(403, "unauthenticated")


# ---------------------------------------------------------------- one connection
class GuardState(enum.Enum):
    AWAITING_START = "awaiting_start"
    ADMITTED = "admitted"
    CLOSED = "closed"


@dataclass(frozen=True)
class Close:
    """Close the socket: WebSocket ``close_code`` and ``reason`` (sent to the peer), ``code`` (the
    refusal's name: counted, published, the call's end reason)."""
    code: str
    close_code: int
    reason: str


G = GuardState
#: (state, event) -> the states it may go to
TRANSITIONS: dict[tuple[GuardState, str], frozenset[GuardState]] = {
    (G.AWAITING_START, "frame"): frozenset({G.AWAITING_START, G.CLOSED}),
    (G.AWAITING_START, "start"): frozenset({G.ADMITTED, G.CLOSED}),
    (G.AWAITING_START, "tick"): frozenset({G.AWAITING_START, G.CLOSED}),
    (G.ADMITTED, "frame"): frozenset({G.ADMITTED, G.CLOSED}),
    (G.ADMITTED, "tick"): frozenset({G.ADMITTED, G.CLOSED}),
}


class ConnectionGuard:
    """One phone socket's limits. Each event returns a :class:`Close` to carry out, or None."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.state = GuardState.AWAITING_START
        self.opened_s = now
        self.last_frame_s = now
        self.burst = max(1.0, limits.max_messages_per_s)        # one second of messages
        self.tokens = self.burst
        self.refill_s = now
        self.frames = 0
        self.closed: Close | None = None

    def _move(self, event: str, to: GuardState) -> None:
        allowed = TRANSITIONS.get((self.state, event))
        if allowed is None or to not in allowed:
            raise GuardError(f"connection guard: {event!r} cannot move {self.state.value} to {to.value}")
        self.state = to

    def _close(self, event: str, close: Close) -> Close:
        self._move(event, GuardState.CLOSED)
        self.closed = close
        return close

    def frame(self, now: float) -> Close | None:
        """A frame came in (any kind): over the message rate closes the socket."""
        if self.state is GuardState.CLOSED:
            return None
        rate = self.limits.max_messages_per_s
        tokens = min(self.burst, self.tokens + (now - self.refill_s) * rate)
        if tokens < 1.0:
            return self._close("frame", Close("rate_limited", CLOSE_POLICY, f"over {rate:g} messages a second"))
        self._move("frame", self.state)
        self.tokens, self.refill_s, self.last_frame_s = tokens - 1.0, now, now
        self.frames += 1
        return None

    def start(self, authenticated: bool, calls: int, max_calls: int) -> Close | None:
        """A ``start`` came: refused if not authenticated, or if ``calls`` are at ``max_calls``."""
        if not authenticated:
            return self._close("start", Close("unauthenticated", CLOSE_POLICY, "unauthorized"))
        if calls >= max_calls:
            return self._close("start", Close("at_capacity", CLOSE_TRY_LATER, f"at capacity ({max_calls} calls)"))
        self._move("start", GuardState.ADMITTED)
        return None

    def deadline(self) -> float | None:
        """When :meth:`tick` may next close the socket (None once closed)."""
        if self.state is GuardState.CLOSED:
            return None
        idle = self.last_frame_s + self.limits.idle_timeout_s
        if self.state is GuardState.AWAITING_START:
            return min(idle, self.opened_s + self.limits.start_timeout_s)
        return idle

    def tick(self, now: float) -> Close | None:
        """Time passed: no ``start`` in time, or nothing at all for ``idle_timeout_s``."""
        if self.state is GuardState.CLOSED:
            return None
        lim = self.limits
        if self.state is GuardState.AWAITING_START and now >= self.opened_s + lim.start_timeout_s:
            return self._close("tick", Close("start_timeout", CLOSE_POLICY, f"no start within {lim.start_timeout_s:g} s"))
        if now >= self.last_frame_s + lim.idle_timeout_s:
            return self._close("tick", Close("idle_timeout", CLOSE_POLICY, f"nothing for {lim.idle_timeout_s:g} s"))
        self._move("tick", self.state)
        return None


