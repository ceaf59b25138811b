"""How many media objects this process holds right now, for leak and churn checks."""

from __future__ import annotations

import gc

from aiortc import RTCPeerConnection

from .consumer import Consumer
from .peer import Peer
from .producer import Producer

KINDS: tuple[tuple[str, type], ...] = (
    ("peer_connections", RTCPeerConnection), ("peers", Peer), ("producers", Producer), ("consumers", Consumer),
)


def live_objects() -> dict[str, int]:
    """Peer connections, peers, producers and consumers alive after a full garbage collection (every count
    returns to its baseline when calls end)."""
    gc.collect()
    counts = dict.fromkeys((name for name, _ in KINDS), 0)
    for obj in gc.get_objects():
        for name, kind in KINDS:
            if isinstance(obj, kind):
                counts[name] += 1
                break
    return counts
