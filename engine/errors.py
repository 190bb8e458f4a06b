"""The engine's errors. Everything the engine raises on purpose is an :class:`EngineError`
(the bus package, usable without the engine, has its own base: ``bus.BusError``).

EngineError
├── ConfigError          a bad config file or key (names the key and the problem)
├── DeviceError          a missing or unusable audio device (lists the devices)
├── NotRunning           no engine to talk to
├── RingError            engine.audio.ring: a ring whose header does not match (names the field)
├── WavAppendError       engine.audio.record: a speaker WAV that cannot be continued
├── ChildStateError      engine.supervisor.children: an illegal child state transition
├── PlayoutError         engine.realtime.playout: an illegal item transition
├── RequestError         engine.realtime.requests: an illegal response-slot transition
├── ServerError          engine.server.errors: the local server (ProtocolError, ScenarioError,
│                        VoiceError, ServeError)
├── PhoneProtocolError   engine.phone.twilio: a bad Media Streams message
├── ConsoleError         engine.console.relay: the console lost the bus or cannot listen
└── ResponseFailed       engine.api.client: an answer that will never come (socket or process died)
"""


class EngineError(Exception):
    """Base of the engine's errors."""


class ConfigError(EngineError):
    pass


class DeviceError(EngineError):
    pass


class NotRunning(EngineError):
    pass
