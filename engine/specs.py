"""The contract between the supervisor and its children: one frozen spec type per child, and the
table of the rings they share.

Rules:

* Each child's spec is one of the frozen dataclasses here. The supervisor builds it and
  serialises it once (:func:`encode`: one JSON line, written to the child's stdin); the child's
  entry point parses it once (:func:`parse`, called by :func:`engine.child.main`), and the
  process reads typed attributes. mypy checks every read: a misspelt field is a type error,
  not a KeyError in a child at run time.
* :func:`parse` refuses a spec with a missing field, an unknown one or a value of the wrong type
  at once, naming it (:class:`SpecError`): a spec file written by hand, or one from a supervisor
  of another version, fails before the child does anything. The ``config`` section is not
  checked again: the supervisor loaded it (engine/config.py) and its type is
  :class:`engine.config_types.Config`.
* A spec holds secrets (every spec the bus signing key, the realtime and phone specs the API
  key in their headers): it goes to the child's stdin, never to a file, a log or the bus.
* :data:`RINGS` is the engine's rings: kind -> capacity, producer, consumer, eventfd. The
  supervisor makes the rings from it (:func:`ring_kinds`); docs/architecture.md's table of
  rings is checked against it (tests/test_specs.py).

Types only and the two functions: this module imports nothing heavy, so each child's start
pays nothing for it.
"""
from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass
from typing import Any, Collection, Literal, Mapping, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from engine.config_types import Config, PhoneConfig, SipConfig
from engine.errors import EngineError
from engine.pcm import RATE_HZ

Process = Literal["capture", "playback", "realtime", "console"]


class SpecError(EngineError):
    """A child's spec cannot be parsed: a field missing, unknown or of the wrong type."""


# ---------------------------------------------------------------- the rings
@dataclass(frozen=True)
class RingLayout:
    """One kind of ring: its capacity (a power of two, in frames of the engine's PCM format), the
    process that writes it and the one that reads it, and whether its reader waits on an eventfd."""
    frames: int
    producer: Process
    consumer: Process
    eventfd: bool = False

    @property
    def seconds(self) -> float:
        return self.frames / RATE_HZ


#: the engine's rings by kind (docs/architecture.md, "Rings")
RINGS: dict[str, RingLayout] = {
    # the mic after echo handling; the realtime process's loop watches its eventfd
    "mic": RingLayout(1 << 16, "capture", "realtime", eventfd=True),            # 2.7 s
    # the model's audio and the playback control fields: the API sends faster than real time
    "speaker": RingLayout(1 << 21, "realtime", "playback"),                     # 87 s
    # every frame handed to the device: the echo canceller's far end, the recording
    "ref": RingLayout(1 << 15, "playback", "capture"),                          # 1.4 s
    # the same frames, while a console page listens
    "listen": RingLayout(1 << 15, "playback", "console"),                       # 1.4 s
    # a talking page's microphone, read by capture in place of the device's frames
    "browser": RingLayout(1 << 15, "console", "capture"),                       # 1.4 s
}


def ring_kinds(processes: Collection[Process]) -> list[str]:
    """The kinds of ring an engine running ``processes`` makes: each whose producer and consumer
    are both among them, in :data:`RINGS`' order. The console counts whether it is started or
    not (``engine console`` attaches its rings later, by the names in engine.json)."""
    return [kind for kind, r in RINGS.items() if r.producer in processes and r.consumer in processes]


