"""config.yaml checks and the price table."""
from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest
import yaml

from engine.config import DEFAULTS, RULES, load_config, session_payload
from engine.config_types import Config
from engine.cost import model_prices, pricing, response_cost_usd, transcription_cost_usd
from engine.errors import ConfigError
from tests.helpers import REPO


def _flat(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and k not in ("turn_detection", "transcription"):
            out += _flat(v, path)
        else:
            out.append(path)
    return out


def test_config_yaml_is_the_defaults() -> None:
    """The repository's config.yaml is the user-facing copy of DEFAULTS, which the engine reads
    from inside its package: every key and every value, none left to the defaults."""
    assert yaml.safe_load((REPO / "config.yaml").read_text()) == DEFAULTS
    assert load_config(REPO / "config.yaml") == DEFAULTS


def _type_errors(value: Any, tp: Any, path: str) -> list[str]:
    """Where ``value`` does not have the type ``tp`` (a TypedDict's keys must be exactly the
    value's, recursively), as ``path: why`` lines."""
    origin = get_origin(tp)
    if tp is Any:
        return []
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a section"]
        hints = get_type_hints(tp)
        out = [f"{path}.{k}: in the defaults, not in {tp.__name__}" for k in value if k not in hints]
        out += [f"{path}.{k}: in {tp.__name__}, not in the defaults" for k in hints if k not in value]
        return out + [e for k in hints if k in value for e in _type_errors(value[k], hints[k], f"{path}.{k}")]
    if origin in (Union, types.UnionType):
        return [] if any(not _type_errors(value, a, path) for a in get_args(tp)) else [f"{path}: {value!r} is not {tp}"]
    if origin is Literal:
        return [] if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)} else [
            f"{path}: {value!r} is not one of {get_args(tp)}"]
    if origin is list:
        return ([f"{path}: {value!r} is not a list"] if not isinstance(value, list) else
                [e for i, v in enumerate(value) for e in _type_errors(v, get_args(tp)[0], f"{path}[{i}]")])
    if origin is dict:
        return [] if isinstance(value, dict) else [f"{path}: {value!r} is not a mapping"]
    if tp is type(None):
        return [] if value is None else [f"{path}: {value!r} is not null"]
    if isinstance(value, bool) and tp is not bool:
        return [f"{path}: {value!r} is not {tp.__name__}"]
    ok = isinstance(value, (int, float)) if tp is float else isinstance(value, tp)
    return [] if ok else [f"{path}: {value!r} is not {tp.__name__}"]


def _literal_at(path: str) -> tuple[Any, ...] | None:
    """The choices Config's type at the dotted ``path`` allows (None with it when nullable), or
    None when that type is no Literal (or the path goes into an open mapping)."""
    tp: Any = Config
    for part in path.split("."):
        if not is_typeddict(tp):
            return None
        tp = get_type_hints(tp).get(part)
    args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    literals = [a for a in args if get_origin(a) is Literal]
    if not literals:
        return None
    return tuple(v for lit in literals for v in get_args(lit)) + ((None,) if type(None) in args else ())


def test_the_config_types_describe_the_defaults() -> None:
    """engine.config.Config (what mypy checks every read against) has exactly DEFAULTS' keys, in
    every section, and each default has the declared type."""
    assert _type_errors(DEFAULTS, Config, "config") == []
    # the check can fail: a key the types lack, a key the defaults lack, a default of another type
    broken = {**DEFAULTS, "audio": {**{k: v for k, v in DEFAULTS["audio"].items() if k != "echo"},
                                    "colour": "blue", "prebuffer_ms": "60"}}
    assert _type_errors(broken, Config, "config") == ["config.audio.colour: in the defaults, not in AudioConfig",
                                                      "config.audio.echo: in AudioConfig, not in the defaults",
                                                      "config.audio.prebuffer_ms: '60' is not int"]


def test_the_config_types_choices_are_the_checked_ones() -> None:
    """Each key whose type is a Literal allows exactly the choices load_config checks (RULES), and
    each key RULES limits to choices of plain values has that Literal."""
    mismatched = []
    for path, (_types, choices) in RULES.items():
        if choices is None or any(isinstance(c, (list, dict)) for c in choices):
            continue
        declared = _literal_at(path)
        if path.startswith(("session.turn_detection.", "session.transcription.")):
            assert declared is None   # open mappings: their keys are RULES' alone
            continue
        if declared is None or set(declared) != set(choices):
            mismatched.append(f"{path}: RULES {choices}, Config {declared}")
    assert mismatched == []


