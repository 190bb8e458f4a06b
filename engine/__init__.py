"""realtalk: a multi-process realtime voice engine for the OpenAI Realtime API.

Python API (over the bus): :func:`create_session`, :func:`connect`, :class:`Session`;
the event log: :class:`EventLog`. Errors: :class:`EngineError` and its subclasses.
"""
from engine.errors import ConfigError, DeviceError, EngineError, NotRunning

__all__ = ["create_session", "connect", "Session", "Reply", "EventLog", "EngineError", "ConfigError",
           "DeviceError", "NotRunning", "ResponseFailed"]


def __getattr__(name: str):  # lazy: the processes import engine.* without the client's dependencies
    if name in ("create_session", "connect", "Session", "Reply", "ResponseFailed"):
        from engine.api import client
        return getattr(client, name)
    if name == "EventLog":
        from engine.api.eventlog import EventLog
        return EventLog
    raise AttributeError(name)
