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
# the pure tests run on a second worker beside the e2e tests, which stay one at a time (tests/conftest.py)
.venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@" || status=$?
[ -d runs/console-screenshots ] && echo "console screenshots (the browser tests): $PWD/runs/console-screenshots"
exit $status