def _undocumented(keys: list[str], doc: str) -> list[str]:
    """The keys ``doc`` does not name whole, in backticks: a fallback to the last word let an
    invented key pass ("mode" is in the doc)."""
    return [key for key in keys if f"`{key}`" not in doc]


def test_every_key_is_documented() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    missing = _undocumented(_flat(DEFAULTS), doc)
    assert not missing, f"undocumented config keys: {missing}"
    # the check can fail: invented keys are missing, even those whose last word the doc has (`model`, mode)
    invented = ["audio.mode", "phone.model"]
    assert _undocumented(invented, doc) == invented


@pytest.mark.parametrize("data, words", [
    ({"audio": {"mik": "x"}}, "'audio.mik' is unknown (did you mean 'mic'?)"),
    ({"backend": "cloud"}, "'backend': 'cloud' is not one of"),
    ({"audio": {"period_ms": "20"}}, "'audio.period_ms': expected an integer"),
    ({"audio": {"playback_period_ms": 15}}, "'audio.playback_period_ms': 15 is not one of"),
    ({"session": {"turn_detection": {"treshold": 0.5}}}, "did you mean 'threshold'"),
    ({"budget_usd": -1}, "must not be negative"),
    ({"barge_in": {"enabled": "yes"}}, "'barge_in.enabled': expected true/false"),
    ({"phone": {"prebuffer_ms": "60"}}, "'phone.prebuffer_ms': expected an integer"),
    ({"audio": {"jitter_buffer": "auto"}}, "'audio.jitter_buffer': 'auto' is not one of: adaptive, fixed"),
    ({"audio": {"jitter_buffer": True}}, "'audio.jitter_buffer': expected a string"),
])
def test_bad_config_names_key_and_problem(tmp_path: Path, data: dict, words: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert words in str(exc.value)


def test_session_payload_is_ga(validator: object) -> None:
    s = session_payload(load_config(None, {}))
    assert s["type"] == "realtime" and s["audio"]["output"]["voice"] == "marin"
    from openai.types.realtime import SessionUpdateEvent
    SessionUpdateEvent.model_validate({"type": "session.update", "session": s})


def test_every_current_model_has_a_dated_price() -> None:
    for model in ("gpt-realtime-2.1", "gpt-realtime-2", "gpt-realtime-1.5", "gpt-realtime", "gpt-realtime-mini",
                  "gpt-realtime-2.1-mini", "gpt-4o-realtime-preview", "gpt-4o-mini-realtime-preview",
                  "gpt-realtime-2025-08-28", "gpt-4o-mini-realtime-preview-2024-12-17"):
        p = model_prices(model)
        assert p["source"] and p["date"]
    for name, p in pricing()["transcription"].items():
        assert p["source"] and p["date"], name


def test_cost_counts_cached_tokens_at_the_cached_price() -> None:
    usage = {"input_token_details": {"text_tokens": 1000, "audio_tokens": 1000, "cached_tokens_details":
                                     {"text_tokens": 500, "audio_tokens": 1000}},
             "output_token_details": {"text_tokens": 100, "audio_tokens": 200}}
    want = (500 * 4.0 + 500 * 0.4 + 1000 * 0.4 + 100 * 16.0 + 200 * 64.0) / 1e6
    assert response_cost_usd("gpt-realtime", usage) == pytest.approx(want)
    assert transcription_cost_usd("whisper-1", {"type": "duration", "seconds": 60}) == pytest.approx(0.006)


def test_bare_off_in_yaml_means_off(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("audio:\n  echo: off\n")  # YAML 1.1 reads this as false
    assert load_config(p)["audio"]["echo"] == "off"


def test_a_model_without_prices_is_refused_at_start_naming_the_priced_ones(tmp_path: Path) -> None:
    """Issue 15 point 14: an unpriced model started fine, then broke every answer."""
    from engine.config import load_config
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: gpt-imaginary\n")
    with pytest.raises(ConfigError, match=r"gpt-imaginary.*priced Realtime models: .*gpt-realtime"):
        load_config(cfg)


GA_FIELDS = {"speed": 1.2, "max_output_tokens": 20000, "tool_choice": "required",
             "truncation": {"type": "retention_ratio", "retention_ratio": 0.8}, "reasoning": {"effort": "low"},
             "parallel_tool_calls": True, "include": ["item.input_audio_transcription.logprobs"],
             "prompt": {"id": "pmpt_1"}, "tracing": "auto"}


def test_every_ga_session_field_has_a_checked_config_key(tmp_path: Path) -> None:
    """Issue 12 point 7: reasoning, max_output_tokens, tool_choice, truncation and speed could only be set
    with a raw cmd.session.update."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"session": {**GA_FIELDS, "transcription": {
        "model": "gpt-4o-mini-transcribe", "languages": ["en", "fr"], "keywords": ["Avis"], "delay": "low"}}}))
    payload = session_payload(load_config(cfg))
    assert payload["audio"]["output"]["speed"] == 1.2
    for key, value in GA_FIELDS.items():
        if key != "speed":
            assert payload[key] == value, key
    assert payload["audio"]["input"]["transcription"]["languages"] == ["en", "fr"]
    # the official types accept the payload
    from openai.types.realtime.realtime_session_create_request import RealtimeSessionCreateRequest
    RealtimeSessionCreateRequest.model_validate(payload)


@pytest.mark.parametrize("key, value, words", [("speed", 3.0, "0.25 to 1.5"), ("max_output_tokens", 0, "32768"),
                                               ("tool_choice", "sometimes", "required"),
                                               ("reasoning", {"effort": "max"}, "xhigh"),
                                               ("truncation", "cut", "retention_ratio")])
def test_bad_ga_session_values_name_the_key(tmp_path: Path, key: str, value: Any, words: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"session": {key: value}}))
    with pytest.raises(ConfigError, match=rf"session\.{key}.*{words}"):
        load_config(cfg)


@pytest.mark.parametrize("dotted", ["phone.solo", "audio.mode", "nosuch", "audio.mic.name"])
def test_an_unknown_override_key_is_a_config_error_naming_it(dotted: str) -> None:
    """Overrides (CLI flags, create_session options) are checked like the file's keys: an
    unknown one names itself, not a bare KeyError from deep inside."""
    with pytest.raises(ConfigError, match=re.escape(dotted)):
        load_config(None, {dotted: True})


# ------------------------------------------------------------------ GPT-Live models
def test_a_live_model_is_accepted_with_a_live_voice() -> None:
    cfg = load_config(None, {"model": "gpt-live-1.1", "session.voice": "beacon"})
    assert cfg["model"] == "gpt-live-1.1"


def test_a_live_voice_is_refused_for_a_realtime_model_and_the_reverse() -> None:
    with pytest.raises(ConfigError, match=r"session\.voice.*'beacon'"):
        load_config(None, {"session.voice": "beacon"})
    with pytest.raises(ConfigError, match=r"session\.voice.*'fable'.*GPT-Live voices"):
        load_config(None, {"model": "gpt-live-1", "session.voice": "fable"})


@pytest.mark.parametrize("key, value, why", [
    ("session.turn_detection", None, "decides turns"),
    ("session.output_modalities", ["text"], "always speaks"),
    ("session.tools", [{"name": "x"}], "cmd.tool.register"),
])
def test_a_realtime_only_key_set_for_a_live_model_is_an_error_saying_why(key: str, value: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' does not apply to gpt-live-1") + ".*" + why):
        load_config(None, {"model": "gpt-live-1", key: value})


def test_an_unpriced_model_names_both_families() -> None:
    with pytest.raises(ConfigError, match="priced Realtime models: .*GPT-Live models: gpt-live-1, gpt-live-1.1"):
        load_config(None, {"model": "gpt-live-9"})


def test_the_live_url_sits_beside_the_realtime_one() -> None:
    from engine.config import live_url
    assert live_url("wss://api.openai.com/v1/realtime") == "wss://api.openai.com/v1/live/sessions"
    assert live_url("ws://127.0.0.1:8765/v1/realtime?model=x") == "ws://127.0.0.1:8765/v1/live/sessions"
