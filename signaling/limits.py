"""Per-client-IP rate limiting (token buckets), bounded in memory."""

from __future__ import annotations

import time
from collections import OrderedDict


class RateLimiter:
    """
    A token bucket per key: ``rate`` tokens per second, at most ``burst`` saved up. Keeps at most
    ``max_keys`` buckets (least recently used are forgotten, which only ever errs towards allowing).
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, *, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed
