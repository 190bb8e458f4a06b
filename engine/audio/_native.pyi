"""Types of the C extension engine/audio/_native.c (its rules are at its top)."""
from typing import Any

RATE_HZ: int
LAYOUT_VERSION: int
MAX_AEC_BLOCKS: int
source_sha: str
#: the renderer's state machine: (state names, event names, ((state, event, next state), ...))
RENDER_TABLE: tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, int, int], ...]]


class Renderer:
    prebuffer_frames: int
    base_prebuffer_frames: int
    max_prebuffer_frames: int
    low_water_frames: int
    backlog_frames: int
    listen_on: int
    wake_fd: int
    state: int
    transition_errors: int
    #: who runs the open device stream: "pulse" (libpulse), "portaudio", or "" when none is open
    host: str
    #: the libpulse speaker's buffer: (target ms asked for, rises, falls) after the sink ran dry
    #: (_native.c, "the device host"); None on PortAudio or while no stream is open
    device_buffer: tuple[float, int, int] | None

    def __init__(self, speaker: Any, prebuffer_frames: int, max_prebuffer_frames: int = ..., ref: Any = ...,
                 stretch: bool = ..., device_rate_hz: int = ..., block_frames: int = ..., tap: Any = ...) -> None: ...
    def render(self, out: Any, latency_frames: int, now_s: float) -> None: ...
    def fill(self, out: Any, latency_frames: int, now_s: float) -> None: ...
    def drain_events(self) -> list[tuple[str, int, int, int, int, int]]: ...
    def set_listen(self, mapping: Any) -> None: ...
    def open(self, device_index: int, rate_hz: float, frames_per_buffer: int) -> float: ...
    def close(self) -> None: ...
    def is_active(self) -> bool: ...
    def callback_stamps(self) -> list[int]: ...
    def __getattr__(self, name: str) -> Any: ...


class FarEnd:
    missing_frames: int
    gap_frames: int
    skipped_frames: int
    realignments: int
    uncertain_frames: int
    uncertain: bool
    clock_jumps: int
    clock_frames: int
    clock_doubtful: bool
    clock_settled: bool

    def __init__(self, ref: Any, constants: dict[str, int]) -> None: ...
    def take(self, frames: int, adc_ns: int) -> int: ...
    def buffer(self) -> memoryview: ...


class Capture:
    #: who runs the open device stream: "pulse" (libpulse), "portaudio", or "" when none is open
    host: str
    callbacks: int
    input_overflows: int
    dev_dropped: int
    blocks: int
    far_active_blocks: int
    guarded_blocks: int
    errors: int
    busy_ns: int
    steps: int
    step_cpu_ns: int
    aec_call_cpu_ns: int
    far_take_cpu_ns: int
    near_energy: float
    out_energy: float
    talks: int
    holds: int
    held_blocks: int
    erl_db: float
    erl_blocks: int
    guard_state: str
    wake_fd: int

    def __init__(self, mic: Any, mic_fd: int, device_rate_hz: int, period_frames: int, aec: bool = ...,
                 guard_db: float | None = ..., buffers: Any = ..., tap_in: Any = ..., tap_out: Any = ...,
                 far_adc: bool = ..., echo: Any = ...) -> None: ...
    def step(self, far_take: Any = ..., aec: Any = ..., extras: Any = ...) -> int: ...
    def wait(self, timeout_s: float) -> bool: ...
    def push(self, frames: Any, adc_ns: int | None = ...) -> None: ...
    def open(self, device_index: int, rate_hz: float, frames_per_buffer: int) -> float: ...
    def close(self) -> None: ...
    def is_active(self) -> bool: ...
    def erle_windows(self) -> list[float]: ...
    def last_error(self) -> BaseException | None: ...
    def take_held_back(self) -> tuple[float | None, float | None, int]: ...


def talk_guard(constants: Any, loud_db: float, blocks: Any) -> tuple[list[bool], dict[str, Any]]: ...
def pulse_device(alsa_name: str) -> str | None: ...
def versions() -> dict[str, str]: ...
def window_levels(buffer: Any, pos: int, count: int, window: int) -> tuple[list[float], list[float]]: ...