# ---------------------------------------------------------------- the specs' parts
@dataclass(frozen=True, kw_only=True)
class BusSpec:
    """Where the bus is, and the keys of the engine's own processes (bus/security.py)."""
    publish: str
    subscribe: str
    signing_key: str | None = None        #: hex: signs and verifies the control topics (None: the console's)
    curve_server_key: str | None = None   #: Z85: the tcp transport's CURVE keys (None over ipc)
    curve_public_key: str | None = None
    curve_secret_key: str | None = None

    def keys(self) -> dict[str, str]:
        """The map ``bus.use_keys`` and ``bus.endpoints_from`` take: the fields that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class ApiAccess:
    """How a child signs in to the voice API (engine/providers.py)."""
    headers: tuple[str, ...] = ()         #: ``Name: value`` lines; the API key is among them (a secret)
    provider: str = "openai"              #: openai, azure, xai or local
    deployment: str | None = None         #: Azure's deployment name
    key_env: str | None = None            #: the key's variable, named in errors
    #: a spec written by hand: the variable that holds the key (the supervisor puts the key in ``headers``)
    api_key_env: str | None = None

    def key_name(self, default: str = "OPENAI_API_KEY") -> str:
        """The key's variable, for errors that tell the user what to set."""
        return self.key_env or self.api_key_env or default

    def header_map(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The headers by name; with ``api_key_env`` set in ``environ``, its key as the bearer."""
        out: dict[str, str] = {}
        for h in self.headers:
            k, _, v = h.partition(":")
            out[k.strip()] = v.strip()
        if self.api_key_env and environ.get(self.api_key_env):
            out["Authorization"] = f"Bearer {environ[self.api_key_env]}"
        return out


# ---------------------------------------------------------------- one spec per child
@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """What every child gets: the whole config (checked by the supervisor) and the bus."""
    config: Config
    bus: BusSpec


@dataclass(frozen=True, kw_only=True)
class RealtimeSpec(ChildSpec):
    """``engine.realtime.process``: the API socket, the mic ring it reads, the speaker ring it writes."""
    url: str                              #: the API socket's URL
    api: ApiAccess
    session: dict[str, Any]               #: the session.update session (engine.config.session_payload)
    speaker_ring: str | None = None
    mic_ring: str | None = None           #: None: no mic (text only)
    mic_fd: int | None = None             #: the mic ring's eventfd, inherited
    replies_dir: str | None = None        #: reply_audio: where each reply's WAV goes


@dataclass(frozen=True, kw_only=True)
class CaptureSpec(ChildSpec):
    """``engine.capture.process``: the mic (a device or a WAV file) into the mic ring."""
    mic_ring: str
    mic_fd: int | None = None             #: the mic ring's eventfd, inherited (it wakes the realtime process)
    mic_source: str | int                 #: a device name or index, or a .wav file
    speaker_ring: str | None = None
    ref_ring: str | None = None           #: what playback played: the echo canceller's far end
    speaker_is_device: bool = False       #: echo: auto cancels only a speaker device's echo
    browser_ring: str | None = None       #: the console's talking page, in place of the device
    record_path: str | None = None        #: the session recording (conversation.wav)


@dataclass(frozen=True, kw_only=True)
class PlaybackSpec(ChildSpec):
    """``engine.playback.process``: the speaker ring to a device, a WAV file or nowhere."""
    speaker_ring: str
    speaker_target: str | int             #: a device name or index, a .wav file, or "null"
    listen_ring: str | None = None        #: the console's listen copy
    ref_ring: str | None = None           #: what was played, for capture (with a mic)


@dataclass(frozen=True, kw_only=True)
class PhoneSpec(ChildSpec):
    """``engine.phone.process``: Twilio Media Streams calls, a core and an API link per call."""
    url: str                              #: the API socket's URL
    api: ApiAccess
    session: dict[str, Any]
    #: the config's phone section with the command line's host, port, path over it
    phone: PhoneConfig
    #: one of several bridge processes on one bus (bench/phone.py): commands for calls it does not
    #: hold are another process's, not refused; no status each second
    solo: bool = False


@dataclass(frozen=True, kw_only=True)
class SipSpec(ChildSpec):
    """``engine.sip.process``: OpenAI SIP webhooks and each call's control socket."""
    api: ApiAccess
    rest_base: str                        #: the API's REST base URL (accept, reject, hang up)
    ws_base: str = ""                     #: the API's socket base URL (a call's control socket)
    #: the config's sip section with the command line's host, port, path over it
    sip: SipConfig
    solo: bool = False                    #: one of several workers on one bus


@dataclass(frozen=True, kw_only=True)
class ConsoleSpec(ChildSpec):
    """``engine.console.process``: the debug console (its bus has no signing key: it publishes
    ``cmd.*`` only, and holds no secret a page could reach)."""
    host: str = "127.0.0.1"
    port: int = 0
    allowed_hosts: tuple[str, ...] = ()   #: Host headers accepted besides the loopback ones
    session_dir: str | None = None
    rings: dict[str, str] = dataclasses.field(default_factory=dict)   #: the engine's ring names by kind


# ---------------------------------------------------------------- serialise once, parse once
S = TypeVar("S", bound=ChildSpec)

#: the local server's bearer key, in its environment (``engine serve``): in argv every user sees it
SERVER_KEY_ENV = "REALTALK_SERVER_KEY"


def encode(spec: ChildSpec) -> bytes:
    """The spec as one JSON line (what the supervisor writes to the child's stdin)."""
    return json.dumps(dataclasses.asdict(spec)).encode() + b"\n"


def parse(spec_type: type[S], data: object) -> S:
    """``data`` (the decoded JSON) as a ``spec_type``; SpecError naming the first field that is
    missing, unknown or of the wrong type."""
    return _build(spec_type, data, spec_type.__name__)


def _build(cls: type[Any], data: object, where: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a map, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise SpecError(f"{where}: unknown field {', '.join(unknown)} (known: {', '.join(fields)})")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _value(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{where}: missing field {name}")
    return cls(**values)


def _value(value: object, tp: Any, where: str) -> Any:
    """``value`` as the type ``tp``: a nested spec built, a list made a tuple, a plain value
    checked; a mapping (the config and its sections, the session) is taken as it is."""
    if dataclasses.is_dataclass(tp):
        return _build(cast(type, tp), value, where)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _value(value, arg, where)
            except SpecError:
                pass
        raise SpecError(f"{where}: {value!r} is not {_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_value(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is not None:
            raise SpecError(f"{where}: {value!r} is not null")
        return None
    if tp in (str, int, bool, float):
        if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
            raise SpecError(f"{where}: {value!r} is not {tp.__name__}")
        return value
    if not isinstance(value, dict):   # the config, its sections, the session, the ring names
        raise SpecError(f"{where}: expected a map, got {type(value).__name__}")
    return value


def _name(tp: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in get_args(tp))
