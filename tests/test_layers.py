"""The tree is the import graph: nothing imports upward. Read from the source (ast), no imports run.

Layers, lowest first; a module may import its own package and any lower layer:
  0  bus                                  the wire, the broker, the clients (usable without the engine)
  1  engine's shared modules              errors, codec, cost, config, wsio, audio/, view; the API link
                                          (link/) and the protocol cores it drives (realtime/ but its
                                          process.py: pure, used by the realtime and the phone process)
  2  the processes                        capture, playback, realtime (process.py), phone, console, server
  3  the supervisor                       starts and watches the processes
  4  engine.api                           what users call (client, cli)
Processes do not import each other (the phone process runs the protocol cores and the API link,
which are shared, layer 1). No package imports the
debug console but the console itself. bench/ imports engine freely and has no import circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PROCESSES = ("capture", "playback", "realtime", "phone", "console", "server", "sip")
SHARED = ("errors", "codec", "cost", "config", "wsio", "audio", "view", "child")
#: imports that break the rules today, each to be removed (a new one fails this test)
KNOWN_EXCEPTIONS: set[tuple[str, str]] = {
    ("engine.capture.process", "engine.supervisor.child"),
    ("engine.playback.process", "engine.supervisor.child"),
    ("engine.realtime.process", "engine.supervisor.child"),
    ("engine.phone.process", "engine.supervisor.child"),
    ("engine.console.process", "engine.supervisor.child"),
    ("engine.sip.process", "engine.supervisor.child"),
    ("engine.capture.process", "engine.console.audio"),
    ("engine.capture.process", "engine.console.levels"),
    ("engine.playback.process", "engine.console.audio"),
    ("engine.playback.process", "engine.console.levels"),
    ("engine.supervisor.process", "engine.api.view"),
}


def layer(module: str) -> tuple[int, str]:
    """(layer, package) of a module of this repository."""
    parts = module.split(".")
    if parts[0] == "bus":
        return 0, "bus"
    if module == "engine":
        return 4, "api"   # the package's face: engine.create_session and friends, lazily from engine.api
    if parts[0] != "engine":
        return 1, "engine"
    top = parts[1]
    if top == "realtime" and module != "engine.realtime.process":
        return 1, "protocol"   # the pure cores beside the realtime process: shared with the phone bridge
    if top in PROCESSES:
        return 2, top
    if top == "supervisor":
        return 3, top
    if top == "api":
        return 4, top
    return 1, top


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
                # ``from engine.supervisor import child`` imports the module engine.supervisor.child
                names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                         for a in node.names]
            else:
                continue
            out.extend((module, n) for n in names if n.split(".")[0] in ("bus", "engine", "bench"))
    return out


def _is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


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
        elif li == lo == 2:
            bad.append(f"{importer} imports another process's package: {imported}")
    return bad


def test_nothing_imports_upward() -> None:
    assert violations() == []


def test_the_known_exceptions_still_exist() -> None:
    """An exception that was fixed comes off the list, so it cannot come back unnoticed."""
    seen = set(imports(REPO / "engine", "engine")) | set(imports(REPO / "bus", "bus"))
    assert KNOWN_EXCEPTIONS <= seen, sorted(KNOWN_EXCEPTIONS - seen)


def test_the_check_catches_an_upward_import(monkeypatch) -> None:
    import tests.test_layers as me
    real = me.imports
    monkeypatch.setattr(me, "imports", lambda root, pkg: real(root, pkg) + (
        [("engine.codec", "engine.phone.bridge"), ("engine.playback.process", "engine.capture.echo"),
         ("engine.server.app", "engine.console.levels")] if pkg == "engine" else []))
    assert me.violations() == ["engine.codec (layer 1) imports upward: engine.phone.bridge (layer 2)",
                               "engine.playback.process imports another process's package: engine.capture.echo",
                               "engine.server.app imports the debug console (engine.console.levels)"]


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
