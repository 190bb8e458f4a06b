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
# Two lanes at once (tests/conftest.py marks them). The first runs the `timed` tests (on the virtual
# devices, or at real time) one at a time, then the slowest other e2e modules (`timed_lane`) at the
# others' lower priority, so that both lanes end about together and neither core idles while the
# other lane runs on alone. The second runs everything else at that lower priority from the start,
# so that the CPU-bound pure tests and the other engines do not delay the audio the timed tests
# measure. pytest's exit 5 (nothing selected, e.g. for one named test file) is not a failure.
others_log=$(mktemp)
trap 'rm -f "$others_log"; bash tools/vaudio.sh stop >/dev/null 2>&1 || true' EXIT
nice -n 10 .venv/bin/python -m pytest -q -p no:cacheprovider -m "not timed and not timed_lane" "$@" >"$others_log" 2>&1 &
others=$!
status=0
judged() { "$@" || { local rc=$?; [ $rc -eq 5 ] || status=$rc; }; }   # a failing run's exit, unless 5
echo "== the timed tests (the others run beside them; their report follows)"
judged .venv/bin/python -m pytest -q -p no:cacheprovider -m timed "$@"
echo "== the timed lane's other tests, after them"
judged nice -n 10 .venv/bin/python -m pytest -q -p no:cacheprovider -m timed_lane "$@"
judged wait $others
echo "== the other tests"
cat "$others_log"
[ -d runs/console-screenshots ] && echo "console screenshots (the browser tests): $PWD/runs/console-screenshots"
exit $status
