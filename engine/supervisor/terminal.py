"""``engine start``'s terminal: error lines as they happen and, on a TTY only, one live line
redrawn in place (``\\r`` and clear-to-end-of-line). The text comes from the pure
:class:`engine.view.TerminalView`; this class only writes it.

Contract: when ``out`` is not a TTY (a pipe, CI, a test reading "ready in") nothing is
written but the lines given to :meth:`Terminal.line`; the live line is drawn at most once
every :data:`LIVE_PERIOD_S` and only when its text changed; any other line first clears it,
and the next :meth:`Terminal.draw` puts it back.
"""
from __future__ import annotations

from typing import Any, TextIO

LIVE_PERIOD_S = 0.25     #: the live line is redrawn at most this often
CLEAR = "\r\x1b[K"       #: carriage return, erase to the end of the line


class SafeOut:
    """``out`` whose writes never raise: a terminal closed under the engine (SIGHUP) answers every
    write with EIO, and a stop that raised on its first line left the rings, sockets and
    ``engine.json`` behind. Once a write fails, nothing more is written (``gone``)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.out.write(text)
            except (OSError, ValueError):
                self.gone = True
        return 0

    def flush(self) -> None:
        if not self.gone:
            try:
                self.out.flush()
            except (OSError, ValueError):
                self.gone = True

    def isatty(self) -> bool:
        try:
            return bool(self.out.isatty())
        except (AttributeError, OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


class Terminal:
    def __init__(self, out: TextIO, live: bool | None = None) -> None:
        self.out = out
        if live is None:
            try:
                live = out.isatty()
            except (AttributeError, ValueError):
                live = False
        self.live = live
        self._drawn = ""            #: the live line's text on the screen now ("" = none)
        self._drawn_at = -1e9

    def line(self, text: str) -> None:
        """``text`` on a line of its own (the live line, if drawn, is cleared first)."""
        self.clear()
        self.out.write(text + "\n")
        self.out.flush()

    def draw(self, text: str, now_s: float) -> None:
        """Redraw the live line as ``text`` (TTY only; at most every LIVE_PERIOD_S, when it changed)."""
        if not self.live or text == self._drawn or now_s - self._drawn_at < LIVE_PERIOD_S:
            return
        self.out.write(CLEAR + text)
        self.out.flush()
        self._drawn, self._drawn_at = text, now_s

    def clear(self) -> None:
        """Take the live line off the screen (before other output, and at stop)."""
        if self._drawn:
            self.out.write(CLEAR)
            self.out.flush()
            self._drawn = ""
            self._drawn_at = -1e9
