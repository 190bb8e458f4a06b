"""The engine's errors. Everything the engine raises on purpose is an :class:`EngineError`.

EngineError
├── ConfigError        a bad config file or key (names the key and the problem)
├── DeviceError        a missing or unusable audio device (lists the devices)
├── NotRunning         no engine to talk to
└── ProtocolViolation  the API spoke a protocol we do not (e.g. the retired beta)
"""


class EngineError(Exception):
    """Base of the engine's errors."""


class ConfigError(EngineError):
    pass


class DeviceError(EngineError):
    pass


class NotRunning(EngineError):
    pass


class ProtocolViolation(EngineError):
    pass
