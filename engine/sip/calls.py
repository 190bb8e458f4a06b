"""The accept policy and the state machine of each SIP call. Pure: webhooks in, decisions out.

One incoming call raises two webhooks, ``realtime.call.incoming`` (``rtc_…``) and
``live.transport.incoming`` (``live_…``), and the first successful accept picks the API. Both
carry the same INVITE headers, so the call is keyed by its SIP ``Call-ID``
(:attr:`engine.webhooks.Incoming.call_key`).

The call's machine (``STATES``: (state, event) -> allowed next states)::

    OFFERED --accept--> ACCEPTING --accepted--> ACCEPTED --attached--> ATTACHED --ended--> ENDED
       |                    |                      |                      |
       |                    +--accept_failed--> FAILED (rule 6)           +--detached--> ACCEPTED
       +--reject--> REJECTING --rejected--> REJECTED (a failed reject: FAILED)
       +--missed--> FAILED            (the route's API never offered the call; rule 6)
    ACCEPTED/ATTACHED --ended--> ENDED (hang-up, transfer, the caller hung up, an error)

Rules:

1. A call is decided once, by the first webhook of it that the policy can act on: accept on the
   route's API, or reject (486 over capacity, the route's or ``no_route_status`` 404/603 with no
   route). Every later webhook of the same call (the other API's, or a retry with a new id) is
   ignored: never a second accept, never a reject of an accepted call.
2. A webhook for the API the route does not use waits: the call stays OFFERED until the route's
   API offers it (OFFER_WAIT_S), then it is FAILED (``missed``: the endpoint is not subscribed to
   that event type). When the route's API offers it in time, capacity is checked again: over it,
   that webhook is rejected 486.
3. Routes match on what the INVITE says, in order; the first match wins. ``to`` compares the
   called number's digits (the To header's user part); ``header`` matches one header's value
   (exact, or ``regex``). An empty ``match`` matches every call. SIP headers are caller-controlled:
   they route calls, they never authorise anything.
4. Capacity counts calls ACCEPTING, ACCEPTED and ATTACHED.
5. A handler checks first and changes state last; an event a state does not allow raises
   :class:`SipStateError` (a bug in the caller of this module).
6. A call that FAILED before its accept is never left ringing: its ``reject`` (503: on the API it
   was accepted on when the accept failed, unless the API said the call is gone; on the API that
   offered it when missed) is the decision that goes with the transition. Its outcome changes
   nothing: FAILED is final.
7. Route models must be priced (a call's cost and ``budget_usd`` are counted from
   engine/pricing.json): checked when the routes are parsed.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from engine.cost import check_priced
from engine.errors import ConfigError, EngineError
from engine.webhooks import Incoming

OFFER_WAIT_S = 3.0            #: how long a call offered on the other API waits for the route's API
ENDED_KEEP = 1000             #: finished calls remembered (a late duplicate webhook is still recognised)
APIS = ("realtime", "live")
REJECT_NO_ROUTE = (404, 603)
REJECT_BUSY = 486
REJECT_UNAVAILABLE = 503      #: a call the engine could not take: its accept failed, its route's API never offered it
ACCEPT_GONE = (404, 410)      #: a failed accept's statuses that say the call is gone: nothing to reject
DEFAULT_MODELS = {"realtime": "gpt-realtime", "live": "gpt-live-1"}


class SipStateError(EngineError):
    """A transition the call's table does not allow."""


class State(str, enum.Enum):
    OFFERED = "offered"
    ACCEPTING = "accepting"
    ACCEPTED = "accepted"
    ATTACHED = "attached"
    REJECTING = "rejecting"
    REJECTED = "rejected"
    ENDED = "ended"
    FAILED = "failed"


S = State
STATES: dict[tuple[State, str], frozenset[State]] = {
    (S.OFFERED, "accept"): frozenset({S.ACCEPTING}),
    (S.OFFERED, "reject"): frozenset({S.REJECTING}),
    (S.OFFERED, "missed"): frozenset({S.FAILED}),
    (S.ACCEPTING, "accepted"): frozenset({S.ACCEPTED}),
    (S.ACCEPTING, "accept_failed"): frozenset({S.FAILED}),
    (S.REJECTING, "rejected"): frozenset({S.REJECTED}),
    (S.REJECTING, "reject_failed"): frozenset({S.FAILED}),
    (S.ACCEPTED, "attached"): frozenset({S.ATTACHED}),
    (S.ATTACHED, "detached"): frozenset({S.ACCEPTED}),
    (S.ACCEPTED, "ended"): frozenset({S.ENDED}),
    (S.ATTACHED, "ended"): frozenset({S.ENDED}),
}
LIVE_STATES = frozenset({S.ACCEPTING, S.ACCEPTED, S.ATTACHED})   #: counted against max_calls
FINAL = frozenset({S.REJECTED, S.ENDED, S.FAILED})


