"""The phone port's guard, pure: Twilio's request validation, the token, the per-connection limits,
admission at start, and the rate-limited error reports (engine/phone/guard.py); the protocol
machine's errors naming the field and the value (engine/phone/twilio.py)."""
from __future__ import annotations

import json

import pytest

from engine.errors import ConfigError
from engine.phone.guard import (Auth, ConnectionGuard, ErrorSampler, GuardState, Limits, auth_from_config,
                                check_upgrade, signed_urls, twilio_signature, twilio_signature_ok, url_variants)
from engine.phone.twilio import PhoneProtocolError, StreamState, TwilioStream

pytestmark = pytest.mark.timeout(5)

# Reference values computed with twilio-python 9.13.0's RequestValidator("12345").compute_signature(url, {})
# (an independent implementation of Twilio's algorithm; not a dependency of the project)
TWILIO_VECTORS = {
    "wss://phone.example.com/twilio": "XCT1PhKOJZeW8bhPIV5CzPf+51M=",
    "wss://phone.example.com:443/twilio": "jRhTF4fxeRuBMVwse0aFYwJfkEQ=",
    "ws://127.0.0.1:8766/twilio": "p9VXty3BNEyiIGW+qyCFo/CbdAo=",
    "wss://phone.example.com/twilio?token=x&a=b": "zrWNc9mhOZg+vCifZc7DTID8+BA=",
}
START = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
         "start": {"streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound"],
                   "customParameters": {"booking": "ZX9"},
                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


# ================================================================ Twilio's signature
@pytest.mark.parametrize("url,signature", TWILIO_VECTORS.items())
def test_the_signature_is_twilio_pythons(url: str, signature: str) -> None:
    assert twilio_signature("12345", url) == signature


def test_the_signature_is_checked_with_and_without_the_port_as_twilio_python_does() -> None:
    sig = TWILIO_VECTORS["wss://phone.example.com/twilio"]
    # twilio-python's validate() says True for these three, False for the other two
    for url in ("wss://phone.example.com/twilio", "wss://phone.example.com:443/twilio",
                "wss://phone.example.com:8443/twilio"):
        assert twilio_signature_ok("12345", sig, url_variants(url)), url
    for url in ("ws://phone.example.com/twilio", "wss://phone.example.com/twilio2"):
        assert not twilio_signature_ok("12345", sig, url_variants(url)), url
    # signed with :443, requested without: accepted (twilio-python adds :80 for wss, a slip we do not copy)
    assert twilio_signature_ok("12345", TWILIO_VECTORS["wss://phone.example.com:443/twilio"],
                               url_variants("wss://phone.example.com/twilio"))
    assert not twilio_signature_ok("12345", None, url_variants("wss://phone.example.com/twilio"))
    assert not twilio_signature_ok("other-token", sig, url_variants("wss://phone.example.com/twilio"))


def test_the_signed_url_is_the_public_url_or_the_host_header() -> None:
    assert signed_urls("wss://phone.example.com/twilio", "10.0.0.5:8766", "/twilio?a=b")[0] == \
        "wss://phone.example.com/twilio?a=b"
    urls = signed_urls(None, "127.0.0.1:8766", "/twilio")
    assert "wss://127.0.0.1:8766/twilio" in urls and "ws://127.0.0.1:8766/twilio" in urls
    assert signed_urls(None, None, "/twilio") == []


def test_an_upgrade_is_refused_without_a_good_signature_or_token() -> None:
    auth = Auth("twilio", "12345", "wss://phone.example.com/twilio")
    good = {"X-Twilio-Signature": TWILIO_VECTORS["wss://phone.example.com/twilio"]}
    assert check_upgrade(auth, good, "/twilio").authenticated
    assert check_upgrade(auth, {}, "/twilio").status == 403
    assert check_upgrade(auth, {"X-Twilio-Signature": "AAAA"}, "/twilio").status == 403
    assert check_upgrade(auth, good, "/twilio?x=1").status == 403          # another URL than was signed
    host = Auth("twilio", "12345")                                         # no public_url: the Host header
    assert check_upgrade(host, {"Host": "127.0.0.1:8766",
                                "X-Twilio-Signature": TWILIO_VECTORS["ws://127.0.0.1:8766/twilio"]},
                         "/twilio").authenticated
    tok = Auth("token", "s3cret")
    assert check_upgrade(tok, {}, "/twilio?token=s3cret").authenticated
    assert check_upgrade(tok, {}, "/twilio?token=nope").status == 403
    later = check_upgrade(tok, {}, "/twilio")                              # may come in start.customParameters
    assert later.status is None and not later.authenticated
    assert check_upgrade(Auth("none"), {}, "/twilio").authenticated
    from websockets.datastructures import Headers
    twice = Headers([("X-Twilio-Signature", TWILIO_VECTORS["wss://phone.example.com/twilio"])] * 2)
    assert check_upgrade(auth, twice, "/twilio").status == 403              # given twice: refused, not a crash


