"""The car-rental agent's back office for SIP calls (`engine sip`): every call at once, on either API.

When a call is accepted (`sip.call.accepted`) it looks the caller's booking up by the number they
call from (the INVITE's From header: caller-supplied, so it picks a booking, it proves nothing) and
gives it to the model as context (`cmd.say role: system`: a system message on Realtime, silent
thinking on GPT-Live). It registers one tool, `collection_point`, for all calls, and answers each
`tool.call` (a Realtime function call, or a GPT-Live delegation) for whichever call asks.

    export OPENAI_WEBHOOK_SECRET=whsec_…
    engine sip --port 0                # prints http://127.0.0.1:PORT/openai/webhook
    python examples/car_rental_sip.py  # beside it; Ctrl-C to stop
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from typing import Any

from bus import Publisher, Subscriber, load_endpoints

BOOKINGS = {   # by the caller's number (digits)
    "15550001111": {"ref": "ZX9", "name": "Ada Lovelace", "car": "a blue Fiat 500", "pickup": "10:00",
                    "collection_point": "Northern Train Station, desk 4"},
    "15550002222": {"ref": "QK2", "name": "Alan Turing", "car": "a grey Volvo V60", "pickup": "14:30",
                    "collection_point": "Airport Terminal 2, level -1, bay 12"},
}
OWNER = f"car-rental-sip:{os.getpid()}"
TOOL = {"name": "collection_point", "description": "Where the caller collects their rental car.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}


def caller_number(headers: list[dict[str, str]]) -> str:
    frm = next((h["value"] for h in headers if h.get("name", "").lower() in ("from", "f")), "")
    m = re.search(r"(?:sips?|tel):\+?([0-9]+)", frm)
    return m.group(1) if m else ""


def main() -> int:
    ep = load_endpoints()
    sub = Subscriber(ep, ["sip.call.", "tool.call", f"_presence.{OWNER}"])  # the presence topic: "I serve tools"
    pub = Publisher(ep, OWNER)
    pub.join()
    bookings: dict[str, dict[str, Any]] = {}   # sip_call_id -> booking
    pub.publish("cmd.tool.register", {**TOOL, "owner": OWNER, "id": uuid.uuid4().hex})   # every call
    print("car-rental: serving SIP calls", flush=True)
    try:
        while True:
            msg = sub.recv(timeout_ms=1000)
            if msg is None:
                continue
            topic, body = msg
            call = body.get("sip_call_id")
            if topic == "sip.call.accepted":
                booking = BOOKINGS.get(caller_number(body.get("sip_headers") or []))
                bookings[call] = booking or {}
                text = (f"The caller is {booking['name']}, booking {booking['ref']}: {booking['car']}, pick-up at "
                        f"{booking['pickup']}." if booking else "The caller's booking was not found.")
                pub.publish("cmd.say", {"sip_call_id": call, "role": "system", "text": text, "respond": False,
                                        "id": uuid.uuid4().hex})
                print(f"car-rental: call {call} ({body.get('api')}): {text}", flush=True)
            elif topic == "sip.call.ended":
                bookings.pop(call, None)
                print(f"car-rental: call {call} ended ({body.get('how')}) after {body.get('duration_s')} s, "
                      f"${body.get('usd')}", flush=True)
            elif topic == "tool.call" and body.get("name") == TOOL["name"] and call:
                point = bookings.get(call, {}).get("collection_point", "the main desk")
                pub.publish("cmd.tool.result", {"sip_call_id": call, "call_id": body["call_id"],
                                                "output": json.dumps({"collection_point": point})})
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()
        pub.close()
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
