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


class ConnectionLimiter:
    """
    Websockets open at once: at most ``per_address`` from one client address and ``total`` in all. Checked
    before the websocket upgrade (a refused client gets HTTP 429 and costs nothing more).

    Lifecycle of one connection: :meth:`admit` (``None`` = admitted, else the reason it was refused) →
    :meth:`release` exactly once when it closes.
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> str | None:
        held = self._by_address.get(address, 0)
        if held >= self.per_address:
            return f"too many connections from your address (at most {self.per_address})"
        if self.open >= self.total:
            return f"this server has its maximum of {self.total} connections"
        self._by_address[address] = held + 1
        self.open += 1
        return None

    def release(self, address: str) -> None:
        held = self._by_address.get(address, 0)
        if held <= 1:
            self._by_address.pop(address, None)
        else:
            self._by_address[address] = held - 1
        self.open -= 1

    def count(self, address: str) -> int:
        return self._by_address.get(address, 0)
