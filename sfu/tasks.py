"""
Owned background tasks: the one place where Chorus starts an asyncio task outside a ``TaskGroup``.

Every object that runs something in the background holds a :class:`Tasks` and awaits :meth:`Tasks.close` when
it closes, so no task outlives its owner, none is cancelled without being awaited, and an exception in one is
logged (with the owner's name) instead of being lost as "Task exception was never retrieved".

``asyncio.ensure_future`` and bare ``asyncio.create_task`` are banned elsewhere (ruff TID251, see
``pyproject.toml``); long-lived sessions that can use structured concurrency use ``asyncio.TaskGroup``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger("chorus.tasks")

T = TypeVar("T")


class Tasks:
    """
    The background tasks of one owner.

    Lifecycle: *open* (:meth:`spawn` starts tasks; finished ones are forgotten) → *closed* (:meth:`close`
    cancelled and awaited every task; :meth:`spawn` then refuses new work by closing the coroutine).
    """

    __slots__ = ("name", "_tasks", "closed")

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"Tasks({self.name!r}, running={len(self._tasks)})"

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """
        Run ``coro`` in the background, owned by this set. An exception it raises is logged, not raised.

        :raises RuntimeError: the owner is closed (``coro`` is closed, never run).
        """
        if self.closed:
            coro.close()
            raise RuntimeError(f"{self.name} is closed: no new background work")
        name = name or f"{self.name}: {getattr(coro, '__qualname__', 'task')}"
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception(),
                         extra={"chorus": {"owner": self.name, "task": task.get_name()}})

    def cancel(self) -> None:
        """Cancel every task now, without waiting (from synchronous code; :meth:`close` still awaits them)."""
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        """Cancel every task and wait until all have ended. Idempotent; safe from inside one of the tasks."""
        self.closed = True
        current = asyncio.current_task()
        while pending := [t for t in self._tasks if t is not current]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks.difference_update(pending)
