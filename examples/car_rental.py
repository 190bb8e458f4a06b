"""The car-rental agent's back office, serving every phone call of `engine phone` at once.

For each call it feeds the caller's booking to the model as context when the call starts
(from the Media Streams `start` message's customParameters: `booking`), and answers the model's
"where is the collection point?" through a tool, for whichever call asks.

    engine phone --port 0            # prints ws://127.0.0.1:PORT/twilio
    python examples/car_rental.py    # beside it; Ctrl-C to stop
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

from bus import Publisher, Subscriber, load_endpoints

BOOKINGS = {
    "ZX9": {"name": "Ada Lovelace", "car": "a blue Fiat 500", "pickup": "10:00",
            "collection_point": "Northern Train Station, desk 4"},
    "QK2": {"name": "Alan Turing", "car": "a grey Volvo V60", "pickup": "14:30",
            "collection_point": "Airport Terminal 2, level -1, bay 12"},
}
OWNER = f"car-rental:{os.getpid()}"
TOOL = {"name": "collection_point", "description": "Where the caller collects their rental car.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}


def main() -> int:
    ep = load_endpoints()
    sub = Subscriber(ep, ["phone.call.", "tool.call", f"_presence.{OWNER}"])  # the presence topic: "I serve tools"
    pub = Publisher(ep, OWNER)
    pub.join()
    bookings: dict[str, dict[str, Any]] = {}   # phone_call_id -> booking
    # one registration serves every call, present and future (no phone_call_id)
    pub.publish("cmd.tool.register", {**TOOL, "owner": OWNER, "id": uuid.uuid4().hex})
    print("car-rental: serving calls", flush=True)
    try:
        while True:
            msg = sub.recv(timeout_ms=1000)
            if msg is None:
                continue
            topic, body = msg
            call = body.get("phone_call_id")
            if topic == "phone.call.started":
                ref = (body.get("custom_parameters") or {}).get("booking", "")
                booking = BOOKINGS.get(ref)
                bookings[call] = booking or {}
                text = (f"The caller is {booking['name']}, booking {ref}: {booking['car']}, pick-up at "
                        f"{booking['pickup']}." if booking else f"The caller's booking {ref!r} was not found.")
                pub.publish("cmd.say", {"phone_call_id": call, "role": "system", "text": text,
                                        "id": uuid.uuid4().hex})
                print(f"car-rental: call {call}: {text}", flush=True)
            elif topic == "phone.call.ended":
                bookings.pop(call, None)
                print(f"car-rental: call {call} ended after {body.get('duration_s')} s, ${body.get('usd')}", flush=True)
            elif topic == "tool.call" and body.get("name") == TOOL["name"]:
                point = bookings.get(call, {}).get("collection_point", "the main desk")
                pub.publish("cmd.tool.result", {"phone_call_id": call, "call_id": body["call_id"],
                                                "output": json.dumps({"collection_point": point})})
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()
        pub.close()
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