# ---------------------------------------------------------------------------------------- routes
@dataclass(frozen=True)
class Route:
    """What to do with a call that matches: its API and session, or a reject status."""
    name: str
    api: str = "realtime"
    model: str = ""
    instructions: str | None = None
    voice: str | None = None
    tools: tuple[dict[str, Any], ...] = ()        #: Realtime: function tools on the voice model
    delegation: dict[str, Any] | None = None      #: GPT-Live: client / responses / decisions
    greeting: str | None = None                   #: said first: Realtime response.create, Live commentary
    reject: int | None = None                     #: reject matching calls with this status instead
    to: str | None = None                         #: match: the called number's digits
    header: tuple[str, str | None, re.Pattern[str] | None] | None = None   #: match: (name, value, regex)

    def matches(self, call: Incoming) -> bool:
        if self.to is not None and called_number(call) != self.to:
            return False
        if self.header is not None:
            name, value, regex = self.header
            low = name.lower()
            values = [v for k, v in call.sip_headers if k.lower() == low]
            if value is not None and value not in values:
                return False
            if regex is not None and not any(regex.search(v) for v in values):
                return False
            if not values:
                return False
        return True

    def accept_body(self) -> dict[str, Any]:
        """The accept request's JSON body. Never an audio format: the SIP side negotiates it (G.711
        or Opus), and a pinned format breaks the carrier's audio."""
        if self.api == "realtime":
            body: dict[str, Any] = {"type": "realtime", "model": self.model}
            if self.instructions is not None:
                body["instructions"] = self.instructions
            if self.voice is not None:
                body["audio"] = {"output": {"voice": self.voice}}
            if self.tools:
                body["tools"] = [dict(t) for t in self.tools]
            return body
        session: dict[str, Any] = {"type": "live", "model": self.model}
        if self.instructions is not None:
            session["instructions"] = self.instructions
        if self.voice is not None:
            session["audio"] = {"output": {"voice": self.voice}}
        if self.delegation is not None:
            session["delegation"] = dict(self.delegation)
        return {"session": session}


def called_number(call: Incoming) -> str | None:
    """The digits of the To header's user part (``<sip:+1 555 0100@host>`` -> ``15550100``)."""
    to = call.header("To") or call.header("t")
    if not to:
        return None
    m = re.search(r"(?:sips?|tel):([^@;>]+)", to)
    user = m.group(1) if m else to
    digits = re.sub(r"\D", "", user)
    return digits or user.strip()


_ROUTE_KEYS = {"match", "api", "model", "instructions", "voice", "tools", "delegation", "greeting", "reject"}


def parse_routes(sip_cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[Route]:
    """``sip.routes`` from config as :class:`Route` s; :class:`ConfigError` names the key at fault.
    ``defaults``: ``model``, ``instructions``, ``voice`` for routes that leave them out."""
    raw = sip_cfg.get("routes") or []
    if not isinstance(raw, list):
        raise ConfigError("sip.routes: expected a list of routes")
    out = []
    for i, r in enumerate(raw):
        where = f"sip.routes[{i}]"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: expected a mapping with 'match' and 'api'")
        unknown = set(r) - _ROUTE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_ROUTE_KEYS)}")
        api = r.get("api", "realtime")
        if api not in APIS:
            raise ConfigError(f"{where}.api: {api!r}; use 'realtime' or 'live'")
        match = r.get("match") or {}
        if not isinstance(match, dict) or set(match) - {"to", "header"}:
            raise ConfigError(f"{where}.match: expected {{to: NUMBER}} and/or {{header: {{name, value|regex}}}}")
        to = None
        if "to" in match:
            to = re.sub(r"\D", "", str(match["to"])) or str(match["to"])
        header = None
        if "header" in match:
            h = match["header"]
            if not isinstance(h, dict) or not isinstance(h.get("name"), str) or not ("value" in h or "regex" in h):
                raise ConfigError(f"{where}.match.header: expected {{name: HEADER, value: TEXT}} or "
                                  "{name: HEADER, regex: PATTERN}")
            try:
                regex = re.compile(h["regex"]) if "regex" in h else None
            except re.error as exc:
                raise ConfigError(f"{where}.match.header.regex: {exc}") from None
            header = (h["name"], str(h["value"]) if "value" in h else None, regex)
        reject = r.get("reject")
        if reject is not None and (not isinstance(reject, int) or not 300 <= reject <= 699):
            raise ConfigError(f"{where}.reject: a SIP status 300-699 (486 busy, 404 not found, 603 decline)")
        model = r.get("model") or (defaults.get("model") if _api_of(defaults.get("model")) == api else None) \
            or DEFAULT_MODELS[api]
        if _api_of(model) != api:
            raise ConfigError(f"{where}.model: {model!r} is not a {api} model (GPT-Live models are gpt-live-*; "
                              "set api to match)")
        if reject is None:
            try:
                check_priced(model)
            except ConfigError as exc:
                raise ConfigError(f"{where}.model: {exc}") from None
        tools = r.get("tools") or []
        if tools and api != "realtime":
            raise ConfigError(f"{where}.tools: GPT-Live has no tools on the voice model; use 'delegation'")
        delegation = r.get("delegation")
        if delegation is not None and api != "live":
            raise ConfigError(f"{where}.delegation: only GPT-Live routes delegate; Realtime routes use 'tools'")
        if delegation is not None and (not isinstance(delegation, dict) or "type" not in delegation):
            raise ConfigError(f"{where}.delegation: expected {{type: client|responses|decisions, …}}")
        out.append(Route(name=str(r.get("name", i)), api=api, model=model,
                         instructions=r.get("instructions", defaults.get("instructions")),
                         voice=r.get("voice", defaults.get("voice")),
                         tools=tuple({"type": "function", **{k: v for k, v in t.items() if k != "type"}}
                                     for t in tools),
                         delegation=delegation, greeting=r.get("greeting"), reject=reject, to=to, header=header))
    return out


