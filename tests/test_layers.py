"""The tree is the import graph: nothing imports upward. Read from the source (ast), no imports run.

Layers, lowest first; a module may import its own package and any lower layer:
  0  bus          the wire, the broker, the clients (usable without the engine)
  1  foundation   what every part of the engine shares, with no process of its own: errors, pcm
                  (the PCM format), config_types, config, cost, providers, specs (the supervisor-
                  child contract and the ring table), child (a child's entry), codec, stats, wsio,
                  httpio, webhooks, view, haproxy, tasks, sampling, once, audio/ (ring, devices, levels, listen_talk, preflight,
                  record)
  2  protocol     the sans-I/O protocol cores (realtime/ but its process.py) and the API link
                  that drives them (link/): shared by the realtime and the phone process
  3  processes    capture, playback, realtime (process.py), phone, sip, console, server: each a
                  package whose process.py is its entry
  4  supervisor   starts and watches the processes (supervisor/)
  5  api          what users call (engine.api: client, cli; the package's face, engine/__init__)
Processes do not import each other. No package imports the debug console but the console
itself. Every top-level module of engine/ is placed in a layer here: a new one fails
test_every_module_has_a_layer until it is. bench/ imports engine freely and has no import circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PROCESSES = ("capture", "playback", "realtime", "phone", "console", "server", "sip")
PROTOCOL = ("realtime", "link")   # realtime/: all but process.py
FOUNDATION = ("errors", "pcm", "config_types", "config", "cost", "providers", "specs", "child", "codec", "stats", "wsio",
              "haproxy", "httpio", "webhooks", "view", "audio", "tasks", "sampling", "once")
LAYER_NAMES = {0: "bus", 1: "foundation", 2: "protocol", 3: "processes", 4: "supervisor", 5: "api"}
#: imports that break the rules, each to be removed (a new one fails this test): none left
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def layer(module: str) -> tuple[int, str]:
    """(layer, package) of a module of this repository."""
    parts = module.split(".")
    if parts[0] == "bus":
        return 0, "bus"
    if module == "engine":
        return 5, "api"   # the package's face: engine.create_session and friends, lazily from engine.api
    if parts[0] != "engine":
        return 1, parts[0]
    top = parts[1]
    if top in PROTOCOL and module != "engine.realtime.process":
        return 2, "protocol"   # the pure cores beside the realtime process and the link: shared with the phone bridge
    if top in PROCESSES:
        return 3, top
    if top == "supervisor":
        return 4, top
    if top == "api":
        return 5, top
    if top in FOUNDATION:
        return 1, top
    return -1, top   # not placed: test_every_module_has_a_layer


def imports(root: Path, package: str) -> list[tuple[str, str]]:
    """(importer, imported) for every import of this repository's modules under ``root``."""
    out: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from engine import child`` imports the module engine.child
                names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                         for a in node.names]
            else:
                continue
            out.extend((module, n) for n in names if n.split(".")[0] in ("bus", "engine", "bench"))
    return out


def _is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    # a C extension (engine/audio/_native.c) is a module whether this machine built it or not
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or path.with_suffix(".c").is_file()


def violations() -> list[str]:
    bad = []
    for importer, imported in imports(REPO / "engine", "engine") + imports(REPO / "bus", "bus"):
        (lo, pkg_from), (li, pkg_to) = layer(importer), layer(imported)
        if pkg_from == pkg_to or (importer, imported) in KNOWN_EXCEPTIONS:
            continue
        if imported.startswith("engine.console") and pkg_from != "console" and lo < 4:
            bad.append(f"{importer} imports the debug console ({imported})")
        elif li > lo:
            bad.append(f"{importer} (layer {lo}) imports upward: {imported} (layer {li})")
        elif li == lo == 3:
            bad.append(f"{importer} imports another process's package: {imported}")
    return bad


def test_nothing_imports_upward() -> None:
    assert violations() == []


def test_every_module_has_a_layer() -> None:
    """Each top-level module and package of engine/ is placed in the layers above."""
    tops = {p.stem for p in (REPO / "engine").glob("*.py") if p.stem != "__init__"}
    tops |= {p.name for p in (REPO / "engine").iterdir() if (p / "__init__.py").is_file()}
    unplaced = sorted(t for t in tops if layer(f"engine.{t}")[0] < 0)
    assert unplaced == [], f"place these in tests/test_layers.py's layers: {unplaced}"


def test_every_import_names_a_module() -> None:
    """An import of a module of this repository that does not exist fails here (mypy runs with
    ignore_missing_imports, so a module moved away from under an import is not its error)."""
    missing = sorted({f"{importer} imports {imported}" for root, pkg in ((REPO / "engine", "engine"), (REPO / "bus", "bus"),
                                                                      (REPO / "bench", "bench"), (REPO / "tests", "tests"))
                      for importer, imported in imports(root, pkg) if not _is_module(imported)})
    assert missing == []


def test_the_known_exceptions_still_exist() -> None:
    """An exception that was fixed comes off the list, so it cannot come back unnoticed."""
    seen = set(imports(REPO / "engine", "engine")) | set(imports(REPO / "bus", "bus"))
    assert KNOWN_EXCEPTIONS <= seen, sorted(KNOWN_EXCEPTIONS - seen)


def test_the_check_catches_an_upward_import(monkeypatch) -> None:
    import tests.test_layers as me
    real = me.imports
    monkeypatch.setattr(me, "imports", lambda root, pkg: real(root, pkg) + (
        [("engine.codec", "engine.phone.bridge"), ("engine.playback.process", "engine.capture.echo"),
         ("engine.server.app", "engine.console.levels"), ("engine.config", "engine.realtime.budget")]
        if pkg == "engine" else []))
    assert me.violations() == ["engine.codec (layer 1) imports upward: engine.phone.bridge (layer 3)",
                               "engine.playback.process imports another process's package: engine.capture.echo",
                               "engine.server.app imports the debug console (engine.console.levels)",
                               "engine.config (layer 1) imports upward: engine.realtime.budget (layer 2)"]


def test_bench_has_no_import_circle() -> None:
    graph: dict[str, set[str]] = {}
    for importer, imported in imports(REPO / "bench", "bench"):
        if imported.startswith("bench."):
            graph.setdefault(importer, set()).add(imported)
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, ()):
            if nxt in path:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif len(path) < 10:
                visit(nxt, path + [nxt])
    for start in graph:
        visit(start, [start])
    assert not circles, sorted(set(circles))[:5]
