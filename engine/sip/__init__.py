"""``engine sip``: OpenAI's SIP calls (Realtime and GPT-Live) answered through signed webhooks.

- :mod:`engine.webhooks` (pure, shared with the local server's stand-in): Standard Webhooks
  signatures, the replay window, delivery de-duplication and the incoming-call envelopes.
- :mod:`engine.sip.calls` (pure): the accept policy (routes from config) and the state machine
  of each SIP call, one accept per call across its two webhooks.
"""
