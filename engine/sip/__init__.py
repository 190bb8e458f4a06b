"""``engine sip``: OpenAI's SIP calls (Realtime and GPT-Live) answered through signed webhooks.

- :mod:`engine.sip.webhooks` (pure): Standard Webhooks signatures, the replay window, delivery
  de-duplication and the envelope of the incoming-call events.
- :mod:`engine.sip.calls` (pure): the accept policy (routes from config) and the state machine
  of each SIP call, one accept per call across its two webhooks.
"""