def _api_of(model: Any) -> str | None:
    if not isinstance(model, str) or not model:
        return None
    return "live" if model.startswith("gpt-live-") else "realtime"


# ---------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Accept:
    key: str
    api: str
    id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Reject:
    key: str
    api: str
    id: str
    status: int
    why: str


@dataclass(frozen=True)
class Ignore:
    why: str


@dataclass(frozen=True)
class Missed:
    key: str
    why: str
    reject: Reject | None = None          #: the reject that stops its ringing (on the API that offered it)


Decision = Accept | Reject | Ignore | Missed


@dataclass
class SipCall:
    key: str
    route: Route | None
    first: Incoming
    offered_s: float
    state: State = State.OFFERED
    api: str | None = None                 #: the API it is accepted (or rejected) on
    id: str | None = None                  #: its id on that API
    ids: dict[str, str] = field(default_factory=dict)   #: api -> id, every offer seen
    how: str | None = None                 #: how it ended (final states)
    status: int | None = None              #: reject status, or the failed request's HTTP status
    reject: Reject | None = None           #: FAILED before its accept: the reject that stops its ringing (rule 6)

    def go(self, event: str, new: State) -> None:
        if new not in STATES.get((self.state, event), frozenset()):
            raise SipStateError(f"SIP call {self.key}: {event!r} is not allowed in {self.state.value}")
        self.state = new


