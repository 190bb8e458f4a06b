"""What ``engine start`` checks of the mic and the speaker before any child starts, as it checks
the config: a bad file or device fails the start at once with one error naming it (a
:class:`DeviceError`), instead of a child failing seconds later while the others start and
print errors of their own (a socket error, "HTTP 503", beside the real one).

* A WAV mic (:func:`mic_wav_format`): it exists and is a RIFF WAVE file of 16-bit PCM, one or
  more channels, a sample rate of :data:`MIN_RATE_HZ` to :data:`MAX_RATE_HZ` and at most
  :data:`MAX_MIC_WAV_S` long (the capture process holds it in memory at 24 kHz). Only the header is
  read. The capture process checks it again with the same function when it reads the file.
* A WAV speaker: its folder exists and it is not itself a folder.
* A device mic or speaker (a name or an index): PyAudio finds it. PyAudio is initialised and
  terminated here, before anything forks (about 0.1 s), and the device is not opened: one that
  exists but is busy still fails in its child (exit code 3, fatal at once).
"""
from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from engine.config_types import AudioConfig
from engine.errors import ConfigError, DeviceError

MIN_RATE_HZ = 1000
MAX_RATE_HZ = 384_000
MAX_MIC_WAV_S = 3600          #: a mic WAV is read whole into memory (24 kHz int16: 173 MB an hour)
FIX = "use a 16-bit PCM WAV file (convert it, e.g. sox IN -b 16 OUT.wav)"


@dataclass(frozen=True)
class WavFormat:
    rate_hz: int
    channels: int
    frames: int


def mic_wav_format(path: str) -> WavFormat:
    """The mic file's format from its header; :class:`DeviceError` naming the file and what is
    wrong with it when it cannot be used as a mic."""
    try:
        with wave.open(path, "rb") as w:
            width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
    except FileNotFoundError:
        raise DeviceError(f"mic file {path} does not exist") from None
    except IsADirectoryError:
        raise DeviceError(f"mic file {path} is a folder, not a WAV file") from None
    except PermissionError:
        raise DeviceError(f"mic file {path} cannot be read (permission denied)") from None
    except (wave.Error, EOFError, ValueError, OSError) as exc:
        why = str(exc) or type(exc).__name__
        raise DeviceError(f"mic file {path} is not a WAV file it can read ({why}); {FIX}") from None
    if width != 2:
        raise DeviceError(f"mic file {path} is {8 * width}-bit: only 16-bit PCM WAV files can be used as a mic; {FIX}")
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise DeviceError(f"mic file {path} says its sample rate is {rate} Hz: a corrupt header? "
                          f"({MIN_RATE_HZ} to {MAX_RATE_HZ} Hz can be used); {FIX}")
    if frames > MAX_MIC_WAV_S * rate:
        raise DeviceError(f"mic file {path} is longer than {MAX_MIC_WAV_S} s ({frames // rate} s, or a corrupt "
                          "header): cut it, e.g. sox IN OUT.wav trim 0 3600")
    return WavFormat(rate, channels, frames)


def _is_wav(target: object) -> TypeGuard[str]:
    return isinstance(target, str) and target.lower().endswith(".wav")


def _is_device(target: Any) -> bool:
    return target is not None and target != "null" and not _is_wav(target)


def check_speaker_wav(path: str) -> None:
    """A speaker WAV must go into a folder that exists, and not be a folder itself."""
    target = Path(path).expanduser().absolute()
    if not target.parent.is_dir():
        what = "is not a folder" if target.parent.exists() else "does not exist"
        raise ConfigError(f"audio.speaker: cannot write {path}: the folder {target.parent} {what} "
                          "(create it, or give a file in an existing folder)")
    if target.is_dir():
        raise ConfigError(f"audio.speaker: {path} is a folder; give a .wav file to write")


def check_devices(mic: Any, speaker: Any) -> None:
    """Each of ``mic`` and ``speaker`` that names a device (not a WAV file, not null) is found by
    PyAudio; :class:`DeviceError` listing the devices when one is not."""
    if not _is_device(mic) and not _is_device(speaker):
        return
    from engine.audio.devices import find_device, open_pyaudio
    pa = open_pyaudio()
    try:
        if _is_device(mic):
            find_device(pa, mic, "input")
        if _is_device(speaker):
            find_device(pa, speaker, "output")
    finally:
        pa.terminate()


def check_audio(audio: AudioConfig, *, text_only: bool = False) -> None:
    """Everything above for the config's ``audio`` section (nothing when ``text_only``)."""
    if text_only:
        return
    mic, speaker = audio["mic"], audio["speaker"]
    if _is_wav(speaker):
        check_speaker_wav(speaker)
    if _is_wav(mic):
        mic_wav_format(mic)
    check_devices(mic, speaker)
