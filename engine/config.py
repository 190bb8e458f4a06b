"""Load and check config.yaml. The defaults here are the documented ones in config.yaml
(a test keeps them equal). Every problem raises ConfigError naming the key.

:func:`load_config` returns a :class:`engine.config_types.Config`: typed structures that mypy
checks, so ``cfg["audio"]["prebufer_ms"]`` is a type error (they are a module of their own, so
the children parse their specs without importing this loader and YAML).
"""
from __future__ import annotations

import copy
import ipaddress
import difflib
import os
from pathlib import Path
from typing import Any, cast

import yaml

from engine.config_types import Config
from engine.cost import check_priced, is_live_model
from engine.errors import ConfigError
from engine.pcm import api_format

_TD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
       "create_response": True, "interrupt_response": True}

DEFAULTS: dict[str, Any] = {
    "backend": "auto",
    "model": "gpt-realtime",
    "api_key_env": "OPENAI_API_KEY",
    "openai_url": "wss://api.openai.com/v1/realtime",
    # which service (engine/providers.py, docs/providers.md); null: as `backend` says
    "provider": None,
    "auth_header": None,
    "azure": {"endpoint": None, "deployment": None, "auth": "api-key", "api_key_env": "AZURE_OPENAI_API_KEY",
              "token_env": "AZURE_OPENAI_AD_TOKEN"},
    "xai": {"url": "wss://api.x.ai/v1/realtime", "api_key_env": "XAI_API_KEY"},
    "session": {
        "instructions": "You are a helpful, concise voice assistant.",
        "voice": "marin",
        "output_modalities": ["audio"],
        "turn_detection": dict(_TD),
        "transcription": {"model": "gpt-4o-mini-transcribe"},
        "noise_reduction": None,
        "tools": [],
        # GA session fields left to the API's default when null
        "speed": None,
        "max_output_tokens": None,
        "tool_choice": None,
        "truncation": None,
        "reasoning": None,
        "parallel_tool_calls": None,
        "include": None,
        "prompt": None,
        "tracing": None,
    },
    "audio": {"backend": "native", "mic": "default", "speaker": "default", "device_rate_hz": None, "period_ms": 20,
              "playback_period_ms": 10,
              "prebuffer_ms": 60, "jitter_buffer": "adaptive", "time_stretch": True, "echo": "auto",
              "echo_guard_db": -6.0},
    "barge_in": {"enabled": True, "min_speech_ms": 0},
    "bus": {"transport": "ipc", "tcp_host": "127.0.0.1", "tcp_publish_port": 0, "tcp_subscribe_port": 0},
    # liveness: a child silent this long (no heartbeat) is reported and restarted; null: not checked
    "supervisor": {"heartbeat_timeout_s": 3.0},
    "local_server": {"host": "127.0.0.1", "port": 0, "speed": 1.0, "scenario": None, "asr": True},
    # engine phone / engine start --phone: Twilio Media Streams calls (docs/phone.md)
    "phone": {"host": "127.0.0.1", "port": 8766, "path": "/twilio", "dtmf_to_model": "off", "mark_every_ms": 200,
              "max_calls": 100, "prebuffer_ms": None,
              # who may connect (engine/phone/guard.py): Twilio's signature, a token, or none (loopback only)
              "auth": "twilio", "auth_token_env": "TWILIO_AUTH_TOKEN", "token_env": "REALTALK_PHONE_TOKEN",
              "public_url": None,
              # per connection: frame size, message rate, time to start, time with nothing received
              "max_frame_bytes": 65536, "max_messages_per_s": 200, "start_timeout_s": 5.0, "idle_timeout_s": 60.0},
    # engine sip: OpenAI's SIP calls through signed webhooks (docs/sip.md)
    "sip": {"host": "127.0.0.1", "port": 8767, "path": "/openai/webhook", "max_calls": 100, "no_route_status": 404,
            "routes": []},
    "budget_usd": None,
    "session_recycle_s": 3300.0,
    "reply_audio": False,
    "record": None,
    "sessions_dir": None,
}

