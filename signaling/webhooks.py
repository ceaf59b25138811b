"""
Webhooks: room events POSTed as JSON to configured URLs, signed, in order.

Each delivery carries ``X-Chorus-Event`` (the event name), ``X-Chorus-Delivery`` (a sequence number,
increasing by one per event) and ``X-Chorus-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>``. Events
are sent one at a time in the order they happened; a failed delivery is retried (0.5 s, 1 s, 2 s) before
the next event goes out, then dropped and logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .accesslog import redact_url

logger = logging.getLogger("chorus.webhooks")

EVENTS = ("room_started", "room_finished", "participant_joined", "participant_left", "track_published",
          "node_draining", "node_drained", "ingress_started", "ingress_ended", "egress_started",
          "egress_ended")
RETRY_DELAYS = (0.5, 1.0, 2.0)
MAX_QUEUED = 10_000


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """Check a delivery's ``X-Chorus-Signature`` (for receivers written in Python)."""
    return hmac.compare_digest(sign(secret, body), signature)


class WebhookSender:
    """Queues events and delivers them in order from one task (started by :meth:`run`)."""

    def __init__(self, urls: list[str], secret: str | None, *, on_outcome: Callable[[str], None] = lambda o: None,
                 timeout: float = 5.0) -> None:
        self.urls = list(urls)
        self._secret = secret or ""
        self._queue: asyncio.Queue[tuple[str, bytes, int]] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._on_outcome = on_outcome
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Queue ``event`` (never blocks; events beyond :data:`MAX_QUEUED` waiting are dropped)."""
        if not self.urls:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            logger.warning("webhook queue full, event dropped", extra={"chorus": {"event": event}})
            self._on_outcome("dropped")
            return
        delivery = next(self._ids)
        body = json.dumps({"event": event, "id": delivery, "created_at": time.time(), **data}).encode()
        self._queue.put_nowait((event, body, delivery))

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            while True:
                event, body, delivery = await self._queue.get()
                try:
                    for url in self.urls:
                        await self._deliver(session, url, event, body, delivery)
                finally:
                    self._queue.task_done()

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was delivered (or given up), at most ``timeout`` seconds. Returns
        whether the queue is empty."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def _deliver(self, session: aiohttp.ClientSession, url: str, event: str, body: bytes,
                       delivery: int) -> None:
        headers = {
            "Content-Type": "application/json",
            "X-Chorus-Event": event,
            "X-Chorus-Delivery": str(delivery),
            "X-Chorus-Signature": sign(self._secret, body),
        }
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
            if delay:
                await asyncio.sleep(delay)
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if response.status < 300:
                        self._on_outcome("delivered")
                        return
                    problem = f"HTTP {response.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            logger.warning("webhook delivery failed", extra={"chorus": {
                "url": redact_url(url), "event": event, "delivery": delivery, "attempt": attempt + 1,
                "problem": problem}})
        self._on_outcome("failed")
