"""Requests: what clients asked the model to hear or answer (``cmd.say``, tool outputs), and the
one response the conversation may have in progress. Pure: no I/O.

Rules:
- The API allows one in-band response at a time ("conversation_already_has_active_response"),
  so requests queue and are sent only while the slot is IDLE **and** the socket is up.
- A request is kept until the server acknowledges its item (``conversation.item.added`` with the
  item id we chose); a socket that closes first puts it back at the head of the queue, so it
  is sent again on the next socket, never lost. A duplicate of a request we still hold, or
  answered, is not queued twice.
- A response we asked for and did not see finish when the socket closed is reported failed,
  with the request id that asked for it, so no waiter hangs.
- Out-of-band responses (``conversation: "none"``) do not occupy the slot.
- What is held (queued, or sent and not acknowledged) is part of the state the realtime process
  publishes (:meth:`Requests.pending`), so its successor after a crash sends it
  (:meth:`Request.from_wire`); an input-buffer commit cannot be, its audio is in the dead session.

The response slot (``Slot``):

    IDLE      --response.create sent-->              REQUESTED
    REQUESTED --response.created-->                  ACTIVE
    IDLE      --response.created (server VAD)-->     ACTIVE
    REQUESTED --error for our response.create-->     IDLE
    ACTIVE    --response.done (same id)-->           IDLE
    any       --socket closed-->                     IDLE
"""
from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.errors import EngineError

#: request ids remembered for de-duplication
SEEN_IDS = 1024


class RequestError(EngineError):
    """An illegal slot transition; the slot is left as it was."""