class CallTable:
    """Every SIP call this process has seen, and the policy that decides them (module rules)."""

    def __init__(self, routes: list[Route], max_calls: int, no_route_status: int = 404) -> None:
        if no_route_status not in REJECT_NO_ROUTE:
            raise ConfigError(f"sip.no_route_status: {no_route_status}; use 404 (not found) or 603 (decline)")
        self.routes = routes
        self.max_calls = max_calls
        self.no_route_status = no_route_status
        self.calls: dict[str, SipCall] = {}
        self.by_id: dict[str, str] = {}         #: rtc_/live_ id -> call key
        self._finished: list[str] = []

    @property
    def active(self) -> int:
        return sum(1 for c in self.calls.values() if c.state in LIVE_STATES)

    def route_for(self, call: Incoming) -> Route | None:
        return next((r for r in self.routes if r.matches(call)), None)

    def offer(self, inc: Incoming, now_s: float) -> Decision:
        """A verified, de-duplicated incoming-call webhook."""
        known = self.calls.get(inc.call_key)
        if known is not None:
            if inc.api in known.ids and known.ids[inc.api] != inc.id:
                return Ignore(f"a second {inc.api} id for call {inc.call_key}")
            known.ids[inc.api] = inc.id
            self.by_id[inc.id] = known.key
            if known.state is State.OFFERED and known.route is not None and known.route.api == inc.api:
                if self.active >= self.max_calls:    # the calls accepted while it waited: rule 2
                    busy = Reject(known.key, inc.api, inc.id, REJECT_BUSY, f"over capacity ({self.max_calls} calls)")
                    known.go("reject", State.REJECTING)
                    known.api, known.id, known.status = inc.api, inc.id, REJECT_BUSY
                    return busy
                known.go("accept", State.ACCEPTING)
                known.api, known.id = inc.api, inc.id
                return Accept(known.key, inc.api, inc.id, known.route.accept_body())
            return Ignore(f"call already {known.state.value}" + (f" on {known.api}" if known.api else ""))
        route = self.route_for(inc)
        call = SipCall(inc.call_key, route, inc, now_s, ids={inc.api: inc.id})
        if route is None or route.reject is not None:
            status = route.reject if route is not None and route.reject is not None else self.no_route_status
            why = f"route {route.name} rejects" if route is not None else "no route matches"
            decision: Decision = Reject(call.key, inc.api, inc.id, status, why)
            call.go("reject", State.REJECTING)
        elif self.active >= self.max_calls:
            decision = Reject(call.key, inc.api, inc.id, REJECT_BUSY, f"over capacity ({self.max_calls} calls)")
            call.go("reject", State.REJECTING)
        elif route.api != inc.api:
            decision = Ignore(f"route {route.name} answers on {route.api}: waiting for its webhook")
        else:
            decision = Accept(call.key, inc.api, inc.id, route.accept_body())
            call.go("accept", State.ACCEPTING)
        if isinstance(decision, (Accept, Reject)):
            call.api, call.id = inc.api, inc.id
        if isinstance(decision, Reject):
            call.status = decision.status
        self.calls[call.key] = call
        self.by_id[inc.id] = call.key
        return decision

    def tick(self, now_s: float) -> list[Missed]:
        """Calls still waiting for their route's API past OFFER_WAIT_S are given up and rejected on
        the API that offered them (rules 2, 6)."""
        out = []
        for call in list(self.calls.values()):
            if call.state is State.OFFERED and now_s - call.offered_s >= OFFER_WAIT_S:
                api = call.route.api if call.route else "?"
                why = (f"route {call.route.name if call.route else '?'} answers on {api}, but only "
                       f"{', '.join(call.ids)} offered the call: subscribe the webhook endpoint to "
                       f"{'realtime.call.incoming' if api == 'realtime' else 'live.transport.incoming'}")
                offered_api, offered_id = next(iter(call.ids.items()))
                reject = Reject(call.key, offered_api, offered_id, REJECT_UNAVAILABLE, why)
                call.go("missed", State.FAILED)
                call.how, call.reject = "missed", reject
                self._finish(call)
                out.append(Missed(call.key, why, reject))
        return out

    def next_deadline(self) -> float | None:
        waits = [c.offered_s + OFFER_WAIT_S for c in self.calls.values() if c.state is State.OFFERED]
        return min(waits) if waits else None

    def get(self, key_or_id: str) -> SipCall | None:
        return self.calls.get(key_or_id) or self.calls.get(self.by_id.get(key_or_id, ""))

    # outcomes of the requests the decisions asked for
    def accepted(self, key: str) -> SipCall:
        call = self.calls[key]
        call.go("accepted", State.ACCEPTED)
        return call

    def accept_failed(self, key: str, status: int | None, why: str) -> SipCall:
        """The accept failed: FAILED, with the reject that stops its ringing (``call.reject``, rule
        6), none when the API said the call is gone."""
        call = self.calls[key]
        reject = None if status in ACCEPT_GONE or call.api is None or call.id is None else \
            Reject(key, call.api, call.id, REJECT_UNAVAILABLE, f"the accept failed: {why}")
        call.go("accept_failed", State.FAILED)
        call.status, call.how, call.reject = status, f"accept_failed: {why}", reject
        self._finish(call)
        return call

    def rejected(self, key: str, ok: bool, why: str = "") -> SipCall:
        call = self.calls[key]
        call.go("rejected" if ok else "reject_failed", State.REJECTED if ok else State.FAILED)
        call.how = "rejected" if ok else f"reject_failed: {why}"
        self._finish(call)
        return call

    def attached(self, key: str) -> SipCall:
        call = self.calls[key]
        call.go("attached", State.ATTACHED)
        return call

    def detached(self, key: str) -> SipCall:
        call = self.calls[key]
        if call.state is State.ATTACHED:
            call.go("detached", State.ACCEPTED)
        return call

    def ended(self, key: str, how: str) -> SipCall | None:
        """The call is over (``how``: hangup, transferred, caller_hangup, error…); None if it was already."""
        call = self.calls.get(key)
        if call is None or call.state in FINAL:
            return None
        call.go("ended", State.ENDED)
        call.how = how
        self._finish(call)
        return call

    def _finish(self, call: SipCall) -> None:
        """Keep a bounded tail of finished calls, so a late duplicate of their webhooks is still ignored."""
        self._finished.append(call.key)
        while len(self._finished) > ENDED_KEEP:
            old = self.calls.pop(self._finished.pop(0), None)
            if old is not None:
                for i in old.ids.values():
                    self.by_id.pop(i, None)