# key path -> (allowed types, allowed values or None). Paths not listed take the default's type.
_NUM = (int, float)
RULES: dict[str, tuple[tuple[type, ...], tuple[Any, ...] | None]] = {
    "backend": ((str,), ("auto", "local", "openai")),
    "provider": ((str, type(None)), (None, "openai", "azure", "xai", "local")),
    "auth_header": ((str, type(None)), None),
    "azure.endpoint": ((str, type(None)), None),
    "azure.deployment": ((str, type(None)), None),
    "azure.auth": ((str,), ("api-key", "entra")),
    "sip.no_route_status": ((int,), (404, 603)),
    "session.voice": ((str,), None),   # checked against the model's API: REALTIME_VOICES or LIVE_VOICES
    "session.output_modalities": ((list,), (["audio"], ["text"])),
    "session.turn_detection": ((dict, type(None)), None),
    "session.turn_detection.type": ((str,), ("server_vad", "semantic_vad")),
    "session.turn_detection.threshold": (_NUM, None),
    "session.turn_detection.eagerness": ((str,), ("low", "medium", "high", "auto")),
    "session.transcription": ((dict, type(None)), None),
    "session.transcription.model": ((str,), None),
    "session.transcription.language": ((str, type(None)), None),
    "session.transcription.prompt": ((str, type(None)), None),
    "session.noise_reduction": ((str, type(None)), (None, "near_field", "far_field")),
    "session.tools": ((list,), None),
    "session.speed": ((int, float, type(None)), None),
    "session.max_output_tokens": ((int, str, type(None)), None),
    "session.tool_choice": ((str, dict, type(None)), None),
    "session.truncation": ((str, dict, type(None)), None),
    "session.reasoning": ((dict, type(None)), None),
    "session.parallel_tool_calls": ((bool, type(None)), None),
    "session.include": ((list, type(None)), None),
    "session.prompt": ((dict, type(None)), None),
    "session.tracing": ((str, dict, type(None)), None),
    "session.transcription.languages": ((list, type(None)), None),
    "session.transcription.keywords": ((list, type(None)), None),
    "session.transcription.delay": ((str, type(None)), ("minimal", "low", "medium", "high", "xhigh", None)),
    "audio.backend": ((str,), ("native", "pyaudio")),
    "audio.mic": ((str, int, type(None)), None),
    "audio.speaker": ((str, int, type(None)), None),
    "audio.device_rate_hz": ((int, type(None)), None),
    "audio.period_ms": ((int,), (10, 20, 40)),
    "audio.playback_period_ms": ((int, type(None)), (None, 10, 20, 40)),
    "audio.prebuffer_ms": ((int,), None),
    "audio.jitter_buffer": ((str,), ("adaptive", "fixed")),
    "audio.echo": ((str,), ("auto", "aec", "half_duplex", "off")),
    "audio.echo_guard_db": ((int, float, type(None)), None),
    "barge_in.min_speech_ms": ((int,), None),
    "bus.transport": ((str,), ("ipc", "tcp")),
    "supervisor.heartbeat_timeout_s": ((int, float, type(None)), None),
    "local_server.speed": (_NUM, None),
    "local_server.scenario": ((str, type(None)), None),
    "phone.dtmf_to_model": ((str,), ("off", "context", "reply")),
    "phone.mark_every_ms": ((int,), None),
    "phone.max_calls": ((int,), None),
    "phone.prebuffer_ms": ((int, type(None)), None),
    "phone.auth": ((str,), ("twilio", "token", "none")),
    "phone.public_url": ((str, type(None)), None),
    "phone.max_frame_bytes": ((int,), None),
    "phone.max_messages_per_s": (_NUM, None),
    "phone.start_timeout_s": (_NUM, None),
    "phone.idle_timeout_s": (_NUM, None),
    "budget_usd": ((int, float, type(None)), None),
    "session_recycle_s": (_NUM, None),
    "record": ((str, type(None)), None),
    "sessions_dir": ((str, type(None)), None),
}
# keys whose value is a free-form mapping (not checked key by key)
_OPEN_KEYS = {"session.turn_detection": set(_TD) | {"eagerness", "idle_timeout_ms"},
              "session.transcription": {"model", "language", "prompt", "languages", "keywords", "delay"}}

