"""Bus access control: CURVE keys for the TCP transport, HMAC signatures for control topics.

Rules (docs/bus-protocol.md, "Transport security" and "Signed control messages"):

- IPC needs no keys: its sockets sit in the 0700 runtime directory.
- TCP: the broker's XSUB and XPUB are CURVE servers with the engine's server key pair
  (made per engine by :func:`generate_keys`); a ZAP handler accepts only the engine's client
  public key. Clients set the server public key and the client key pair (from the connection
  file, mode 0600, or from the process environment). A client without them gets nothing and
  delivers nothing.
- Signing: a message on a signed topic (:data:`SIGNED_TOPICS`, prefix match) is three frames,
  ``[topic, body, signature]``, with ``signature`` the lowercase hex HMAC-SHA256, under the
  engine's signing key, of ``len(topic) as 2 bytes big-endian || topic || body`` (Jupyter's
  scheme, with the length so no bytes can move between topic and body). Readers that take
  frames 0 and 1 keep working. A verifying subscriber drops an unsigned or badly signed
  message on a signed topic.
- Replay (:class:`ReplayGuard`): the signature covers the body's header, so its publisher
  name (``pub``, which holds the process id: a restarted child has a new one), ``seq`` and
  ``mono_ns`` cannot be changed. A verifying subscriber takes a signed message only if its
  ``(mono_ns, seq)`` is later than that of the last one it took from the same publisher (per
  publisher and topic for the last-value topics, which the broker legitimately sends again
  to late subscribers); the first signed message it sees from a publisher must be at most
  :data:`REPLAY_WINDOW_NS` old, unless it is a last-value topic. A copy of the last state
  message it took is dropped quietly (the broker's replay for another subscriber); any other
  repeat or stale message is dropped and counted as malformed ("replayed control message").
- Secrets come from arguments or from ``REALTALK_BUS_KEYS`` in the process environment (JSON,
  for the broker: :meth:`BusKeys.environment`) or a child's spec (``bus.signing_key`` hex and
  the ``curve_*`` keys, given to ``bus.use_keys``); never from a file, never on the bus. The
  signing key and the server secret are never in the connection file.

Pure functions and data, no sockets, except :func:`apply_client_curve`,
:func:`apply_server_curve` and :func:`start_authenticator`, which configure given sockets.
"""
from __future__ import annotations

import enum
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import zmq

from bus.wire import LAST_VALUE_TOPICS, BusError

#: topics only the engine's own processes may publish: signed by them, verified by them
SIGNED_TOPICS: tuple[str, ...] = ("engine.status", "engine.error", "playback.", "capture.", "session.config",
                                  "engine.presence.gone", "engine.tools", "conversation.history", "intake.")
#: the environment variable holding the keys of an engine's child process (JSON)
ENV_KEYS = "REALTALK_BUS_KEYS"
#: the malformed-message reason of a dropped control message
FORGED_REASON = "forged or unsigned control message"
#: the malformed-message reason of a signed message taken before (or too old to be new)
REPLAYED_REASON = "replayed control message"
SIGNATURE_HEX_BYTES = 64
#: the first signed message a reader sees from a publisher is taken only if it is at most this
#: old (its ``mono_ns`` against this machine's CLOCK_MONOTONIC; the engine's processes share it)
REPLAY_WINDOW_NS = 10_000_000_000
#: publishers (and publisher-topic pairs) a ReplayGuard remembers at most; the oldest is forgotten
MAX_GUARDED_SENDERS = 4096
_SIGNING_KEY_BYTES = 32


@dataclass(frozen=True)
class CurveClientKeys:
    """What a client needs to connect over TCP: the broker's public key and its own key pair (Z85)."""
    server_public: bytes
    public: bytes
    secret: bytes


@dataclass(frozen=True)
class BusKeys:
    """An engine's bus secrets: a signing key (raw bytes) and CURVE server and client key pairs (Z85)."""
    signing_key: bytes
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def client(self) -> CurveClientKeys:
        return CurveClientKeys(self.server_public, self.client_public, self.client_secret)

    def connection_keys(self) -> dict[str, str]:
        """The keys for the connection file (0600): CURVE client keys only, no signing key."""
        return {"curve_server_key": self.server_public.decode(), "curve_public_key": self.client_public.decode(),
                "curve_secret_key": self.client_secret.decode()}

    def environment(self, *, broker: bool = False) -> dict[str, str]:
        """``{REALTALK_BUS_KEYS: json}`` for a child process's environment; the broker also gets
        the server secret."""
        keys: dict[str, str] = {"signing_key": self.signing_key.hex(), **self.connection_keys()}
        if broker:
            keys["curve_server_secret"] = self.server_secret.decode()
        return {ENV_KEYS: json.dumps(keys)}


def generate_keys(signing_key: bytes | None = None) -> BusKeys:
    """Fresh keys for one engine: a 32-byte signing key (or the one given) and two CURVE key pairs."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return BusKeys(signing_key or os.urandom(_SIGNING_KEY_BYTES), server_public, server_secret,
                   client_public, client_secret)


def parse_signing_key(value: str | bytes | None) -> bytes | None:
    """A signing key from its hex form (spec, environment) or as raw bytes; None stays None."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise BusError("bus signing_key is not hex; pass the key the supervisor generated") from None
    if not key:
        raise BusError("bus signing_key is empty; pass the key the supervisor generated")
    return key


