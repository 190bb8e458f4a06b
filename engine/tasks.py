"""Background tasks a service holds until they are done.

asyncio keeps only a weak reference to a task: one nobody holds may be collected mid-run, and a
failure nobody awaits is reported, if ever, when it is collected. A :class:`TaskSet` holds each
task it spawned until it ends and reports a failure at once: logged with ``what``, then handed
to ``failed`` (a service turns it into its ``engine.error``). A task that was cancelled is not a
failure.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine, Iterator


class TaskSet:
    """The tasks spawned on the running loop that are not done yet."""

    def __init__(self, log: logging.Logger, what: str,
                 failed: Callable[[BaseException], None] | None = None) -> None:
        self.log = log
        self.what = what              #: the log's words for a failure: "a SIP task failed"
        self.failed = failed
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.log.error(self.what, exc_info=exc)
            if self.failed is not None:
                self.failed(exc)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the tasks still running to end."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))
