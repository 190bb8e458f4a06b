#!/usr/bin/env bash
# The whole test suite, from a fresh clone: system packages, .venv, virtual audio devices, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-system.sh
trap 'bash tools/vaudio.sh stop >/dev/null 2>&1 || true' EXIT
eval "$(bash tools/vaudio.sh start)"
.venv/bin/python -m pytest -q "$@"
