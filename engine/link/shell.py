"""The API link's I/O shell: one websocket (asyncio ``websockets``) between a protocol core and a
voice API. The decisions are the policy's (:mod:`engine.link.policy`: connecting, closes,
backoff, fatal failures, recycling) and the core's (what to send, publish, play); this module
opens the socket, reads it, and carries out what they decide.

Used by the engine's realtime process (one link, on its link thread's loop) and by the phone
bridge (a link per call, all on the bridge's loop). The host (:class:`LinkHost`) does what is
not the socket's: the audio out (a ring, a phone socket), the bus, the heard index.

Rules:
- One thread, one order. Everything runs on the loop that runs :meth:`ApiLink.run`: a record is
  handed to the core and every action it returns is applied, sends included, in the order
  decided (the host's audio out first: a ring write or a phone ``media`` waits for no bus
  message), before the next record is taken (:meth:`ApiLink.step`; a record a host hands in
  while those are applied waits for them). A send is written at once
  or queued behind the sends before it (:class:`engine.wsio.Outgoing`), never around them. So
  ``Connected``'s replay (config, tools, history) goes out before anything decided after it:
  a say that arrived during an outage, or just after the reconnect, follows the history.
- Each socket has its own writer. When a socket closes its writer is dropped with what waits in
  it, and the core gets ``Disconnected`` before any other record (the core settles what was in
  flight and sends it again on the next socket, after its replay).
- The input audio append is built in one place (:meth:`engine.link.backends.Backend.audio_append`).
- Timers: the core's next deadline (``Tick``) and the policy's recycle checks and backoff
  waits run on the same loop; a record never waits for a poll.
- A host callback or core that raises ends the link's run with that exception (the host
  decides what it ends: the call, the process); an exception in a timer goes to ``on_error``.
- A client event JSON cannot carry (msgpack binary, a NaN: the cores refuse such commands, so
  this is a bug) is not sent: one ``engine.error`` ``unsendable_event`` (not fatal) names it,
  and the link goes on. Never a crash: a realtime process that died on a held command would meet
  it again in every successor.
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import ssl
import time
from collections import deque
from typing import Any, Callable, Mapping, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from engine.link.backends import Backend, ProtocolCore
from engine.realtime.dialects import Dialect, DialectError
from engine.link.policy import (Cause, Close, Connect, ConnectFailure, Fatal, LinkAction, LinkPolicy, LinkRules,
                                LinkState, ToCore, Wait)
from engine.realtime.records import (Action, EndOfAudio, Ending, Flush, Input, MicAudio, Play, Publish, Reconnect, Send,
                                     SendAudio, ServerEvent, Tick)
from engine.wsio import Latency, Outgoing

CLOSE_TIMEOUT_S = 2.0          #: a clean close waits this long for the server's close frame
FOLLOW_MAX = 64                #: records a host may hand back from one step's actions (a loop guard)


class LinkHost(Protocol):
    """What a link's owner does for it (all on the link's loop)."""

    def heard_index(self, now_s: float) -> int:
        """The heard position of the audio out, in the core's frames (the speaker ring's, a call's marks)."""

    def perform(self, act: Play | Flush | EndOfAudio | Publish, now_s: float) -> Input | None:
        """Carry out an action that is not the socket's; may return a record to hand straight
        back to the core (a report the action produced: the phone's playback reports)."""

    def received(self, event: Mapping[str, Any], in_s: float) -> None:
        """A server event came in at ``in_s`` (monotonic s), before the core has it."""


class _ReachTimeout(ConnectionError):
    """The host was not reached (resolve, TCP, TLS) within the reach timeout."""