def curve_from(data: Mapping[str, Any]) -> CurveClientKeys | None:
    """CURVE client keys from a connection file's or a spec's keys, or None if it has none."""
    names = ("curve_server_key", "curve_public_key", "curve_secret_key")
    present = [n for n in names if data.get(n)]
    if not present:
        return None
    if len(present) != len(names):
        missing = ", ".join(n for n in names if n not in present)
        raise BusError(f"bus keys lack {missing}; restart the engine to write a complete connection file")
    return CurveClientKeys(*(str(data[n]).encode() for n in names))


def environment_keys() -> dict[str, Any]:
    """This process's keys from ``REALTALK_BUS_KEYS`` (empty if unset)."""
    raw = os.environ.get(ENV_KEYS)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise BusError(f"${ENV_KEYS} is not JSON; it is set by the engine's supervisor, unset it") from None
    if not isinstance(data, dict):
        raise BusError(f"${ENV_KEYS} is not a JSON object; it is set by the engine's supervisor, unset it")
    return data


def signed(topic: str, prefixes: tuple[str, ...] = SIGNED_TOPICS) -> bool:
    return topic.startswith(prefixes)


def sign(key: bytes, topic: bytes, body: bytes) -> bytes:
    """The signature frame of ``[topic, body]``: hex HMAC-SHA256 (64 ASCII bytes)."""
    return hmac.digest(key, b"".join((len(topic).to_bytes(2, "big"), topic, body)), "sha256").hex().encode()


def verify(key: bytes, topic: bytes, body: bytes, signature: bytes | None) -> bool:
    """True if ``signature`` is the signature of ``[topic, body]`` under ``key``."""
    if signature is None or len(signature) != SIGNATURE_HEX_BYTES:
        return False
    return hmac.compare_digest(sign(key, bytes(topic), bytes(body)), bytes(signature))


class Verdict(str, enum.Enum):
    """What :meth:`ReplayGuard.check` says of a verified signed message."""
    ACCEPT = "accept"          #: new: act on it
    DUPLICATE = "duplicate"    #: the very last state message taken, again (a last-value replay): drop quietly
    REPLAYED = "replayed"      #: not later than what was taken from its publisher: drop and report
    STALE = "stale"            #: the first seen from its publisher, and older than the window: drop and report
    NO_HEADER = "no_header"    #: no int ``mono_ns``/``seq`` or str ``pub`` to order it by: drop and report


class ReplayGuard:
    """Replay protection for signed messages (the rules are in this module's docstring).

    Pure; one per verifying subscriber. Give it only messages whose signature checked out, so
    nothing forged can move its marks. ``check`` remembers what it accepts."""

    def __init__(self, state_topics: tuple[str, ...] = LAST_VALUE_TOPICS,
                 window_ns: int = REPLAY_WINDOW_NS, max_senders: int = MAX_GUARDED_SENDERS) -> None:
        self._state_topics = frozenset(state_topics)
        self._window_ns = window_ns
        self._max = max_senders
        #: publisher, or (publisher, topic) for a state topic -> (mono_ns, seq) of the latest taken
        self._last: dict[str | tuple[str, str], tuple[int, int]] = {}

    def check(self, topic: str, body: Mapping[str, Any], now_ns: int) -> Verdict:
        """Whether to act on a verified signed message ``body`` on ``topic``; ``now_ns`` is
        CLOCK_MONOTONIC. Remembers the message if the verdict is ACCEPT."""
        pub, seq, mono = body.get("pub"), body.get("seq"), body.get("mono_ns")
        if not isinstance(pub, str) or type(seq) is not int or type(mono) is not int:
            return Verdict.NO_HEADER
        state = topic in self._state_topics
        key: str | tuple[str, str] = (pub, topic) if state else pub
        mark = (mono, seq)
        last = self._last.get(key)
        if last is None:
            if not state and now_ns - mono > self._window_ns:
                return Verdict.STALE
            if len(self._last) >= self._max:
                del self._last[next(iter(self._last))]  # the one first seen longest ago
        elif mark <= last:
            return Verdict.DUPLICATE if state and mark == last else Verdict.REPLAYED
        self._last[key] = mark
        return Verdict.ACCEPT


def apply_client_curve(sock: zmq.Socket, keys: CurveClientKeys) -> None:
    """Make ``sock`` a CURVE client of the broker (before it connects)."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def apply_server_curve(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    """Make ``sock`` a CURVE server (before it binds); clients are checked by the ZAP handler."""
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret


class _AllowedKeys:
    """pyzmq's credentials provider: accept only the given Z85 client keys."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, _domain: str, key: bytes) -> bool:
        return key in self.keys


def start_authenticator(context: zmq.Context, client_publics: list[bytes]) -> Any:
    """Start a ZAP handler on ``context`` that accepts only ``client_publics``; returns it
    (call ``.stop()`` when the sockets are closed)."""
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_AllowedKeys(set(client_publics)))
    return auth