def test_auth_comes_from_the_environment_and_none_only_on_loopback() -> None:
    auth = auth_from_config({"auth": "twilio"}, {"TWILIO_AUTH_TOKEN": "12345"})
    assert auth.mode == "twilio" and auth.secret == "12345" and "12345" not in repr(auth)
    with pytest.raises(ConfigError, match=r"\$TWILIO_AUTH_TOKEN is empty"):
        auth_from_config({"auth": "twilio"}, {})
    assert auth_from_config({"auth": "token", "token_env": "MY_TOKEN"}, {"MY_TOKEN": "t"}).secret == "t"
    with pytest.raises(ConfigError, match=r"\$REALTALK_PHONE_TOKEN is empty"):
        auth_from_config({"auth": "token"}, {})
    assert auth_from_config({"auth": "none", "host": "127.0.0.1"}, {}).mode == "none"
    with pytest.raises(ConfigError, match="only allowed on a loopback address"):
        auth_from_config({"auth": "none", "host": "0.0.0.0"}, {})
    with pytest.raises(ConfigError, match="phone.public_url"):
        auth_from_config({"auth": "twilio", "public_url": "https://x/twilio"}, {"TWILIO_AUTH_TOKEN": "1"})


# ================================================================ one connection's limits
LIMITS = Limits(max_frame_bytes=1000, max_messages_per_s=10, start_timeout_s=5, idle_timeout_s=30)


def test_max_calls_is_held_at_start_and_a_refusal_says_why() -> None:
    g = ConnectionGuard(LIMITS, 0.0)
    assert g.start(True, calls=4, max_calls=5) is None and g.state is GuardState.ADMITTED
    full = ConnectionGuard(LIMITS, 0.0).start(True, calls=5, max_calls=5)
    assert full is not None and (full.code, full.close_code) == ("at_capacity", 1013) and "5 calls" in full.reason
    stranger = ConnectionGuard(LIMITS, 0.0).start(False, calls=0, max_calls=5)
    assert stranger is not None and (stranger.code, stranger.close_code) == ("unauthenticated", 1008)


def test_a_socket_that_sends_no_start_is_closed_and_an_idle_one_too() -> None:
    g = ConnectionGuard(LIMITS, 0.0)
    assert g.deadline() == 5.0 and g.tick(4.9) is None
    closed = g.tick(5.0)
    assert closed is not None and closed.code == "start_timeout" and "5 s" in closed.reason
    assert g.deadline() is None and g.tick(99.0) is None
    g = ConnectionGuard(LIMITS, 0.0)
    g.frame(1.0)
    g.start(True, 0, 5)
    assert g.deadline() == 31.0 and g.tick(30.9) is None
    g.frame(30.9)                                       # a frame moves the idle deadline
    assert g.tick(31.0) is None
    idle = g.tick(60.9)
    assert idle is not None and idle.code == "idle_timeout"


def test_more_messages_than_the_rate_close_the_socket() -> None:
    g = ConnectionGuard(LIMITS, 0.0)
    g.start(True, 0, 5)
    for i in range(100):                                # 10 a second, for 10 s: within the rate
        assert g.frame(i * 0.1) is None
    verdicts = [g.frame(20.0) for _ in range(11)]       # a burst of 11 at once: one second's worth passes
    assert verdicts[:10] == [None] * 10
    last = verdicts[10]
    assert last is not None and (last.code, last.close_code) == ("rate_limited", 1008)
    assert g.state is GuardState.CLOSED and g.frame(30.0) is None


# ================================================================ reports
def test_errors_are_reported_at_most_once_a_second_with_the_count_and_an_example() -> None:
    s = ErrorSampler(1.0)
    first = s.note("not_json", "a frame that is not JSON: 'x'", 0.0)
    assert first is not None and first.count == 1
    for i in range(1, 1000):                            # 1,000 junk frames in the same second: none goes out
        assert s.note("not_json" if i % 2 else "unknown_event", f"junk {i}", i * 0.0009) is None
    assert s.due_s() == 1.0 and s.flush(0.95) is None
    late = s.flush(1.0)
    assert late is not None and late.count == 999 and late.message == "junk 1" and late.code == "not_json"
    assert s.total == 1000 and s.reports == 2 and s.due_s() is None
    fatal = s.note("media_format", "start.mediaFormat.sampleRate: 'abc' is not an integer", 5.1, fatal=True)
    assert fatal is not None and fatal.fatal and fatal.code == "media_format"   # a fatal one goes at once


def test_the_sampler_over_5000_junk_frames_lets_through_one_a_second() -> None:
    s = ErrorSampler(1.0)
    reports = [r for i in range(5000) if (r := s.note("not_json", "x", i * 0.001)) is not None]
    assert len(reports) == 5 and sum(r.count for r in reports) + s.pending == 5000


# ================================================================ errors name the field and the value
def _start_with(**fmt: object) -> str:
    msg = json.loads(json.dumps(START))
    msg["start"]["mediaFormat"].update(fmt)
    return json.dumps(msg)


