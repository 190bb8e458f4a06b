"""Writing to a websockets (asyncio) connection from a plain callback, shared by the console's page
sockets and the phone bridge's sockets: no await, so no task and no extra turn of the event loop."""
from __future__ import annotations

from websockets.asyncio.connection import Connection
from websockets.protocol import State


def keeps_up(ws: Connection) -> bool:
    """Open, and its transport's write buffer not over the high-water mark (the connection's
    ``write_limit``): a message can be written at once with websockets' documented synchronous
    ``broadcast`` to this one connection, without piling up behind a peer that does not read."""
    transport = ws.transport
    return ws.state is State.OPEN and not transport.is_closing() \
        and transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]
