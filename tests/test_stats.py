"""engine.stats.percentiles: numpy's linear percentiles, without np.percentile's first-call import."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engine.stats import percentiles

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 4096])
def test_the_figures_are_numpys(n: int) -> None:
    values = np.random.default_rng(n).exponential(3.0, n)
    qs = (0, 10, 50, 99, 100)
    assert np.allclose(percentiles(values, qs), np.percentile(values, qs), rtol=1e-12, atol=0)
    assert np.allclose(percentiles(list(values), qs), np.percentile(values, qs), rtol=1e-12, atol=0)


def test_no_values_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentiles([], (50,))


@pytest.mark.e2e   # a fresh interpreter: numpy.ma may be loaded in this one already
def test_the_engine_reports_import_nothing_on_the_thread_that_asks() -> None:
    """np.percentile imported numpy.ma on its first call (about 14 ms of CPU): the realtime link
    thread paid it at its first latency.mic report, mid-conversation, as the capture and playback
    chores did at their first echo and cadence reports."""
    code = ("import sys\n"
            "from engine.wsio import Latency\n"
            "from engine.capture.echo import EchoCanceller\n"
            "lat = Latency()\n"
            "for v in (900.0, 1200.0, 4000.0): lat.note(v)\n"
            "assert lat.report()['p99_ms'] > 3.9\n"
            "ec = EchoCanceller.__new__(EchoCanceller)\n"
            "ec.erle_windows_db = [50.0, 52.0, 55.0]\n"
            "assert ec._erle_percentiles_db() == (50.4, 52.0)\n"
            "print('numpy.ma' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
