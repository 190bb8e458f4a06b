"""A bad mic or speaker (a corrupt WAV, a missing file or device) fails `engine start` before any
child starts, with one error naming the file or device: no crash loop, no traceback, no second,
misleading socket error."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine.capture.process import CaptureProcess
from engine.errors import DeviceError
from engine.audio.preflight import MAX_MIC_WAV_S, mic_wav_format

pytestmark = pytest.mark.timeout(60)


def wav_bytes(channels: int = 1, rate_hz: int = 24000, width_bytes: int = 2, data: bytes = b"\0" * 4800,
              fmt_tag: int = 1, data_len: int | None = None) -> bytes:
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate_hz, rate_hz * channels * width_bytes, channels * width_bytes,
                      8 * width_bytes)
    body = (b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data"
            + struct.pack("<I", len(data) if data_len is None else data_len) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


CORRUPT = {
    "garbage": (os.urandom(1000), "not a WAV file"),
    "zero_rate": (wav_bytes(rate_hz=0), "sample rate is 0 Hz"),
    "zero_channels": (wav_bytes(channels=0), "not a WAV file"),
    "eight_bit": (wav_bytes(width_bytes=1), "8-bit"),
    "float": (wav_bytes(fmt_tag=3, width_bytes=4), "not a WAV file"),
    "truncated_header": (wav_bytes()[:30], "not a WAV file"),
    "too_long": (wav_bytes(rate_hz=8000, data=b"\0" * 16, data_len=2 * 8000 * (MAX_MIC_WAV_S + 1)), "longer than"),
    "empty": (b"", "not a WAV file"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_a_corrupt_mic_wav_is_a_device_error_naming_the_file(tmp_path: Path, name: str) -> None:
    """Issue 23 point 5: a WAV with a sample rate of 0 raised ValueError in the resampler: a
    crash (exit 4), restarted three times with a traceback each."""
    data, why = CORRUPT[name]
    path = tmp_path / f"{name}.wav"
    path.write_bytes(data)
    with pytest.raises(DeviceError) as pre:
        mic_wav_format(str(path))
    with pytest.raises(DeviceError) as cap:
        CaptureProcess.read_wav(str(path))
    for err in (pre.value, cap.value):
        assert str(path) in str(err) and why in str(err), str(err)


def test_a_truncated_last_frame_is_cut_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "odd.wav"
    path.write_bytes(wav_bytes(channels=2, data=b"\1\0" * 9 + b"\1"))   # 4 stereo frames and a byte
    assert mic_wav_format(str(path)).channels == 2
    pcm, rate = CaptureProcess.read_wav(str(path))
    assert rate == 24000 and len(pcm) == 4


def _start(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "engine.api.cli", "start", "--backend", "local", *args],
                         capture_output=True, text=True, timeout=60)
    return out, time.monotonic() - t0


def _one_error_no_child(out: subprocess.CompletedProcess[str], *names: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    errors = [line for line in out.stderr.splitlines() if line.startswith("engine start: ")]
    assert len(errors) == 1 and all(n in errors[0] for n in names), text
    assert "Traceback" not in text and "HTTP" not in text and "restarting" not in text, text
    assert "bus publish" not in text, "children were started:\n" + text   # printed once the children run


@pytest.mark.e2e
def test_a_corrupt_mic_wav_stops_engine_start_before_any_child(runtime_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(CORRUPT["zero_rate"][0])
    out, took_s = _start("--mic", str(bad), "--speaker", "null")
    _one_error_no_child(out, str(bad), "sample rate is 0 Hz")
    # checked before anything is made: no session folder, no connection file (nor rings, sockets)
    assert not list((tmp_path / "data").glob("realtalk/sessions/*"))   # XDG_DATA_HOME (the runtime_dir fixture)
    assert not (runtime_dir / "engine.json").exists() and not list(runtime_dir.iterdir())
    print(f"refused in {took_s * 1000:.0f} ms from exec")


@pytest.mark.e2e
@pytest.mark.audio
@pytest.mark.parametrize("args, names", [
    (("--mic", "no-such-mic", "--speaker", "null"), ("no-such-mic", "vmic")),
    (("--mic", "null", "--speaker", "no-such-speaker"), ("no-such-speaker", "vspk")),
])
def test_a_missing_device_stops_engine_start_before_any_child(vaudio: dict[str, str], runtime_dir: Path,
                                                              args: tuple[str, ...], names: tuple[str, ...]) -> None:
    out, took_s = _start(*args)
    # the device list follows on the lines after the one error line
    _one_error_no_child(out, names[0])
    assert names[1] in out.stderr
    print(f"refused in {took_s * 1000:.0f} ms from exec")


@pytest.mark.e2e
def test_a_speaker_wav_in_a_folder_that_is_a_file_is_refused(runtime_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out, _ = _start("--mic", "null", "--speaker", str(tmp_path / "afile" / "out.wav"))
    _one_error_no_child(out, "audio.speaker", str(tmp_path / "afile"))



def test_once_the_engine_stops_for_a_cause_other_errors_are_logged_not_printed(runtime_dir: Path,
                                                                              tmp_path: Path) -> None:
    """Issue 23 point 7: beside the real cause, a second, misleading error was printed: the
    realtime process's socket error (HTTP 503 from a local server that was stopping) as the
    engine stopped."""
    import io
    import json
    from types import SimpleNamespace
    from engine.config import load_config
    from engine.supervisor.logfile import SessionLog
    from engine.supervisor.process import Supervisor
    from engine.supervisor.table import Child
    out = io.StringIO()
    sup = Supervisor(load_config(None, {"backend": "local", "sessions_dir": str(tmp_path / "s")}), text_only=True,
                     out=out)
    child = Child("realtime", [])
    child.proc = SimpleNamespace(pid=4242)   # type: ignore[assignment]
    sup.children.append(child)
    log = sup.session_dir / "events.jsonl"
    sup.log_file = log_file = SessionLog(log)

    def socket_error(n: int) -> dict[str, Any]:
        return {"v": 1, "ts": 0.0, "mono_ns": 0, "pub": "realtime:4242", "seq": n, "source": "realtime",
                "code": "connect_failed", "message": f"cannot reach the API: HTTP 503 ({n})"}
    sup._on_message("engine.error", socket_error(1))
    assert "HTTP 503 (1)" in out.getvalue()          # while running, errors are shown as they come
    sup.fatal = "capture: the mic failed"
    sup._on_message("engine.error", socket_error(2))
    log_file.close()
    assert "HTTP 503 (2)" not in out.getvalue()      # the stop's cause is the one line that counts
    assert "HTTP 503 (2)" in "".join(json.loads(line)["body"]["message"] for line in log.read_text().splitlines())
