#!/usr/bin/env bash
# The engine's main job on a machine with no sound card: virtual devices, the local
# server, a question spoken into the virtual mic, the conversation and its cost.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-system.sh
trap 'bash tools/vaudio.sh stop >/dev/null 2>&1 || true' EXIT
eval "$(bash tools/vaudio.sh start)"
.venv/bin/engine demo "$@"
