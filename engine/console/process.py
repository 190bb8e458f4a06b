"""The console as a child of the supervisor (``engine start --console``): its spec (one
JSON line on stdin) holds the bus endpoints (no signing key: the console publishes only
``cmd.*``, and it holds no secret the page could leak), ``console`` {``host``, ``port``, ``allowed_hosts``},
``session_dir`` and ``rings`` (the engine's ring names by kind: listen and talk attach
``listen`` and ``browser``). It dies with the supervisor like every child."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bus import endpoints_from
from engine.console.relay import ConsoleError
from engine.console.server import ConsoleServer, run
from engine.supervisor import child
from engine.supervisor.child import DEVICE_FAILED


class ConsoleProcess:
    def __init__(self, spec: dict[str, Any]) -> None:
        bus = {k: v for k, v in spec["bus"].items() if k != "signing_key"}
        opts = spec.get("console") or {}
        session_dir = Path(spec["session_dir"]) if spec.get("session_dir") else None
        self.server = ConsoleServer(endpoints_from(bus), host=opts.get("host", "127.0.0.1"),
                                    port=int(opts.get("port", 0)),
                                    sessions_base=session_dir.parent if session_dir else None,
                                    live_session=session_dir.name if session_dir else None,
                                    rings=spec.get("rings"), allowed_hosts=opts.get("allowed_hosts") or ())

    def run(self) -> int:
        try:
            return run(self.server)
        except ConsoleError as exc:
            print(f"realtalk: console: {exc}", file=sys.stderr, flush=True)
            return DEVICE_FAILED   # a port that cannot be had: restarting would not help


if __name__ == "__main__":
    sys.exit(child.main(ConsoleProcess))
