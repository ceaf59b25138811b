"""
Connection quality of each participant as the server sees it: loss of what it sends us, loss of what we send it,
and the round-trip time between us.

* **Uplink loss** — from the receive statistics of its publish connection (sequence-number gaps of the RTP it
  sends us), over the interval since the previous sample.
* **Downlink loss** and **round-trip time** — from the RTCP receiver reports its subscribe connection sends back
  about the media we forward to it (RFC 3550 §6.4.2: ``fraction lost`` since its previous report; RTT from
  ``LSR``/``DLSR``).

:class:`QualityTracker` is pure: it is given cumulative samples (:class:`LinkSample`) and keeps the previous one
per participant to turn counters into rates. The router samples every :data:`INTERVAL` seconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: Seconds between samples.
INTERVAL = 2.0

EXCELLENT = "excellent"
GOOD = "good"
POOR = "poor"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class LinkSample:
    """One participant's connections at one moment."""

    #: RTP packets received from it so far, and lost so far (publish connection; cumulative).
    received: int = 0
    lost: int = 0
    #: From the receiver reports of its subscribe connection: round-trip times (seconds) and the fraction of our
    #: packets it lost since its previous report (0-1), one per reporting stream.
    rtts: list[float] = field(default_factory=list)
    downlink_losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class PeerQuality:
    """How good a participant's connection is (``quality``: excellent, good, poor or unknown)."""

    peer_id: str
    quality: str
    #: Fractions 0-1, ``None`` when there was nothing to measure.
    uplink_loss: float | None
    downlink_loss: float | None
    #: Seconds.
    rtt: float | None

    def public(self) -> dict[str, Any]:
        """As participants are told (``connection_quality``): loss as fractions, RTT in milliseconds."""
        return {
            "peer_id": self.peer_id,
            "quality": self.quality,
            "uplink_loss": None if self.uplink_loss is None else round(self.uplink_loss, 3),
            "downlink_loss": None if self.downlink_loss is None else round(self.downlink_loss, 3),
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000),
        }


def rate(loss: float | None, rtt: float | None) -> str:
    """
    The rating: *excellent* below 2 % loss and 200 ms RTT, *good* below 8 % and 400 ms, else *poor*;
    *unknown* with neither figure. (Video calls stay fluent to a few percent of loss; conversation suffers past
    ~300-400 ms of round trip, ITU-T G.114.)
    """
    if loss is None and rtt is None:
        return UNKNOWN
    loss = loss or 0.0
    rtt = rtt or 0.0
    if loss < 0.02 and rtt < 0.2:
        return EXCELLENT
    if loss < 0.08 and rtt < 0.4:
        return GOOD
    return POOR


def link_sample(stats: Iterable[Any]) -> LinkSample:
    """
    A sample from aiortc's statistics objects of a participant's two connections: ``inbound-rtp`` (what it sends
    us) and ``remote-inbound-rtp`` (its receiver reports about what we send it; aiortc passes RFC 3550's 8-bit
    fixed-point ``fraction lost`` through as an integer 0-255).
    """
    received = lost = 0
    rtts: list[float] = []
    losses: list[float] = []
    for report in stats:
        kind = getattr(report, "type", None)
        if kind == "inbound-rtp":
            received += report.packetsReceived
            lost += report.packetsLost
        elif kind == "remote-inbound-rtp":
            if report.roundTripTime is not None:
                rtts.append(float(report.roundTripTime))
            losses.append(min(max(report.fractionLost / 256, 0.0), 1.0))
    return LinkSample(received, lost, rtts, losses)


class QualityTracker:
    """Turns each participant's cumulative samples into its quality over the last interval."""

    def __init__(self) -> None:
        self._previous: dict[str, LinkSample] = {}

    def update(self, peer_id: str, sample: LinkSample) -> PeerQuality:
        previous = self._previous.get(peer_id, LinkSample())
        self._previous[peer_id] = sample
        received = sample.received - previous.received
        lost = max(sample.lost - previous.lost, 0)
        uplink = lost / (received + lost) if received > 0 else None
        downlink = max(sample.downlink_losses) if sample.downlink_losses else None
        rtt = statistics.median(sample.rtts) if sample.rtts else None
        worst = max((x for x in (uplink, downlink) if x is not None), default=None)
        return PeerQuality(peer_id, rate(worst, rtt), uplink, downlink, rtt)

    def forget(self, peer_id: str) -> None:
        self._previous.pop(peer_id, None)
