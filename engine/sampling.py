"""Errors that strangers can cause as fast as they like, reported at a bounded rate.

A port open to the world (the phone bridge, engine sip's webhooks) meets malformed messages,
forged signatures and floods. Each is counted; at most one report goes out every
``REPORT_EVERY_S`` per sampler (the first at once, those after it in the same second summed into
the next, with the first of them as the example), so a flood costs neither the log, the bus nor
the disk. Pure: the caller passes the time.
"""
from __future__ import annotations

from dataclasses import dataclass

REPORT_EVERY_S = 1.0                   #: at most one report a second per sampler


@dataclass(frozen=True)
class Report:
    """One report to publish: ``count`` errors since the last report, ``code`` and ``message`` the
    first of them (the example)."""
    code: str
    message: str
    count: int
    fatal: bool = False


class ErrorSampler:
    """Counts errors and lets at most one report through every ``every_s``: the first at once,
    those after it in the same second summed into the next (the count and the first example)."""

    def __init__(self, every_s: float = REPORT_EVERY_S) -> None:
        self.every_s = every_s
        self.total = 0                         #: every error noted
        self.reports = 0                       #: reports let through
        self.last_report_s = float("-inf")
        self.pending = 0                       #: noted since the last report
        self.example: tuple[str, str, bool] | None = None

    def note(self, code: str, message: str, now: float, fatal: bool = False) -> Report | None:
        """Count one error; a report to publish now, or None (it waits for :meth:`flush`). A fatal
        error (it ends the call) is reported at once, with what waited."""
        self.total += 1
        if self.example is None:
            self.example = (code, message, fatal)
        self.pending += 1
        if fatal or now >= self.last_report_s + self.every_s:
            return self._take(now, (code, message, fatal) if fatal else None)
        return None

    def due_s(self) -> float | None:
        """When the waiting count may be reported (None: nothing waits)."""
        return self.last_report_s + self.every_s if self.pending else None

    def flush(self, now: float) -> Report | None:
        """The waiting count, if its second has passed."""
        if not self.pending or now < self.last_report_s + self.every_s:
            return None
        return self._take(now, None)

    def _take(self, now: float, override: tuple[str, str, bool] | None) -> Report:
        code, message, fatal = override or self.example or ("", "", False)
        report = Report(code, message, self.pending, fatal)
        self.pending, self.example, self.last_report_s = 0, None, now
        self.reports += 1
        return report
