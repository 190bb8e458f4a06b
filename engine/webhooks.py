"""Standard Webhooks, as OpenAI signs its deliveries, and the incoming-call envelopes. Pure.

Rules (the SDK's ``openai/lib/_webhooks.py`` is the reference; a test checks both agree):

- A delivery carries ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
  ``webhook-signature`` (space-separated ``v1,<base64>`` entries; any match accepts it).
- The key is the base64 decoding of the secret after ``whsec_``; a secret without that prefix is
  used as its UTF-8 bytes. The signed message is ``"{id}.{timestamp}." + raw body``: the raw
  bytes as received, never a re-serialisation.
- A timestamp more than TOLERANCE_S in the past or in the future is refused.
- A ``webhook-id`` already seen (within DEDUP_WINDOW_S) is a duplicate: answered, not acted on.
- The secret comes from the environment (``OPENAI_WEBHOOK_SECRET``) only, never from disk or the
  bus, and nothing here logs it or a body.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from engine.errors import EngineError

SECRET_ENV = "OPENAI_WEBHOOK_SECRET"
TOLERANCE_S = 300                 #: the SDK's default tolerance, both ways
DEDUP_WINDOW_S = 2 * TOLERANCE_S  #: an id older than this cannot pass the timestamp check again anyway
DEDUP_MAX = 100_000               #: ids remembered at most (oldest forgotten first)

REALTIME_INCOMING = "realtime.call.incoming"
LIVE_INCOMING = "live.transport.incoming"
LIVE_INCOMING_DEPRECATED = "live.call.incoming"
#: incoming-call event type -> the API it is accepted on
INCOMING_TYPES = {REALTIME_INCOMING: "realtime", LIVE_INCOMING: "live", LIVE_INCOMING_DEPRECATED: "live"}


class WebhookError(EngineError):
    """A delivery that is refused: ``code`` says why (``missing_header``, ``bad_timestamp``,
    ``stale``, ``future``, ``bad_signature``, ``no_secret``, ``bad_body``); the message never
    holds the body or the secret."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def secret_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """The webhook secret (``OPENAI_WEBHOOK_SECRET``), or :class:`WebhookError` naming the fix."""
    secret = environ.get(SECRET_ENV, "")
    if not secret:
        raise WebhookError("no_secret", f"${SECRET_ENV} is not set: copy the endpoint's signing secret "
                           "(whsec_…) from the project's webhook settings into it")
    _key(secret)
    return secret


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[6:], validate=True)
        except (binascii.Error, ValueError):
            raise WebhookError("no_secret", f"${SECRET_ENV} starts with whsec_ but the rest is not base64") from None
    else:
        key = secret.encode()
    if not key:
        raise WebhookError("no_secret", f"${SECRET_ENV} is empty after decoding")
    return key


def signature(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``v1,<base64>`` signature of ``body`` (what OpenAI sends, and the local stand-in)."""
    mac = hmac.new(_key(secret), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signed_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for a delivery of ``body``."""
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, webhook_id, timestamp, body)}


def _header(headers: Mapping[str, str], name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    raise WebhookError("missing_header", f"the delivery has no {name} header (not a Standard Webhooks delivery)")


def verify(secret: str, headers: Mapping[str, str], body: bytes, now_s: float,
           tolerance_s: int = TOLERANCE_S) -> str:
    """Check one delivery; returns its ``webhook-id``. Raises :class:`WebhookError` when it is
    missing a header, outside the replay window, or signed with another key."""
    webhook_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    sig_header = _header(headers, "webhook-signature")
    try:
        ts = int(stamp)
    except ValueError:
        raise WebhookError("bad_timestamp", "webhook-timestamp is not whole Unix seconds") from None
    now = int(now_s)
    if now - ts > tolerance_s:
        raise WebhookError("stale", f"webhook-timestamp is {now - ts} s old (more than {tolerance_s} s): a replay, "
                           "or this machine's clock is wrong")
    if ts - now > tolerance_s:
        raise WebhookError("future", f"webhook-timestamp is {ts - now} s in the future (more than {tolerance_s} s): "
                           "check this machine's clock")
    expected = signature(secret, webhook_id, stamp, body)[3:]
    given = [part[3:] if part.startswith("v1,") else part for part in sig_header.split()]
    if not any(hmac.compare_digest(expected, g) for g in given):
        raise WebhookError("bad_signature", "no webhook-signature entry matches: the delivery was not signed with "
                           f"${SECRET_ENV} (a forgery, or the secret was rotated)")
    return webhook_id


class Dedup:
    """Delivery ids seen recently. ``seen(id, now_s)`` is True for a repeat (and remembers new ids);
    ids older than ``window_s`` and the oldest past ``max_ids`` are forgotten, so memory is bounded."""

    def __init__(self, window_s: float = DEDUP_WINDOW_S, max_ids: int = DEDUP_MAX) -> None:
        self.window_s = window_s
        self.max_ids = max_ids
        self._ids: OrderedDict[str, float] = OrderedDict()

    def seen(self, webhook_id: str, now_s: float) -> bool:
        while self._ids:
            oldest, at = next(iter(self._ids.items()))
            if now_s - at <= self.window_s and len(self._ids) < self.max_ids:
                break
            self._ids.popitem(last=False)
        if webhook_id in self._ids:
            return True
        self._ids[webhook_id] = now_s
        return False

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(frozen=True)
class Incoming:
    """An incoming SIP call as one webhook announced it."""
    api: str                              #: "realtime" | "live": which API this delivery offers the call on
    id: str                               #: ``call_id`` (rtc_…) or ``session_id`` (live_…): the accept path's id
    event_id: str                         #: the event's ``id`` (evt_…)
    event_type: str
    created_at: int
    sip_headers: tuple[tuple[str, str], ...]   #: (name, value) as sent: order and repeats kept; untrusted
    media_security: str | None            #: "srtp", "rtp", another string (unknown), or None

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        low = name.lower()
        return next((v for k, v in self.sip_headers if k.lower() == low), None)

    @property
    def call_key(self) -> str:
        """What the call's two webhooks have in common: the INVITE's ``Call-ID`` (compact form ``i``),
        or else all its headers."""
        cid = self.header("Call-ID") or self.header("i")
        if cid:
            return "call-id:" + cid
        return "headers:" + json.dumps(self.sip_headers)


def parse_incoming(body: bytes) -> Incoming | str:
    """The incoming call a verified body announces, or the event's type when it is not an incoming
    call (a delivery to answer 200 and leave). :class:`WebhookError` ``bad_body`` for a body that is
    not a webhook event."""
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookError("bad_body", "the body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise WebhookError("bad_body", "the body is not a webhook event (no 'type')")
    etype = event["type"]
    api = INCOMING_TYPES.get(etype)
    if api is None:
        return etype
    data = event.get("data")
    if not isinstance(data, dict):
        raise WebhookError("bad_body", f"{etype} has no 'data' object")
    id_field = "call_id" if api == "realtime" else "session_id"
    call_id = data.get(id_field)
    if not isinstance(call_id, str) or not call_id:
        raise WebhookError("bad_body", f"{etype} has no data.{id_field}")
    raw_headers: Any = data.get("sip_headers") or []
    if not isinstance(raw_headers, list):
        raise WebhookError("bad_body", f"{etype}: data.sip_headers is not a list")
    headers = tuple((str(h.get("name", "")), str(h.get("value", ""))) for h in raw_headers if isinstance(h, dict))
    sec = data.get("sip_media_security")
    created = event.get("created_at")
    return Incoming(api=api, id=call_id, event_id=str(event.get("id") or ""), event_type=etype,
                    created_at=int(created) if isinstance(created, (int, float)) else 0,
                    sip_headers=headers, media_security=sec if isinstance(sec, str) else None)
