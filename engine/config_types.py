"""The config's types: one TypedDict per section of config.yaml, which mypy checks every read
against (``cfg["audio"]["prebufer_ms"]`` is a type error). Types only, nothing to run: the children
parse their specs (engine/specs.py) with them without importing the loader.

They describe :data:`engine.config.DEFAULTS`, which stays the one source of the keys and their
defaults; ``tests/test_config_cost.py`` checks that every section's keys are the defaults' keys,
that each default has its declared type, and that each ``Literal`` lists the choices
:data:`engine.config.RULES` allows. A key added to DEFAULTS is added here too, or that test fails.
"""
from __future__ import annotations

from typing import Any, Literal, TypedDict


class AzureConfig(TypedDict):
    endpoint: str | None
    deployment: str | None
    auth: Literal["api-key", "entra"]
    api_key_env: str
    token_env: str


class XaiConfig(TypedDict):
    url: str
    api_key_env: str


class SessionConfig(TypedDict):
    """The ``session`` section: what ``session.update`` sends (:func:`session_payload`)."""
    instructions: str
    voice: str
    output_modalities: list[str]
    turn_detection: dict[str, Any] | None          #: open: its keys are checked against _OPEN_KEYS
    transcription: dict[str, Any] | None
    noise_reduction: Literal["near_field", "far_field"] | None
    tools: list[dict[str, Any]]
    speed: float | None
    max_output_tokens: int | str | None
    tool_choice: str | dict[str, Any] | None
    truncation: str | dict[str, Any] | None
    reasoning: dict[str, Any] | None
    parallel_tool_calls: bool | None
    include: list[str] | None
    prompt: dict[str, Any] | None
    tracing: str | dict[str, Any] | None


class AudioConfig(TypedDict):
    backend: Literal["native", "pyaudio"]   #: the device callbacks: C (engine/audio/native.py) or PyAudio's
    mic: str | int | None
    speaker: str | int | None
    device_rate_hz: int | None
    period_ms: Literal[10, 20, 40]
    playback_period_ms: Literal[10, 20, 40] | None
    prebuffer_ms: int
    jitter_buffer: Literal["adaptive", "fixed"]
    time_stretch: bool
    echo: Literal["auto", "aec", "half_duplex", "off"]
    echo_guard_db: float | None


class BargeInConfig(TypedDict):
    enabled: bool
    min_speech_ms: int


class BusConfig(TypedDict):
    transport: Literal["ipc", "tcp"]
    tcp_host: str
    tcp_publish_port: int
    tcp_subscribe_port: int


class SupervisorConfig(TypedDict):
    heartbeat_timeout_s: float | None


class LocalServerConfig(TypedDict):
    host: str
    port: int
    speed: float
    scenario: str | None
    asr: bool


class PhoneConfig(TypedDict):
    host: str
    port: int
    path: str
    dtmf_to_model: Literal["off", "context", "reply"]
    mark_every_ms: int
    max_calls: int
    prebuffer_ms: int | None
    auth: Literal["twilio", "token", "none"]
    auth_token_env: str
    token_env: str
    public_url: str | None
    max_frame_bytes: int
    max_messages_per_s: float
    start_timeout_s: float
    idle_timeout_s: float


class SipConfig(TypedDict):
    host: str
    port: int
    path: str
    max_calls: int
    no_route_status: Literal[404, 603]
    routes: list[dict[str, Any]]


class Config(TypedDict):
    """The whole config, as :func:`load_config` returns it (every key present, checked)."""
    backend: Literal["auto", "local", "openai"]
    model: str
    api_key_env: str
    openai_url: str
    provider: Literal["openai", "azure", "xai", "local"] | None
    auth_header: str | None
    azure: AzureConfig
    xai: XaiConfig
    session: SessionConfig
    audio: AudioConfig
    barge_in: BargeInConfig
    bus: BusConfig
    supervisor: SupervisorConfig
    local_server: LocalServerConfig
    phone: PhoneConfig
    sip: SipConfig
    budget_usd: float | None
    session_recycle_s: float
    reply_audio: bool
    record: str | None
    sessions_dir: str | None
