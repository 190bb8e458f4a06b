#!/usr/bin/env bash
# The whole test suite, from a fresh clone: system packages, .venv, lint and types, virtual audio
# devices, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-system.sh
.venv/bin/ruff check .
.venv/bin/mypy
trap 'bash tools/vaudio.sh stop >/dev/null 2>&1 || true' EXIT
eval "$(bash tools/vaudio.sh start)"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
[ -d runs/console-screenshots ] && echo "console screenshots (the browser tests): $PWD/runs/console-screenshots"
exit $status