@pytest.mark.parametrize("text,code,message", [
    (_start_with(sampleRate="abc"), "media_format", "start.mediaFormat.sampleRate: 'abc' is not an integer"),
    (_start_with(sampleRate=16000), "media_format", "start.mediaFormat.sampleRate: 16000 is not 8000"),
    (_start_with(channels=[2]), "media_format", "start.mediaFormat.channels: [2] is not an integer"),
    (_start_with(encoding="audio/l16"), "media_format", "start.mediaFormat.encoding: 'audio/l16' is not"),
    (json.dumps({"event": "start", "start": {"callSid": "CA1"}}), "missing_field", "start.streamSid: missing"),
    (json.dumps({"event": "start", "start": {"streamSid": 5, "callSid": "CA1"}}), "missing_field",
     "start.streamSid: 5 is not a non-empty string"),
    (json.dumps({"event": "start", "start": "x"}), "missing_field", "start: a string, not an object"),
    (json.dumps({"event": "start", "start": {"streamSid": "M", "callSid": "C", "customParameters": "token=s3"}}),
     "missing_field", "start.customParameters: a string, not an object"),
])
def test_a_bad_start_names_the_field_and_the_value(text: str, code: str, message: str) -> None:
    s = TwilioStream()
    with pytest.raises(PhoneProtocolError) as err:
        s.receive(text)
    assert err.value.code == code and err.value.fatal and s.state is StreamState.OPEN
    assert str(err.value).startswith(message), str(err.value)
    assert "s3" not in str(err.value)                   # a custom parameter's value is never shown


@pytest.mark.parametrize("text,code,message", [
    ("{not json", "not_json", "a frame that is not JSON (at character 1): '{not json'"),
    ("[" * 100_000, "not_json", "a frame that is not JSON"),              # nested past the parser's depth
    (b"\xff\xfe", "not_json", "a frame that is not JSON (at character 0): b'\\xff\\xfe'"),
    ("[1]", "not_an_object", "a Media Streams message is a JSON object, not a list: [1]"),
    ('{"event": "hello"}', "unknown_event", "event: 'hello' is not one of connected, dtmf"),
    ('{"foo": 1}', "unknown_event", "event: missing"),
    ('{"event": "media", "media": {"payload": "AA=="}}', "out_of_order",
     "event: 'media' cannot come while the stream is open (before its 'start')"),
])
def test_a_bad_frame_names_what_is_wrong_and_shows_it_cut_short(text: str, code: str, message: str) -> None:
    s = TwilioStream()
    with pytest.raises(PhoneProtocolError) as err:
        s.receive(text)
    assert err.value.code == code and not err.value.fatal
    assert str(err.value).startswith(message), str(err.value)
    assert len(str(err.value)) < 200


def test_bad_media_and_digits_name_the_field() -> None:
    s = TwilioStream()
    s.receive(json.dumps(START))
    with pytest.raises(PhoneProtocolError, match=r"^media.payload: '\*\*\*' is not base64$"):
        s.receive(json.dumps({"event": "media", "media": {"payload": "***"}}))
    with pytest.raises(PhoneProtocolError, match=r"^media.payload: missing"):
        s.receive(json.dumps({"event": "media", "media": {}}))
    with pytest.raises(PhoneProtocolError, match=r"^dtmf.digit: 'x' is not one of"):
        s.receive(json.dumps({"event": "dtmf", "dtmf": {"digit": "x"}}))
    big = "A" * 10_000 + "*"
    with pytest.raises(PhoneProtocolError) as err:
        s.receive(json.dumps({"event": "media", "media": {"payload": big}}))
    assert len(str(err.value)) < 120 and "characters" in str(err.value)


def test_the_config_refuses_auth_none_off_loopback_and_a_public_url_that_is_not_a_websocket() -> None:
    from engine.config import load_config
    assert load_config(None, {"phone.auth": "none"})["phone"]["auth"] == "none"     # 127.0.0.1 by default
    with pytest.raises(ConfigError, match="only allowed on a loopback address"):
        load_config(None, {"phone.auth": "none", "phone.host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="is not one of: twilio, token, none"):
        load_config(None, {"phone.auth": "off"})
    with pytest.raises(ConfigError, match="phone.public_url"):
        load_config(None, {"phone.public_url": "https://phone.example.com/twilio"})
    with pytest.raises(ConfigError, match="phone.max_frame_bytes"):
        load_config(None, {"phone.max_frame_bytes": 10})


def test_twilio_auth_off_loopback_needs_the_public_url() -> None:
    """With no phone.public_url the signed URL is built from the request's Host header: a signature
    Twilio made for another application of the account (wss://other.example.com/twilio, which never
    expires) was taken here with Host: other.example.com (the trust review)."""
    with pytest.raises(ConfigError, match="phone.public_url"):
        auth_from_config({"auth": "twilio", "host": "0.0.0.0"}, {"TWILIO_AUTH_TOKEN": "1"})
    on_lan = auth_from_config({"auth": "twilio", "host": "0.0.0.0", "public_url": "wss://phone.example.com/twilio"},
                              {"TWILIO_AUTH_TOKEN": "1"})
    assert on_lan.public_url == "wss://phone.example.com/twilio"
    assert auth_from_config({"auth": "twilio", "host": "127.0.0.1"}, {"TWILIO_AUTH_TOKEN": "1"}).public_url is None
