"""`pip install .` without the repository: the wheel carries every file the engine reads at run
time, and an engine installed from it starts on the local server, answers, serves its console and
stops, run from a folder that is not the repository.

Offline and quick: the wheel is built with --no-build-isolation from a copy of only what setup.cfg
packages, and installed with --no-deps into a venv whose dependencies are this venv's
site-packages, added as a plain path (a .pth line), so this venv's editable realtalk is not seen."""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, ProcessLines, RunningEngine

#: what setup.cfg (and setup.py, for the native audio extension) builds the package from; nothing else of
#: the repository is copied
PACKAGE_SOURCES = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "engine", "bus")
#: files of the packages that are not read at run time: the native extension's C source, and what a build
#: of it in place left (the wheel builds its own)
BUILD_ONLY_SUFFIXES = (".py", ".pyc", ".c", ".so")


def _run(args: list[str | Path], what: str, timeout: float = 120, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert out.returncode == 0, f"{what} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _data_files(src: Path) -> set[str]:
    """Every file of the packages that is not Python source: what package_data must ship."""
    found = set()
    for top in ("engine", "bus"):
        for path in (src / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in BUILD_ONLY_SUFFIXES:
                found.add(path.relative_to(src).as_posix())
    return found


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_installed_wheel_runs_without_the_repository(tmp_path: Path, runtime_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGE_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        else:
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", wheels, src], "building the wheel (it needs the wheel package: pip install -e '.[test]')")
    (wheel,) = wheels.glob("realtalk-*.whl")

    # every data file of the packages is in the wheel (pricing.json, the console's page, the demo's scenario)
    data = _data_files(src)
    assert {"engine/pricing.json", "engine/console/static/index.html", "engine/api/demo.yaml"} <= data
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = data - names
    assert not missing, f"package data missing from the wheel (add them to setup.cfg's package_data): {sorted(missing)}"
    # the native audio backend is built into the wheel where this machine can build it (gcc and the headers)
    from engine.audio import native
    if native.available():
        assert any(n.startswith("engine/audio/_native.") and n.endswith(".so") for n in names), sorted(names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], "making the venv")
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        "asking the venv for its site-packages").stdout.strip())
    (purelib / "_realtalk_test_deps.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         "installing the wheel")

    elsewhere = tmp_path / "elsewhere"   # not the repository: nothing can be found beside the working folder
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENAI_API_KEY")}
    where = _run([python, "-c", "import engine, bus; print(engine.__file__); print(bus.__file__)"],
                 "importing the installed package", cwd=elsewhere, env=env).stdout.split()
    assert all(Path(f).is_relative_to(purelib) for f in where), f"not the installed copy: {where}"

    bin_dir = venv / "bin"
    proc = subprocess.Popen([str(bin_dir / "engine"), "start", "--text-only", "--backend", "local", "--speed", "4",
                             "--console"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=elsewhere)
    eng = RunningEngine(proc, runtime_dir, tmp_path / "data")
    tail = None
    try:
        if not eng.ready.wait(30):
            raise AssertionError("the installed engine did not become ready:\n" + "".join(eng.lines))
        # the children run the installed interpreter and package too
        children = [c for c in json.loads((runtime_dir / "engine.json").read_text())["children"] if c.get("pid")]
        assert {"broker", "realtime", "server", "console"} <= {c["name"] for c in children}, children
        for child in children:
            argv = Path(f"/proc/{child['pid']}/cmdline").read_bytes().split(b"\0")
            assert argv[0].decode() == str(python), f"{child['name']} runs {argv[0]!r}, not the venv's python"

        # the console's page and static files come from the installed package
        url = re.search(r"realtalk: console (http://\S+)", eng.wait_for(lambda s: "realtalk: console http" in s, 20))
        assert url is not None
        with urllib.request.urlopen(url.group(1), timeout=10) as r:
            assert r.status == 200 and b"realtalk console" in r.read()
        with urllib.request.urlopen(url.group(1).split("/?token=")[0] + "/static/console.js", timeout=10) as r:
            assert r.status == 200 and r.read()

        # engine say, and its answer on the bus
        tail = ProcessLines(subprocess.Popen([str(bin_dir / "engine"), "tail", "--json", "engine.status", "response.done"],
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                             cwd=elsewhere))
        tail.wait_for(lambda s: '"topic": "engine.status"' in s, 10)   # it is subscribed
        said = _run([bin_dir / "engine", "say", "hello"], "engine say", timeout=30, cwd=elsewhere, env=env)
        assert "added as item_" in said.stdout
        done = json.loads(tail.wait_for(lambda s: '"topic": "response.done"' in s, 30))
        assert done["status"] == "completed" and done["text"], done

        stopped = _run([bin_dir / "engine", "stop"], "engine stop", timeout=30, cwd=elsewhere, env=env)
        assert "stopped" in stopped.stdout
        assert proc.wait(20) == 0, "".join(eng.lines)
        assert "realtalk: stopped." in "".join(eng.lines)
    finally:
        if tail is not None:
            tail.stop()
        eng.stop()
