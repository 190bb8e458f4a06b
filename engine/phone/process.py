"""The phone process: ``python -m engine.phone.process`` (a child of ``engine start --phone`` /
``engine phone``): the Media Streams bridge of :mod:`engine.phone.bridge` in one asyncio loop,
a core per call; the bus commands come in on a thread of their own."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from bus import Publisher
from bus.client import deliver_to_loop
from engine.errors import ConfigError
from engine.phone.bridge import BUS_TOPICS, PhoneBridge
from engine import child
from engine.specs import PhoneSpec


class PhoneProcess:
    def __init__(self, spec: PhoneSpec) -> None:
        self.spec = spec

    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        pub = Publisher(self.spec.bus.publish, f"phone:{os.getpid()}")
        pub.join(self.spec.bus.subscribe)
        try:
            bridge = PhoneBridge(self.spec, publisher=pub)
        except ConfigError as exc:   # phone.auth cannot be met: restarting would not help (exit 3: FATAL)
            pub.publish("engine.error", {"source": "phone", "code": "config", "message": str(exc), "fatal": True})
            await asyncio.sleep(0.2)
            pub.close()
            return child.EXIT_DEVICE_FAILED
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop.set)
        stop = threading.Event()
        thread = threading.Thread(target=deliver_to_loop, args=(bridge.sub_endpoint, BUS_TOPICS, loop, bridge.on_bus, stop),
                                  name="bus", daemon=True)
        thread.start()
        try:
            url = await bridge.listen()
        except OSError as exc:
            bridge.error(None, "listen_failed", f"the phone bridge cannot listen on {bridge.host}:{bridge.port}: "
                         f"{exc.strerror}; use --port 0 for a free port")
            await asyncio.sleep(0.2)
            return child.EXIT_DEVICE_FAILED
        bridge.publish(None, "phone.status", bridge.status())  # the supervisor prints the URL
        del url
        try:
            await bridge.serve_forever()
        finally:
            stop.set()
            thread.join(1.0)
            bridge.pub.close()
        return 0


if __name__ == "__main__":
    sys.exit(child.main(PhoneProcess, PhoneSpec))
