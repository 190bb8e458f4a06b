"""The local server's errors, all under :class:`engine.errors.EngineError`.

ServerError (EngineError)
├── ProtocolError   a client event the server refuses (becomes an ``error`` event; the socket stays open)
├── ScenarioError   a scenario file that cannot be used (names the key and the problem)
├── VoiceError      espeak-ng is missing or failed
└── ServeError      ``engine serve`` cannot listen (names the address and what to do)
"""
from __future__ import annotations

from engine.errors import EngineError


class ServerError(EngineError):
    """Base of the local server's errors."""


class ServeError(ServerError):
    """``engine serve`` cannot start listening; the message says what to do."""
