#!/usr/bin/env bash
# Installs the system packages realtalk needs (Debian/Ubuntu, as root or with sudo),
# then a virtualenv in .venv with every Python dependency (pip install -e ".[test]").
#   portaudio19-dev           PyAudio builds against it; so does the native audio backend (engine/audio/_native.c)
#   libsoxr-dev               the native backend resamples in its callbacks with libsoxr (the soxr wheel bundles its own)
#   libpulse-dev, libasound2-dev  the native backend runs PulseAudio speakers and mics on libpulse itself,
#                             not through PortAudio and ALSA's pulse plugin (less CPU; without them, PortAudio)
#   gcc                       builds PyAudio and the native backend (without it the install falls back to PyAudio)
#   pulseaudio(-utils), libasound2-plugins   virtual devices for headless machines and CI
#   espeak-ng, sox            the local server's voice; test WAVs
#   haproxy                   the two-worker phone test (load balancer in front of engine phone workers)
#   chromium                  the console's browser tests (Playwright drives /usr/bin/chromium; no browser download)
#   nodejs, npm               the Node.js client (optional; skipped if node exists)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
pkgs=(gcc portaudio19-dev libsoxr-dev libpulse-dev libasound2-dev pulseaudio pulseaudio-utils libasound2-plugins espeak-ng sox chromium haproxy)
command -v node >/dev/null || pkgs+=(nodejs npm)
missing=(); for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
# the engine's own modules compiled once: each engine start imports them in five processes, and with
# PYTHONDONTWRITEBYTECODE set (as on CI machines) Python compiles them from source in every one
# (about 1 s of CPU a start); Python still reads these, and recompiles in memory a file changed since
.venv/bin/python -m compileall -q -j 0 engine bus clients/python bench >/dev/null
if command -v npm >/dev/null; then (cd clients/node && npm install --no-audit --no-fund --loglevel=error >/dev/null); fi
echo "setup: $(.venv/bin/python -c 'from engine.audio.native import status_line; print(status_line())')"
echo "setup: ok (.venv ready; activate with: . .venv/bin/activate)"
