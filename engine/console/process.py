"""The console as a child of the supervisor (``engine start --console``): its spec (one
JSON line on stdin, :class:`engine.specs.ConsoleSpec`) holds the bus endpoints (no signing key:
the console publishes only ``cmd.*``, and it holds no secret the page could leak), ``host``,
``port``, ``allowed_hosts``, ``session_dir`` and ``rings`` (the engine's ring names by kind: listen and talk attach
``listen`` and ``browser``). It dies with the supervisor like every child."""
from __future__ import annotations

import sys
from pathlib import Path

from bus import endpoints_from
from engine.console.relay import ConsoleError
from engine.console.server import ConsoleServer, run
from engine import child
from engine.specs import ConsoleSpec


class ConsoleProcess:
    def __init__(self, spec: ConsoleSpec) -> None:
        bus = {k: v for k, v in spec.bus.keys().items() if k != "signing_key"}
        session_dir = Path(spec.session_dir) if spec.session_dir else None
        self.server = ConsoleServer(endpoints_from(bus), host=spec.host, port=spec.port,
                                    sessions_base=session_dir.parent if session_dir else None,
                                    live_session=session_dir.name if session_dir else None,
                                    rings=spec.rings, allowed_hosts=spec.allowed_hosts)

    def run(self) -> int:
        try:
            return run(self.server)
        except ConsoleError as exc:
            print(f"realtalk: console: {exc}", file=sys.stderr, flush=True)
            return child.EXIT_DEVICE_FAILED   # a port that cannot be had: restarting would not help


if __name__ == "__main__":
    sys.exit(child.main(ConsoleProcess, ConsoleSpec))
