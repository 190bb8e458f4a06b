"""The API link: the one websocket between a protocol core and a voice API, used by the engine's
realtime process and by every phone call of the phone bridge.

- :mod:`engine.link.policy` (pure, no I/O): when to connect, what a close means, which failures
  are fatal, the backoff, when to recycle a session. Rules and its transition table at its top.
- :mod:`engine.link.backends` (pure): which protocol core a model uses and how that protocol
  carries input audio (the one place the audio append is built).
- :mod:`engine.link.shell` (I/O, asyncio ``websockets``): opens the socket, reads it, hands every
  record to the core and applies its actions in the order decided, schedules the core's timers
  and the policy's waits.
"""
