"""The Node.js client's own tests (`npm test` in clients/node), run as part of the suite."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(220)]


def test_npm_test_passes(node: str, runtime_dir: object) -> None:
    npm = shutil.which("npm")
    assert npm, "npm is needed: run bash tools/setup-system.sh"
    out = subprocess.run([npm, "test"], cwd=REPO / "clients" / "node", capture_output=True, text=True, timeout=210,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout and "# pass 2" in out.stdout, out.stdout[-2000:]
