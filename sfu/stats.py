"""Process-wide media counters: what closed producers and consumers did, for monotonic metrics."""

from __future__ import annotations


class Totals:
    """Counters accumulated from closed objects; live objects are added on top when metrics are read."""

    __slots__ = ("packets_received", "bytes_received", "packets_forwarded", "bytes_forwarded",
                 "keyframe_requests", "nacks", "retransmitted", "plis", "firs")

    packets_received: int
    bytes_received: int
    packets_forwarded: int
    bytes_forwarded: int
    keyframe_requests: int
    nacks: int
    retransmitted: int
    plis: int
    firs: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


#: The totals of this process.
TOTALS = Totals()