class _connect(connect):
    """websockets' ``connect``, with the way to the host bounded apart from the whole opening
    (policy rule 1: an unreachable host fails fast, a slow upgrade is waited for)."""

    def __init__(self, uri: str, *, reach_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self.reach_timeout_s = reach_timeout_s

    async def create_connection(self) -> ClientConnection:
        try:
            return await asyncio.wait_for(super().create_connection(), self.reach_timeout_s)
        except asyncio.TimeoutError:   # TimeoutError itself from Python 3.11
            raise _ReachTimeout(f"no answer from the host within {self.reach_timeout_s:g} s") from None


def classify(exc: BaseException, act: Connect) -> ConnectFailure:
    """What a failed connect's exception means (policy's :class:`Cause`), in the library's words."""
    if isinstance(exc, InvalidStatus):
        body = exc.response.body.decode(errors="replace") if exc.response.body else ""
        return ConnectFailure(Cause.HTTP, " ".join(body.split())[:200], exc.response.status_code)
    if isinstance(exc, InvalidURI):
        return ConnectFailure(Cause.BAD_URL, str(exc))
    if isinstance(exc, _ReachTimeout):
        return ConnectFailure(Cause.TIMEOUT, str(exc))
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ConnectFailure(Cause.TIMEOUT, f"the WebSocket upgrade was not answered within {act.open_timeout_s:g} s")
    if isinstance(exc, socket.gaierror):
        return ConnectFailure(Cause.DNS, str(exc))
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return ConnectFailure(Cause.TLS, getattr(exc, "reason", None) or str(exc))
    if isinstance(exc, ConnectionRefusedError) or (
            isinstance(exc, OSError) and "Connect call failed" in str(exc) and "[Errno 111]" in str(exc)):
        return ConnectFailure(Cause.REFUSED)   # asyncio joins one error per address (IPv6, IPv4) into one
    if isinstance(exc, InvalidHandshake):
        return ConnectFailure(Cause.HANDSHAKE, str(exc))
    if isinstance(exc, ValueError):            # websockets: an option the URL's scheme does not allow
        return ConnectFailure(Cause.BAD_URL, str(exc))
    return ConnectFailure(Cause.NETWORK, f"{type(exc).__name__}: {exc}")


class ApiLink:
    """One API socket for one protocol core (see the module's rules). ``run`` drives the socket's
    life until the link is stopped (None) or fails for good (the policy's :class:`Fatal`);
    ``step`` hands the core a record from elsewhere (a command, mic audio, a playback report)."""

    def __init__(self, backend: Backend, core: ProtocolCore, host: LinkHost, url: str,
                 headers: Mapping[str, str], rules: LinkRules, *, name: str = "api",
                 audio_latency: Latency | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 dialect: Dialect | None = None) -> None:
        self.backend = backend
        #: the provider's dialect, translated at the wire (engine.realtime.dialects): the core sees GA only
        self.dialect = dialect if dialect is not None else Dialect()
        self.core = core
        self.host = host
        self.url = url
        self.headers = dict(headers)
        self.policy = LinkPolicy(rules)
        self.name = name
        #: input audio: when it came in (``MicAudio.received_at_s``, else ``captured_at_s``) -> its append
        #: handed to the socket
        self.audio_latency = audio_latency if audio_latency is not None else Latency()
        self.on_error = on_error
        #: when the server event being handled came in (monotonic s); 0.0 outside one
        self.event_in_s = 0.0
        self.stuck = 0                 #: sockets ended because the API did not read what was sent
        self._ws: ClientConnection | None = None
        self._out: Outgoing | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._recycle_timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.Event | None = None
        self._opening: asyncio.Task[ClientConnection] | None = None
        self._closing: set[asyncio.Task[None]] = set()   #: clean closes under way (held: tasks are weakly kept)
        self._stepping = False                          #: a step is applying its actions
        self._held: deque[Input] = deque()              #: records handed in meanwhile, in order
        self._stepped: asyncio.Event | None = None      #: while end_session waits: set after each step

    @property
    def connected(self) -> bool:
        """A socket is up and the core has had its ``Connected``."""
        return self._out is not None

    # ------------------------------------------------------------ the core
    def step(self, rec: Input) -> None:
        """Hand ``rec`` to the core and apply every action it decided, in order; then the
        records those actions produced (the host's reports), each the same way. A record handed
        in while a step applies its actions (a host that reacts to a publish by stepping) waits
        until they are all applied: the core never decides between a decision and its sends."""
        if self._stepping:
            self._held.append(rec)
            return
        self._stepping = True
        try:
            self._step(rec)
            while self._held:
                self._step(self._held.popleft())
        finally:
            self._stepping = False
            self._held.clear()
            if self._stepped is not None:
                self._stepped.set()

    async def end_session(self, timeout_s: float) -> None:
        """The host is ending: the core closes a session that must be closed for its last figures
        (``Ending``: GPT-Live's ``session.close``, whose ``session.closed`` brings the last usage and
        proves the session finalized); wait until it has, at most ``timeout_s``. Nothing to wait
        for on Realtime, or with no session."""
        stepped = self._stepped = asyncio.Event()
        deadline = time.monotonic() + timeout_s
        try:
            self.step(Ending())
            while self.core.ending:   # each step may be the one that took the close's answer
                stepped.clear()
                await asyncio.wait_for(stepped.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:   # (not the builtin before Python 3.11)
            pass
        finally:
            self._stepped = None

    def _step(self, rec: Input) -> None:
        core, host = self.core, self.host
        now = time.monotonic()
        acts = core.handle(rec, now, host.heard_index(now))
        follow = self._apply(acts, now, (rec.captured_at_s if rec.received_at_s is None else rec.received_at_s)
                             if isinstance(rec, MicAudio) else now)
        handled = 0
        while follow and handled < FOLLOW_MAX:
            handled += 1
            r = follow.popleft()
            now = time.monotonic()
            follow.extend(self._apply(core.handle(r, now, host.heard_index(now)), now, now))
        if not isinstance(rec, MicAudio):   # mic audio (50 a second) moves no deadline
            self._schedule()

    def _apply(self, acts: list[Action], now: float, since_s: float) -> deque[Input]:
        """The audio out first (the ring, the phone: it waits for nothing on the bus), then the
        sends and publishes; each in the order decided."""
        follow: deque[Input] = deque()
        host = self.host
        for act in acts:
            if isinstance(act, (Play, Flush, EndOfAudio)):
                r = host.perform(act, now)
                if r is not None:
                    follow.append(r)
        for act in acts:
            if isinstance(act, SendAudio):
                out = self._out
                if out is not None and not out.put(self.backend.audio_append(act.pcm), since_s, self.audio_latency):
                    self._api_stuck()
            elif isinstance(act, Send):
                out = self._out
                if out is None:
                    continue   # no socket: the core settles it when it hears Disconnected
                wire = self.dialect.outgoing(act.event)
                text = None if wire is None else self._encoded(wire, now)
                if wire is not None and text is None:
                    continue   # reported; not sent, so not published as sent
                if text is not None and not out.put(text):
                    self._api_stuck()
                r = self.host.perform(Publish("client." + act.event["type"], act.event), now)
                if r is not None:
                    follow.append(r)
            elif isinstance(act, Publish):
                r = host.perform(act, now)
                if r is not None:
                    follow.append(r)
            elif isinstance(act, Reconnect):
                if self.policy.state in (LinkState.OPEN, LinkState.RECYCLING):
                    self._carry_out(self.policy.recycle(now, act.reason))
        return follow

    def _encoded(self, wire: Mapping[str, Any], now: float) -> str | None:
        """``wire`` as JSON text; None, reported (``unsendable_event``), when JSON cannot carry it."""
        try:
            return json.dumps(wire, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            self.host.perform(Publish("engine.error", {
                "source": "engine", "code": "unsendable_event", "fatal": False, "event_type": str(wire.get("type")),
                "message": f"the client event {wire.get('type')!r} was not sent: JSON cannot carry it "
                           f"({type(exc).__name__}: {exc}); the conversation goes on"}), now)
            return None

    def _api_stuck(self) -> None:
        """The API has not read what was sent (the writer's queue is full): end this socket; the
        policy reconnects as after any drop."""
        ws, out = self._ws, self._out
        if ws is not None and out is not None:
            self.stuck += 1
            waiting = out.queue.qsize()
            out.close(drop=True)
            self._out = None
            ws.transport.abort()
            self.host.perform(Publish("engine.error", {"source": "socket", "code": "send_stuck", "message":
                                                       f"the API at {self.policy.rules.url} did not read what was "
                                                       f"sent ({waiting} messages waiting): reconnecting"}),
                              time.monotonic())

    def _carry_out(self, acts: list[LinkAction]) -> None:
        """The policy's actions that take no waiting: the core's records, reports, a clean close."""
        for act in acts:
            if isinstance(act, ToCore):
                self.step(act.record)
            elif isinstance(act, Publish):
                self.host.perform(act, time.monotonic())
            elif isinstance(act, Close):
                ws = self._ws
                if ws is not None:
                    task = asyncio.get_running_loop().create_task(ws.close(act.code, act.reason))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------ timers
    def _schedule(self) -> None:
        due = self.core.next_deadline()
        if due is None or due >= self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_due = None, math.inf
        self._guarded(self.step, Tick())

    def _arm_recycle(self) -> None:
        at = self.policy.recycle_check_s
        if at is None or self.policy.state is not LinkState.OPEN:
            return
        self._recycle_timer = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()),
                                                                    self._on_recycle_timer)

    def _on_recycle_timer(self) -> None:
        self._recycle_timer = None

        def check() -> None:
            self._carry_out(self.policy.tick(time.monotonic(), self.core.at_turn_boundary()))
            self._arm_recycle()
        self._guarded(check)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a timer's failure is the host's to report
            if self.on_error is None:
                raise
            self.on_error(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._recycle_timer):
            if timer is not None:
                timer.cancel()
        self._timer, self._timer_due, self._recycle_timer = None, math.inf, None

    # ------------------------------------------------------------ the socket's life
    async def run(self) -> Fatal | None:
        """Open, read, reopen as the policy says, until a stop (None) or a fatal failure."""
        self._wake = asyncio.Event()
        if self.policy.final:
            return None   # stopped before it ran (a call that ended at once)
        pending: deque[LinkAction] = deque(self.policy.start(time.monotonic()))
        try:
            while pending:
                act = pending.popleft()
                if isinstance(act, Connect):
                    pending.extend(await self._session(act))
                elif isinstance(act, Wait):
                    await self._sleep_until(act.until_s)
                    pending.extend(self.policy.due(time.monotonic()))
                elif isinstance(act, Fatal):
                    return act
                else:
                    self._carry_out([act])
            return None
        finally:
            self._cancel_timers()
            ws = self._ws
            if ws is not None:
                ws.transport.abort()
            if self._out is not None:
                self._out.close(drop=True)
            self._ws = self._out = None

    def stop(self) -> None:
        """End the link: an open socket is closed (the core hears ``Disconnected``), a connect in
        flight or a backoff's wait is cut short; ``run`` then returns None."""
        if self.policy.final:
            return
        self._carry_out(self.policy.stop())
        self._cancel_timers()
        if self._opening is not None:
            self._opening.cancel()
        if self._wake is not None:
            self._wake.set()

    async def _sleep_until(self, until_s: float) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), max(0.0, until_s - time.monotonic()))
        except asyncio.TimeoutError:
            pass

    async def _session(self, act: Connect) -> list[LinkAction]:
        """One socket: open it, hand the core ``Connected``, read until it closes; the policy's
        next actions (``Disconnected`` for the core first)."""
        async def open_socket() -> ClientConnection:
            return await _connect(self.url, reach_timeout_s=act.reach_timeout_s, additional_headers=self.headers,
                                  open_timeout=act.open_timeout_s, close_timeout=CLOSE_TIMEOUT_S, max_size=None,
                                  ping_interval=None, compression=None)
        opening = self._opening = asyncio.get_running_loop().create_task(open_socket(), name=f"open {self.name}")
        try:
            ws = await opening
        except asyncio.CancelledError:
            if self.policy.state is LinkState.STOPPED and opening.cancelled():
                return []   # stopped while connecting
            opening.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - websockets and the socket layer raise many types
            return self.policy.failed(classify(exc, act), time.monotonic())
        finally:
            self._opening = None
        acts = self.policy.opened(time.monotonic())
        if self.policy.state is not LinkState.OPEN:   # stopped while connecting
            await ws.close(1000, "stopping")
            return []
        self._ws, self._out = ws, Outgoing(self.name)
        self._out.start(ws)
        # the core's replay is applied (and written or queued) here, before any other record is taken
        self._carry_out(acts)
        self._arm_recycle()
        code, reason = await self._read(ws)
        if self._recycle_timer is not None:
            self._recycle_timer.cancel()
            self._recycle_timer = None
        if self._out is not None:
            self._out.close(drop=True)
        self._ws = self._out = None
        return self.policy.closed(code, reason, time.monotonic(), self.core.protocol_refused)

    async def _read(self, ws: ClientConnection) -> tuple[int | None, str]:
        """Hand every server event to the core until the socket closes; the close frame's code and
        reason (None: there was none)."""
        why = ""
        try:
            async for message in ws:
                in_s = time.monotonic()
                try:
                    event = json.loads(message)
                    if not isinstance(event, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    self.host.perform(Publish("engine.error", {"source": "api", "code": "bad_server_message",
                                                               "message": f"unparseable server message: {exc}"}), in_s)
                    continue
                self.event_in_s = in_s
                self.host.received(event, in_s)
                try:
                    for ga in self.dialect.incoming(event, in_s):
                        self.step(ServerEvent(ga))
                except DialectError as exc:
                    self.host.perform(Publish("engine.error", {"source": "api", "code": "unknown_server_event",
                                                               "provider": self.dialect.provider,
                                                               "message": str(exc)}), in_s)
                finally:
                    self.event_in_s = 0.0
        except ConnectionClosed as exc:
            cause = exc.__cause__
            why = f"{type(cause).__name__}: {cause}" if cause is not None else ""
        rcvd = ws.protocol.close_rcvd
        if rcvd is None:
            return None, why
        return rcvd.code, rcvd.reason
