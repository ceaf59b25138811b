"""
Graceful drain: how a node leaves service without ending anyone's call.

On SIGTERM (``chorus serve``) or ``POST /api/drain`` the node

1. stops taking new work: ``/readyz`` answers 503, joins are refused (redirected to another node in a
   cluster), and every subsystem that subscribed to :class:`Drain` stops taking its own kind of new work;
2. in a cluster, gives its rooms' placement to other nodes (each room goes to one other node as a whole);
3. tells every participant: notification ``draining {deadline, url?}`` — ``url`` is the node to rejoin in a
   cluster; clients move there by themselves at once (same identity);
4. waits until its rooms are empty and no subsystem holds work open, or until ``drain_timeout`` passes, then
   closes what is left (participants get ``left {reason: "server shutdown"}``);
5. lets the queued webhooks go out (``node_draining`` at the start, ``node_drained`` at the end) and
   finishes; ``chorus serve`` then exits with status 0. A second SIGTERM ends the process at once with
   status :data:`EXIT_FORCED`.

The hook for other subsystems (ingest, egress, anything added later) is the :class:`Drain` object of the app
(``app[DRAIN]`` in :mod:`chorus.signaling.app`): check :attr:`Drain.draining` (or call
:meth:`Drain.refuse`) before starting new work, subscribe with :meth:`Drain.subscribe` to stop accepting
(close a listener, end an ingest session...), and :meth:`Drain.hold` work that should be allowed to finish
(a recording being finalised) before the process exits. Subsystems never import signaling: the code in
signaling that wires them passes these callables on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from chorus.sfu import ChorusError
from chorus.sfu.logs import PeerLogger

logger = PeerLogger(logging.getLogger("chorus.drain"))

#: Exit status of ``chorus serve`` when a second SIGTERM cuts a drain short (as a shell reports a process
#: killed by SIGTERM: 128 + 15).
EXIT_FORCED = 143


class Draining(ChorusError):
    """This node is draining: it takes no new rooms, joins or other new work."""

    code = "unavailable"


class Drain:
    """
    The drain state of one node, and the hook every subsystem uses.

    Lifecycle: *serving* → *draining* (:meth:`start`; :attr:`deadline` set, subscribers called once) →
    *finished* (:attr:`finished` set by whoever runs the drain, once it is over).
    """

    def __init__(self) -> None:
        self.draining = False
        #: Unix time (seconds) after which whatever is left is closed
        self.deadline: float | None = None
        #: set when the drain is over (the process may exit)
        self.finished = asyncio.Event()
        self._subscribers: list[Callable[[float], None]] = []
        self._holds: dict[int, str] = {}
        self._next_hold = 0

    def subscribe(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(deadline)`` when the drain starts (at once if it already has). It must not block:
        start background work on its owner's tasks if needed."""
        self._subscribers.append(callback)
        if self.draining and self.deadline is not None:
            callback(self.deadline)

    def refuse(self, what: str = "new work") -> None:
        """
        Call before starting new work.

        :raises Draining: the node is draining.
        """
        if self.draining:
            raise Draining(f"this server is shutting down and takes no {what}; try again in a moment")

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Work the drain waits for (until the deadline) before the process exits, e.g. ``with
        drain.hold("recording r1"): ...``."""
        key = self._next_hold
        self._next_hold += 1
        self._holds[key] = name
        try:
            yield
        finally:
            del self._holds[key]

    @property
    def holds(self) -> list[str]:
        """Names of the work held open right now."""
        return list(self._holds.values())

    def start(self, timeout: float) -> bool:
        """Enter draining with a deadline ``timeout`` seconds from now. Returns False if already draining."""
        if self.draining:
            return False
        self.draining = True
        self.deadline = time.time() + timeout
        for callback in list(self._subscribers):
            try:
                callback(self.deadline)
            except Exception:
                logger.error("drain subscriber failed", exc_info=True)
        return True

    def describe(self) -> dict[str, Any]:
        return {"draining": self.draining, "deadline": self.deadline, "holds": self.holds}
