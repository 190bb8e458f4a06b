"""The SIP accept policy and the call machine: one accept per call across its two webhooks."""
from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.sip.calls import (OFFER_WAIT_S, STATES, Accept, Ignore, Missed, Reject, SipStateError, State)
from tests.helpers import sip_offer as offer
from tests.helpers import sip_table as table



def test_accept_on_the_routes_api_and_ignore_the_other_webhook_either_order() -> None:
    for first in ("realtime", "live"):
        t = table([{"match": {"to": "+1 555 0100"}, "api": "realtime"}])
        second = "live" if first == "realtime" else "realtime"
        d1, d2 = t.offer(offer(first), 0.0), t.offer(offer(second), 0.1)
        accepts = [d for d in (d1, d2) if isinstance(d, Accept)]
        assert len(accepts) == 1 and accepts[0].api == "realtime" and accepts[0].id == "rtc_abc"
        assert accepts[0].body == {"type": "realtime", "model": "gpt-realtime", "instructions": "Be brief.",
                                   "audio": {"output": {"voice": "marin"}}}
        assert isinstance(d1 if d2 is accepts[0] else d2, Ignore)
        t.accepted(accepts[0].key)
        assert isinstance(t.offer(offer(second), 0.2), Ignore)   # retried deliveries never accept again


def test_live_route_body_is_wrapped_with_type_live_and_no_audio_format() -> None:
    t = table([{"api": "live", "model": "gpt-live-1", "delegation": {"type": "client"}}])
    d = t.offer(offer("live"), 0)
    assert isinstance(d, Accept)
    assert d.body == {"session": {"type": "live", "model": "gpt-live-1", "instructions": "Be brief.",
                                  "audio": {"output": {"voice": "marin"}}, "delegation": {"type": "client"}}}


def test_header_match_and_first_route_wins() -> None:
    t = table([{"match": {"header": {"name": "X-Tenant", "value": "acme"}}, "api": "live"},
               {"match": {"header": {"name": "x-tenant", "regex": "^glob"}}, "api": "realtime", "voice": "cedar"},
               {"match": {"to": "999"}, "reject": 603}])
    assert isinstance(t.offer(offer("live", "1", **{"X-Tenant": "acme"}), 0), Accept)
    d = t.offer(offer("realtime", "2", **{"X-TENANT": "globex"}), 0)
    assert isinstance(d, Accept) and d.body["audio"]["output"]["voice"] == "cedar"
    d = t.offer(offer("realtime", "3", to="<tel:999>"), 0)
    assert isinstance(d, Reject) and d.status == 603


def test_no_route_rejects_with_the_configured_status_once() -> None:
    t = table([{"match": {"to": "1"}}], no_route=603)
    d = t.offer(offer("live"), 0)
    assert isinstance(d, Reject) and (d.status, d.api, d.id) == (603, "live", "live_abc")
    assert isinstance(t.offer(offer("realtime"), 0), Ignore)
    t.rejected(d.key, True)
    assert (c := t.get("rtc_abc")) is not None and c.state is State.REJECTED
    with pytest.raises(ConfigError):
        table([], no_route=500)


def test_over_capacity_is_486_and_capacity_frees_when_a_call_ends() -> None:
    t = table([{}], max_calls=1)
    a = t.offer(offer("realtime", "1"), 0)
    assert isinstance(a, Accept)
    b = t.offer(offer("realtime", "2"), 0)
    assert isinstance(b, Reject) and b.status == 486
    t.accepted(a.key)
    t.attached(a.key)
    assert t.ended(a.key, "hangup") is not None and t.ended(a.key, "hangup") is None
    assert isinstance(t.offer(offer("realtime", "3"), 0), Accept)


def test_a_call_offered_only_on_the_other_api_is_given_up_with_the_fix() -> None:
    t = table([{"api": "live"}])
    assert isinstance(t.offer(offer("realtime"), 0), Ignore)
    assert t.next_deadline() == OFFER_WAIT_S
    assert t.tick(OFFER_WAIT_S - 0.1) == []
    [m] = t.tick(OFFER_WAIT_S)
    assert isinstance(m, Missed) and "live.transport.incoming" in m.why
    assert (c := t.get("rtc_abc")) is not None and c.state is State.FAILED


def test_failed_accept_is_final_and_the_table_refuses_bad_transitions() -> None:
    t = table([{}])
    a = t.offer(offer("realtime"), 0)
    assert isinstance(a, Accept)
    call = t.accept_failed(a.key, 404, "call_id_not_found")
    assert call.state is State.FAILED and "call_id_not_found" in (call.how or "")
    with pytest.raises(SipStateError):
        t.attached(a.key)
    assert all(isinstance(k[0], State) for k in STATES)


@pytest.mark.parametrize("route,word", [({"api": "phone"}, "api"), ({"api": "live", "model": "gpt-realtime"}, "model"),
                                        ({"api": "live", "tools": [{"name": "x"}]}, "tools"),
                                        ({"delegation": {"type": "client"}}, "delegation"),
                                        ({"reject": 200}, "reject"), ({"colour": 1}, "colour"),
                                        ({"match": {"header": {"name": "X"}}}, "header"),
                                        ({"match": {"header": {"name": "X", "regex": "("}}}, "regex")])
def test_bad_routes_name_the_key(route: dict, word: str) -> None:
    with pytest.raises(ConfigError) as err:
        table([route])
    assert "sip.routes[0]" in str(err.value) and word in str(err.value)


def test_realtime_tools_become_function_tools() -> None:
    t = table([{"tools": [{"name": "booking", "description": "d", "parameters": {"type": "object"}}]}])
    d = t.offer(offer("realtime"), 0)
    assert isinstance(d, Accept)
    assert d.body["tools"] == [{"type": "function", "name": "booking", "description": "d",
                                "parameters": {"type": "object"}}]