#: xAI's Grok voices (case-insensitive; docs.x.ai, pipecat; more via GET /v1/tts/voices)
XAI_VOICES = ("eve", "ara", "rex", "sal", "leo")
REALTIME_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
#: openai.types.live BuiltInVoice; GPT-Live refuses fable, nova and onyx
LIVE_VOICES = ("alloy", "ash", "ballad", "beacon", "bossa", "cedar", "cinder", "coral", "delta", "echo", "gleam",
               "marin", "meridian", "quartz", "ripple", "sage", "shida", "shimmer", "stone", "tempo", "verse",
               "vesper", "willow")
#: GPT-Live is full duplex: the session keys it has no place for, and why
LIVE_UNUSED_SESSION_KEYS = {
    "turn_detection": "the model decides turns by itself (no VAD setting, no push to talk)",
    "output_modalities": "GPT-Live always speaks",
    "transcription": "transcripts of both sides always come as timed fragments",
    "noise_reduction": "GPT-Live has no such setting",
    "tools": "a delegation goes to the tools registered on the bus (cmd.tool.register)",
    "speed": "GPT-Live has no voice speed", "max_output_tokens": "GPT-Live has no such setting",
    "tool_choice": "GPT-Live delegates instead of calling tools", "truncation": "the server compacts the context",
    "reasoning": "GPT-Live has no such setting", "parallel_tool_calls": "GPT-Live delegates instead of calling tools",
    "include": "GPT-Live has no such setting", "prompt": "GPT-Live takes instructions only",
    "tracing": "GPT-Live has no such setting",
}

