"""The package's build: setup.cfg holds the metadata; this file adds the one C extension,
``engine.audio._native`` (the native audio backend: PortAudio callbacks in C, libsoxr).

The extension is optional. Without a C compiler, or without the headers of PortAudio
(portaudio19-dev) and libsoxr (libsoxr-dev), or with ``REALTALK_NATIVE=0`` in the environment,
the install goes on without it and says so in one line; ``audio.backend: native`` then falls
back to PyAudio (engine/audio/native.py says why at run time). Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = Path(__file__).resolve().parent / "engine" / "audio" / "_native.c"
#: the source's hash, built in as ``source_sha``: engine/audio/native.py runs no build of another source
SOURCE_SHA = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]

#: PulseAudio's own client library for the devices the ALSA pulse plugin serves (the usual desktop
#: default and the virtual devices): with libpulse-dev and libasound2-dev, else PortAudio for all
PULSE = all(Path(h).is_file() for h in ("/usr/include/pulse/pulseaudio.h", "/usr/include/alsa/asoundlib.h"))

NATIVE = Extension(
    "engine.audio._native",
    sources=["engine/audio/_native.c"],
    define_macros=[("NATIVE_SOURCE_SHA", f'"{SOURCE_SHA}"')] + ([("REALTALK_PULSE", "1")] if PULSE else []),
    libraries=["portaudio", "soxr", "m"] + (["pulse", "asound"] if PULSE else []),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Wno-cast-function-type", "-ffp-contract=off"],
)


def _say_fallback(reason: str) -> None:
    print(f"realtalk: the native audio backend was not built ({reason}); audio.backend falls back to "
          "pyaudio. To build it: bash tools/setup-system.sh (gcc, portaudio19-dev, libsoxr-dev), then "
          'pip install -e ".[test]" again.', file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """Builds the native extension when it can; otherwise one line on stderr and no failure."""

    def run(self) -> None:
        if os.environ.get("REALTALK_NATIVE", "1") == "0":
            _say_fallback("REALTALK_NATIVE=0")
            return
        try:
            super().run()
        except Exception as exc:  # no compiler at all (distutils' errors derive from Exception)
            _say_fallback(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no compiler'}")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # a missing header or library: the compiler's or linker's error
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _say_fallback(f"{type(exc).__name__}: {first}")


setup(ext_modules=[NATIVE], cmdclass={"build_ext": OptionalBuildExt})
