"""
Process-wide media counters that only grow (for Prometheus counters): what closed producers and consumers
did is kept here, and live ones are added on top when metrics are read. Nothing is counted per packet for
metrics' sake.
"""

from __future__ import annotations

from collections import Counter
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


def total(name: str, producers: list[Any], consumers: list[Any]) -> int:
    """Process counter ``name``: closed objects plus the live ``producers``/``consumers`` given."""
    if name in PRODUCER_COUNTERS:
        live = sum(getattr(p.stats, PRODUCER_COUNTERS[name]) for p in producers)
    else:
        live = sum(getattr(c.stats, CONSUMER_COUNTERS[name]) for c in consumers)
    return TOTALS[name] + live