_SIGNED_KEYS = {"audio.echo_guard_db"}


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check(value: Any, default: Any, path: str) -> Any:
    rule = RULES.get(path)
    if rule is None:
        types: tuple[type, ...] = (type(default),) if default is not None else (object,)
        if isinstance(default, bool):
            types = (bool,)
        elif isinstance(default, float):
            types = _NUM
        choices = None
    else:
        types, choices = rule
    if value is False and choices is not None and "off" in choices:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    if isinstance(value, bool) and bool not in types and object not in types:
        raise ConfigError(f"config key '{path}': expected {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"config key '{path}': expected {_type_names(types)}, got {type(value).__name__} {value!r}")
    if choices is not None and value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(f"config key '{path}': {value!r} is not one of: {shown}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 and path not in _SIGNED_KEYS:
        raise ConfigError(f"config key '{path}': must not be negative, got {value}")
    if path in _OPEN_KEYS and isinstance(value, dict):
        for k in value:
            if k not in _OPEN_KEYS[path]:
                raise ConfigError(f"config key '{path}.{k}' is unknown{_suggest(k, _OPEN_KEYS[path])}")
            sub_default = _TD.get(k) if path == "session.turn_detection" else None
            _check(value[k], sub_default, f"{path}.{k}")
        return value
    if isinstance(default, dict) and isinstance(value, dict):
        return _merge(default, value, path)
    return value


def _suggest(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"


def _merge(defaults: dict[str, Any], given: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in defaults:
            raise ConfigError(f"config key '{path}' is unknown{_suggest(str(key), defaults)}")
        out[key] = _check(value, defaults[key], path)
    return out


def read_yaml_file(path: Path, what: str, error: type[Exception]) -> Any:
    """The parsed YAML in ``path``; a missing or malformed file raises ``error`` saying which."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} file {path} is not valid YAML: {exc}") from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file (if any), then ``overrides`` (dotted keys, e.g. from CLI flags)."""
    cfg: dict[str, Any] = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        data = read_yaml_file(p, "config", ConfigError)
        if data is not None:
            if not isinstance(data, dict):
                raise ConfigError(f"config file {p}: expected a mapping of keys at the top level")
            cfg = _merge(DEFAULTS, data)
    for dotted, value in (overrides or {}).items():
        node = cfg
        parts = dotted.split(".")
        tree: Any = DEFAULTS
        for i, part in enumerate(parts):
            if not isinstance(tree, dict) or part not in tree:
                where = ".".join(parts[:i])
                known = sorted(tree) if isinstance(tree, dict) else []
                raise ConfigError(f"config key '{dotted}' is unknown" + (
                    f" ('{where}' has no key '{part}'; known keys: {', '.join(known)})" if known and where else
                    f" (known keys: {', '.join(known)})" if known else f" ('{where}' is a value, not a section)"))
            tree = tree[part]
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = _check(value, _lookup(DEFAULTS, parts), dotted)
    check_priced(cfg["model"])   # the price table is part of the config's check
    if is_live_model(cfg["model"]):
        _check_live_session(cfg["session"], cfg["model"])
    elif cfg.get("provider") == "xai":
        if cfg["session"]["voice"].lower() not in XAI_VOICES:   # xAI also has custom voices: a clear refusal first
            raise ConfigError(f"config key 'session.voice': {cfg['session']['voice']!r} is not one of xAI's: "
                              f"{', '.join(XAI_VOICES)}")
    else:
        if cfg["session"]["voice"] not in REALTIME_VOICES:
            raise ConfigError(f"config key 'session.voice': {cfg['session']['voice']!r} is not one of: "
                              f"{', '.join(REALTIME_VOICES)}")
        _check_session_fields(cfg["session"])
    if cfg["session_recycle_s"] < 1:
        raise ConfigError(f"config key 'session_recycle_s': at least 1 second, got {cfg['session_recycle_s']}")
    _check_phone(cfg["phone"])
    heartbeat_s = cfg["supervisor"]["heartbeat_timeout_s"]
    if heartbeat_s is not None and heartbeat_s < 0.5:
        raise ConfigError(f"config key 'supervisor.heartbeat_timeout_s': at least 0.5 s (or null: no liveness "
                          f"check), got {heartbeat_s}")
    return cast(Config, cfg)   # every key checked against DEFAULTS, which Config describes (a test keeps them equal)


def _check_live_session(s: dict[str, Any], model: str) -> None:
    """A GPT-Live model takes instructions and a voice; a Realtime-only key set away from its
    default is an error naming the key and why (it would be silently ignored otherwise)."""
    if s["voice"] not in LIVE_VOICES:
        raise ConfigError(f"config key 'session.voice': {s['voice']!r} is not a GPT-Live voice ({model}); "
                          f"GPT-Live voices: {', '.join(LIVE_VOICES)}")
    defaults = DEFAULTS["session"]
    for key, why in LIVE_UNUSED_SESSION_KEYS.items():
        if s[key] != defaults[key]:
            raise ConfigError(f"config key 'session.{key}' does not apply to {model}: {why}. "
                              "Remove it, or choose a Realtime model.")
def is_loopback(host: str) -> bool:
    """``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_phone(ph: dict[str, Any]) -> None:
    """The phone port's keys whose values are more than a type (its secrets are the environment's,
    checked when the port opens: engine/phone/guard.py)."""
    if ph["auth"] == "none" and not is_loopback(ph["host"]):
        raise ConfigError(f"config key 'phone.auth': none (no authentication) is only allowed on a loopback address, "
                          f"and phone.host is {ph['host']!r}: anyone who reaches the port would open paid API "
                          "sessions; use phone.auth: twilio (the default) or token")
    if ph["public_url"] is not None and not ph["public_url"].startswith(("ws://", "wss://")):
        raise ConfigError(f"config key 'phone.public_url': {ph['public_url']!r} is not a ws:// or wss:// URL (the "
                          "stream URL exactly as given to Twilio, e.g. wss://phone.example.com/twilio)")
    for key, least in (("max_frame_bytes", 1024), ("max_messages_per_s", 1), ("start_timeout_s", 0.1),
                       ("idle_timeout_s", 1), ("max_calls", 1)):
        if ph[key] < least:
            raise ConfigError(f"config key 'phone.{key}': at least {least}, got {ph[key]}")


def _check_session_fields(s: dict[str, Any]) -> None:
    """The GA session fields whose values are more than a type (the official types' ranges)."""
    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"config key 'session.{key}': {want}, got {s[key]!r}")
    if s["speed"] is not None and not 0.25 <= s["speed"] <= 1.5:
        raise bad("speed", "a multiple of the voice's speed from 0.25 to 1.5")
    mot = s["max_output_tokens"]
    if mot is not None and mot != "inf" and not (isinstance(mot, int) and 1 <= mot <= 32768):
        raise bad("max_output_tokens", "1 to 32768 tokens, or inf")
    tc = s["tool_choice"]
    if tc is not None and tc not in ("auto", "none", "required") and not (
            isinstance(tc, dict) and tc.get("type") in ("function", "mcp") and isinstance(tc.get("name") or
                                                                                tc.get("server_label"), str)):
        raise bad("tool_choice", "auto, none, required or {type: function, name: ...}")
    tr = s["truncation"]
    if tr is not None and tr not in ("auto", "disabled") and not (
            isinstance(tr, dict) and tr.get("type") == "retention_ratio"
            and isinstance(tr.get("retention_ratio"), (int, float)) and 0 <= tr["retention_ratio"] <= 1):
        raise bad("truncation", "auto, disabled or {type: retention_ratio, retention_ratio: 0..1}")
    rs = s["reasoning"]
    if rs is not None and (set(rs) - {"effort"} or rs.get("effort") not in ("minimal", "low", "medium", "high",
                                                                            "xhigh")):
        raise bad("reasoning", "{effort: minimal|low|medium|high|xhigh} (reasoning models such as gpt-realtime-2)")
    if s["include"] is not None and not set(s["include"]) <= {"item.input_audio_transcription.logprobs"}:
        raise bad("include", "a list of: item.input_audio_transcription.logprobs")
    if s["prompt"] is not None and not isinstance(s["prompt"].get("id"), str):
        raise bad("prompt", "{id: ..., version: ..., variables: {...}} (a stored prompt)")
    if s["tracing"] is not None and s["tracing"] != "auto" and not isinstance(s["tracing"], dict):
        raise bad("tracing", "auto or {workflow_name, group_id, metadata}")
    for key in ("languages", "keywords"):
        value = (s["transcription"] or {}).get(key)
        if value is not None and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key 'session.transcription.{key}': a list of strings, got {value!r}")


def _lookup(tree: dict[str, Any], parts: list[str]) -> Any:
    for part in parts:
        tree = tree[part]
    return tree


def resolve_backend(cfg: Config) -> str:
    """'local' or 'openai' (any remote provider): ``provider`` when set; else auto picks openai when
    the API key variable is set."""
    if cfg.get("provider"):
        return "local" if cfg["provider"] == "local" else "openai"
    if cfg["backend"] != "auto":
        return cfg["backend"]
    return "openai" if os.environ.get(cfg["api_key_env"]) else "local"


def live_url(realtime_url: str) -> str:
    """The GPT-Live socket URL beside a Realtime one (``…/v1/realtime`` -> ``…/v1/live/sessions``)."""
    base = realtime_url.split("?", 1)[0].rstrip("/")
    if base.endswith("/realtime"):
        base = base[: -len("/realtime")]
    return f"{base}/live/sessions"


def session_payload(cfg: Config) -> dict[str, Any]:
    """The GA ``session.update`` session built from the config's ``session`` section."""
    s = cfg["session"]
    td = s["turn_detection"]
    if td is not None:
        td = dict(td)
        if td.get("type") == "semantic_vad":
            td = {k: v for k, v in td.items() if k in ("type", "eagerness", "create_response", "interrupt_response")}
    tools = [{"type": "function", **{k: v for k, v in t.items() if k != "type"}} for t in s["tools"]]
    extra = {k: s[k] for k in ("max_output_tokens", "tool_choice", "truncation", "reasoning", "parallel_tool_calls",
                                "include", "prompt", "tracing") if s[k] is not None}
    output: dict[str, Any] = {"format": api_format(), "voice": s["voice"]}
    if s["speed"] is not None:
        output["speed"] = s["speed"]
    return {
        **extra,
        "type": "realtime",
        "model": cfg["model"],
        "instructions": s["instructions"],
        "output_modalities": list(s["output_modalities"]),
        "audio": {
            "input": {"format": api_format(), "turn_detection": td,
                      "transcription": s["transcription"],
                      "noise_reduction": {"type": s["noise_reduction"]} if s["noise_reduction"] else None},
            "output": output,
        },
        "tools": tools,
    }
