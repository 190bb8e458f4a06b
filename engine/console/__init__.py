"""The debug console (``engine console``): a web page showing and playing the running
engine's conversation. ``server.py`` serves it (HTTP + a WebSocket relaying the bus),
``relay.py`` is its bus side, ``levels.py`` the level meters the audio processes publish,
``lookback.py`` reads finished session folders; the page is in ``static/`` (no build step)."""
