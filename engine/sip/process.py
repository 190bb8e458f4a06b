"""The SIP process: ``python -m engine.sip.process`` (the child of ``engine sip``): the webhook
endpoint and every call's control socket (:mod:`engine.sip.service`, :mod:`engine.sip.control`) in
one asyncio loop; the bus commands come in on a thread of their own. No audio passes here: the
calls' audio is between the caller and OpenAI."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from bus.client import deliver_to_loop

from engine.sip.service import BUS_TOPICS, SipService
from engine.errors import ConfigError
from engine.webhooks import WebhookError
from engine import child
from engine.specs import SipSpec


class SipProcess:
    def __init__(self, spec: SipSpec) -> None:
        self.spec = spec

    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        from bus import Publisher
        try:
            svc = SipService(self.spec, publisher=Publisher(self.spec.bus.publish, f"sip:{os.getpid()}"))
        except (WebhookError, ConfigError) as exc:   # no secret; sip.routes refused (an unpriced model…)
            pub = Publisher(self.spec.bus.publish, "sip")
            pub.join(self.spec.bus.subscribe)
            pub.publish("engine.error", {"source": "sip", "code": getattr(exc, "code", "bad_config"), "fatal": True,
                                         "message": f"engine sip cannot start: {exc}"})
            await asyncio.sleep(0.2)
            return child.EXIT_DEVICE_FAILED        # a setting, not a crash: the supervisor stops with the message
        try:
            from engine.sip.control import attach   # the calls' control sockets (the API link)
            svc.attacher = lambda run: attach(svc, run)
        except ImportError:
            svc.attacher = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, svc.stop.set)
        svc.pub.join(svc.sub_endpoint)
        stop = threading.Event()
        thread = threading.Thread(target=deliver_to_loop, args=(svc.sub_endpoint, BUS_TOPICS, loop, svc.on_bus, stop),
                                  name="bus", daemon=True)
        thread.start()
        try:
            await svc.listen()
        except OSError as exc:
            svc.error(None, "listen_failed", f"engine sip cannot listen on {svc.host}:{svc.port}: {exc.strerror}; "
                      "use --port 0 for a free port")
            await asyncio.sleep(0.2)
            return child.EXIT_DEVICE_FAILED
        svc.status_changed()          # the supervisor prints the URL
        try:
            await svc.serve_forever()
        finally:
            stop.set()
            thread.join(1.0)
            svc.pub.close()
        return 0


if __name__ == "__main__":
    sys.exit(child.main(SipProcess, SipSpec))