class Slot(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    ACTIVE = "active"


TRANSITIONS: dict[tuple[Slot, str], Slot] = {
    (Slot.IDLE, "request"): Slot.REQUESTED,
    (Slot.REQUESTED, "created"): Slot.ACTIVE,
    (Slot.IDLE, "created"): Slot.ACTIVE,
    (Slot.REQUESTED, "refused"): Slot.IDLE,
    (Slot.ACTIVE, "done"): Slot.IDLE,
    (Slot.IDLE, "closed"): Slot.IDLE,
    (Slot.REQUESTED, "closed"): Slot.IDLE,
    (Slot.ACTIVE, "closed"): Slot.IDLE,
}


#: per-response options a request may carry (the GA ``response.create`` ``response`` fields), and ``speak``
RESPONSE_OPTIONS = ("instructions", "output_modalities", "conversation", "input", "metadata", "tool_choice",
                    "max_output_tokens", "speak")


def check_response_options(options: object) -> dict[str, object]:
    """Validate per-response options; ValueError naming the bad one and the known ones."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError("'response' must be a map of response options")
    for key, value in options.items():
        if key not in RESPONSE_OPTIONS:
            raise ValueError(f"unknown response option {key!r} (known: {', '.join(RESPONSE_OPTIONS)})")
        if key == "instructions" and not isinstance(value, str):
            raise ValueError("response option 'instructions' must be a string")
        if key == "output_modalities" and value not in (["audio"], ["text"]):
            raise ValueError("response option 'output_modalities' must be [audio] or [text]")
        if key == "conversation" and value not in ("auto", "none"):
            raise ValueError("response option 'conversation' must be 'auto' or 'none'")
        if key == "input" and not (isinstance(value, list) and all(isinstance(i, dict) for i in value)):
            raise ValueError("response option 'input' must be a list of conversation items")
        if key == "metadata" and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise ValueError("response option 'metadata' must be a map of strings")
        if key == "tool_choice" and not (value in ("auto", "none", "required") or
                                         (isinstance(value, dict) and isinstance(value.get("name"), str))):
            raise ValueError("response option 'tool_choice' must be auto, none, required or "
                             "{type: function, name: ...}")
        if key == "max_output_tokens" and not (value == "inf" or (isinstance(value, int) and not isinstance(value, bool)
                                                                  and 1 <= value <= 32768)):
            raise ValueError("response option 'max_output_tokens' must be 1..32768 or 'inf'")
        if key == "speak" and not isinstance(value, bool):
            raise ValueError("response option 'speak' must be true or false")
    return dict(options)


@dataclass
class Request:
    id: str
    text: str                     #: "" for a bare response request (e.g. after a tool output)
    role: str = "user"
    respond: bool = True
    source: str = ""
    item_id: str | None = None    #: the conversation item we create for it (set when first sent)
    options: dict[str, object] = field(default_factory=dict)  #: per-response options (instructions, ...)
    kind: str = "say"             #: say (an item, then maybe a response), commit (the input buffer), respond

    @property
    def out_of_band(self) -> bool:
        return self.options.get("conversation") == "none"

    def to_wire(self) -> dict[str, object]:
        """The request as the published state carries it."""
        return {"id": self.id, "text": self.text, "role": self.role, "respond": self.respond, "source": self.source,
                "item_id": self.item_id, "options": dict(self.options), "kind": self.kind}

    @classmethod
    def from_wire(cls, data: object) -> "Request | None":
        """A request from a predecessor's state; None when it is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not isinstance(data.get("text"), str):
            return None
        options = data.get("options")
        item_id = data.get("item_id")
        return cls(data["id"], data["text"], str(data.get("role") or "user"), bool(data.get("respond", True)),
                   str(data.get("source") or ""), item_id if isinstance(item_id, str) else None,
                   dict(options) if isinstance(options, dict) else {}, str(data.get("kind") or "say"))


class Requests:
    def __init__(self) -> None:
        self.slot = Slot.IDLE
        self.active_response: str | None = None
        self.requested_for: str | None = None           #: request id of the response.create in flight
        self.response_requests: dict[str, str] = {}     #: response id -> request id
        self.queue: deque[Request] = deque()
        self.awaiting_item: dict[str, Request] = {}      #: item id -> request, sent, not acknowledged
        self.awaiting_event: dict[str, Request] = {}     #: client event id -> request
        self.pending_commits: deque[Request] = deque()   #: input_audio_buffer.commit sent, not yet committed
        self.out_of_band: dict[str, Request] = {}        #: request id -> out-of-band request sent
        self.seen: OrderedDict[str, None] = OrderedDict()

    def _move(self, event: str) -> None:
        to = TRANSITIONS.get((self.slot, event))
        if to is None:
            raise RequestError(f"response slot: {event!r} in state {self.slot.value}")
        self.slot = to

    # ------------------------------------------------------------ queue
    def add(self, req: Request) -> bool:
        """Queue ``req``; False for a duplicate (same id seen before)."""
        if req.id in self.seen:
            return False
        self.seen[req.id] = None
        while len(self.seen) > SEEN_IDS:
            self.seen.popitem(last=False)
        self.queue.append(req)
        return True

    def add_front(self, req: Request) -> None:
        self.queue.appendleft(req)

    def pending(self) -> list[Request]:
        """What a crash now would lose: sent and not acknowledged (in the order sent), then queued."""
        sent = list({id(r): r for r in [*self.awaiting_item.values(), *self.pending_commits]}.values())
        return sent + [r for r in self.queue if r not in sent]

    def can_send(self, connected: bool) -> bool:
        return connected and bool(self.queue) and self.slot is Slot.IDLE

    def pop(self) -> Request:
        return self.queue.popleft()

    # ------------------------------------------------------------ slot
    def requested(self, req: Request, event_id: str) -> None:
        self._move("request")
        self.requested_for = req.id
        self.awaiting_event[event_id] = req

    def created(self, response_id: str, in_band: bool) -> str | None:
        """A response began; returns the request id that asked for it (None: the server's own, e.g. VAD)."""
        rid = None
        if self.slot is Slot.REQUESTED:
            rid = self.requested_for
            self.requested_for = None
        if in_band or self.slot is Slot.REQUESTED:
            self._move("created")
            self.active_response = response_id
        if rid is not None:
            self.response_requests[response_id] = rid
        return rid

    def done(self, response_id: str) -> str | None:
        """A response finished; returns the request id that asked for it."""
        if self.slot is Slot.ACTIVE and self.active_response == response_id:
            self._move("done")
            self.active_response = None
        return self.response_requests.pop(response_id, None)

    def committed(self) -> Request | None:
        """The server committed the input buffer: the oldest commit we asked for, if any."""
        req = self.pending_commits.popleft() if self.pending_commits else None
        if req is not None:
            for eid, r in list(self.awaiting_event.items()):
                if r is req and not req.respond:
                    del self.awaiting_event[eid]
        return req

    def refused(self, event_id: str) -> Request | None:
        """The server refused the client event ``event_id`` (an ``error`` naming it); returns its request."""
        req = self.awaiting_event.pop(event_id, None)
        if req is not None and req in self.pending_commits:
            self.pending_commits.remove(req)
        if req is not None and self.slot is Slot.REQUESTED and self.requested_for == req.id:
            self._move("refused")
            self.requested_for = None
        if req is not None and req.item_id is not None:
            self.awaiting_item.pop(req.item_id, None)
        return req

    def item_added(self, item_id: str) -> Request | None:
        """The server holds the item we created for a request: it is acknowledged."""
        req = self.awaiting_item.pop(item_id, None)
        if req is not None:
            for eid, r in list(self.awaiting_event.items()):
                if r is req and not req.respond:
                    del self.awaiting_event[eid]
        return req

    def socket_closed(self) -> list[tuple[str | None, str | None]]:
        """The socket closed. Unacknowledged requests go back to the queue's head (in order).
        Returns the answers lost: (response id or None if not begun, request id or None if the
        server began it by itself)."""
        lost: list[tuple[str | None, str | None]] = []
        if self.slot is Slot.REQUESTED and self.requested_for is not None:
            lost.append((None, self.requested_for))
        if self.slot is Slot.ACTIVE and self.active_response is not None:
            lost.append((self.active_response, self.response_requests.pop(self.active_response, None)))
        running = {req: resp for resp, req in self.response_requests.items()}
        lost.extend((running.get(req_id), req_id) for req_id in self.out_of_band)
        self.response_requests.clear()
        # sent but never acknowledged: sent again on the next socket, in the order they were sent
        resend = list({id(r): r for r in self.awaiting_item.values()}.values())
        for req in reversed(resend):
            self.queue.appendleft(req)
        requeued = {r.id for r in resend}
        lost = [(resp, req) for resp, req in lost if req is None or req not in requeued]
        self.awaiting_item.clear()
        self.awaiting_event.clear()
        self.pending_commits.clear()
        self.out_of_band.clear()
        self._move("closed")
        self.active_response = None
        self.requested_for = None
        return lost
