"""bench/floor.py's native least (issue 25): its C devices and AEC3 alone start on the virtual
devices and are measured, so `bench/run.py core` reports `floor_cpu_percent_native_engine_least`."""
from __future__ import annotations

import os
import time
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(90)
def test_the_native_least_runs_its_devices_aec3_and_c_link_and_sums_them(vaudio: dict[str, str]) -> None:
    from bench.common import cpu_ns
    from bench.floor import figures, running
    with running(48000, 20, 10, dict(os.environ), link=True, native=True) as pids:
        assert {"input_c", "output_c", "aec3", "link_c"} <= set(pids), pids
        before = {k: cpu_ns(p) for k, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(1.0)   # a CPU window: what is measured is time itself
        wall = time.monotonic() - t0
        by_side = {k: 100 * (cpu_ns(p) - before[k]) / 1e9 / wall for k, p in pids.items()}
    out: dict[str, Any] = figures(by_side)
    for side in ("input_c", "output_c", "aec3"):   # each did its work: a stream that never ran costs nothing
        assert by_side[side] > 0, by_side
    assert out["floor_cpu_percent_native_engine_least"] == pytest.approx(
        out["floor_cpu_percent_devices_libpulse_c"] + out["floor_cpu_percent_aec3_python_call_20ms"]
        + out["floor_cpu_percent_link_c_websocket"], abs=0.02), out
