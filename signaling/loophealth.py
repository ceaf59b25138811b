"""
Event-loop health: how late the loop wakes up (its lag), for ``/readyz``, ``/metrics`` and the log.

Everything in a Chorus node runs on one event loop, so anything that blocks it (a slow callback, a burst of
work) delays every packet of every call. A sampler sleeps :attr:`LoopMonitor.interval` seconds over and over
and records how much later than asked it woke up. The lag is *reported* (the worst of the last
:attr:`LoopMonitor.window` seconds, and a histogram) but never changes readiness: a busy node that flips
between ready and not ready would only move load around in circles.

A warning is logged when the lag passes ``threshold``, at most once per :attr:`LoopMonitor.warn_every`
seconds (with the worst lag and how many samples were over since the last warning), and an info line once it
has stayed below for a whole window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from chorus.sfu.logs import PeerLogger

logger = PeerLogger(logging.getLogger("chorus.loop"))

#: Histogram bucket bounds (seconds) of the lag samples.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopMonitor:
    """Samples the running loop's lag; :meth:`run` is its task."""

    def __init__(self, threshold: float = 0.1, *, interval: float = 0.1, window: float = 10.0,
                 warn_every: float = 10.0) -> None:
        self.threshold = threshold
        self.interval = interval
        self.window = window
        self.warn_every = warn_every
        #: the last sample (seconds)
        self.last = 0.0
        #: histogram: counts per bucket bound (cumulative when rendered), their sum and count
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0
        self._recent: deque[tuple[float, float]] = deque()  # (monotonic time, lag), the last `window` seconds
        self._over = 0
        self._worst_since_warning = 0.0
        self._last_warning = -float("inf")
        self._lagging = False
        #: warnings logged so far
        self.warnings = 0

    @property
    def recent_max(self) -> float:
        """The worst lag in the last :attr:`window` seconds."""
        self._expire(time.monotonic())
        return max((lag for _, lag in self._recent), default=0.0)

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def record(self, lag: float, now: float | None = None) -> None:
        """Add one sample (the sampler calls this; tests may too)."""
        now = time.monotonic() if now is None else now
        self.last = lag
        self.total += lag
        self.count += 1
        self.buckets[next((i for i, bound in enumerate(BUCKETS) if lag <= bound), len(BUCKETS))] += 1
        # Keep the deque short: a sample no larger than the newest one adds nothing to the window's max.
        while self._recent and self._recent[-1][1] <= lag:
            self._recent.pop()
        self._recent.append((now, lag))
        self._expire(now)
        if lag > self.threshold:
            self._over += 1
            self._worst_since_warning = max(self._worst_since_warning, lag)
            if now - self._last_warning >= self.warn_every:
                logger.warning("event loop lagging", lag_ms=round(self._worst_since_warning * 1000, 1),
                               samples_over=self._over, threshold_ms=round(self.threshold * 1000, 1))
                self._last_warning = now
                self.warnings += 1
                self._over = 0
                self._worst_since_warning = 0.0
            self._lagging = True
        elif self._lagging and self.recent_max <= self.threshold:
            self._lagging = False
            logger.info("event loop lag back to normal", lag_ms=round(lag * 1000, 1))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            self.record(max(0.0, loop.time() - started - self.interval))

    def describe(self) -> dict[str, float]:
        return {"lag_ms": round(self.last * 1000, 1), "lag_max_ms": round(self.recent_max * 1000, 1),
                "window_s": self.window}
