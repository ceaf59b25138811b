"""
Process-wide media counters that only grow (for Prometheus counters): what closed producers and consumers
did is kept here, and live ones are added on top when metrics are read. Nothing is counted per packet for
metrics' sake.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

#: Process counter → the producer statistic it sums.
PRODUCER_COUNTERS = {"packets_received": "packets", "bytes_received": "bytes",
                     "keyframe_requests": "keyframe_requests"}
#: Process counter → the consumer statistic it sums.
CONSUMER_COUNTERS = {"packets_forwarded": "packets", "bytes_forwarded": "bytes", "nacks": "nacks",
                     "retransmitted": "retransmitted", "plis": "plis", "firs": "firs"}

#: What closed producers and consumers of this process did.
TOTALS: Counter[str] = Counter()


def retire(stats: Any, counters: dict[str, str]) -> None:
    """Add a closing producer's or consumer's statistics to :data:`TOTALS`."""
    for total, field in counters.items():
        TOTALS[total] += getattr(stats, field)


def live(producers: Iterable[Any], consumers: Iterable[Any]) -> Counter[str]:
    """The process counters summed over live ``producers`` and ``consumers``."""
    totals: Counter[str] = Counter()
    for producer in producers:
        for total, field in PRODUCER_COUNTERS.items():
            totals[total] += getattr(producer.stats, field)
    for consumer in consumers:
        for total, field in CONSUMER_COUNTERS.items():
            totals[total] += getattr(consumer.stats, field)
    return totals


def snapshot(counters: Any) -> dict[str, Any]:
    """A stats object's ``__slots__`` fields as a dict (for the admin API)."""
    return {name: getattr(counters, name) for name in counters.__slots__}

