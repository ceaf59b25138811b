"""
The send side of one subscribe connection: transport-wide sequence numbers, the bandwidth estimate, probes.

A subscriber that negotiated transport-cc (browsers) gets a transport-wide sequence number on every packet
Chorus sends it; its feedback (read from the raw RTCP: aiortc would misread it as a NACK) drives a
:class:`~.bwe.SendSideBwe`, which can go up again quickly by *probing*: bursts of padding sent on top of the
media, whose arrival rate shows whether the link has room. A subscriber without transport-cc (aiortc) is
estimated from its REMB, and with neither the estimate is unbounded (forward everything, as before).
"""

from __future__ import annotations

import time

from aiortc.rtp import RTCP_PSFB_APP, unpack_remb_fci

from .bwe import MAX_BPS, ProbeCluster, SendSideBwe
from .twcc import FeedbackReader, iter_rtcp

#: The transport-wide-cc header extension ID Chorus offers subscribers (unused by aiortc's own: 1, 2, 3).
TRANSPORT_CC_ID = 5
#: The estimate a connection starts from; initial probes go to 3 × this within the first second.
START_BPS = 1_000_000
_RTCP_PSFB = 206


def now_us() -> int:
    return time.monotonic_ns() // 1000


class SubscriberBandwidth:
    """
    What one subscribe connection may send, estimated (see the module docstring).

    :attr:`mode` is ``"transport-cc"`` once the subscriber's answer accepted it, ``"remb"`` once it sends REMB
    without transport-cc, else ``"none"``.
    """

    __slots__ = ("bwe", "reader", "mode", "_seq", "_probe", "_probe_sent", "_probe_end", "_probe_done")

    def __init__(self) -> None:
        self.bwe = SendSideBwe(start_bps=START_BPS)
        self.reader = FeedbackReader()
        self.mode = "none"
        self._seq = 0
        self._probe: ProbeCluster | None = None
        self._probe_sent = 0
        self._probe_end = 0
        self._probe_done = False

    @property
    def transport_cc(self) -> bool:
        return self.mode == "transport-cc"

    @property
    def estimate_bps(self) -> int:
        """What the connection may carry (bps); :data:`~.bwe.MAX_BPS` without any feedback."""
        if self.mode == "none":
            return MAX_BPS
        return self.bwe.estimate_bps

    @property
    def state(self) -> str:
        return self.bwe.state if self.mode != "none" else "no feedback"

    def next_seq(self) -> int:
        """The transport-wide sequence number of the next packet sent."""
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFF
        return seq

    def sent(self, seq: int, size: int) -> None:
        """A packet numbered ``seq`` (:meth:`next_seq`) of ``size`` bytes left now."""
        self.bwe.on_packet_sent(seq, size, now_us(), self._probe.cluster_id if self._probe is not None else None)

    def rtcp(self, data: bytes) -> None:
        """Read transport-cc feedback and REMB from a decrypted RTCP datagram of the subscriber."""
        now = now_us()
        if self.transport_cc:
            results = self.reader.read(data)
            if results:
                self.bwe.on_feedback(results, now)
        for pt, fmt, packet in iter_rtcp(data):
            if pt == _RTCP_PSFB and fmt == RTCP_PSFB_APP and len(packet) >= 12:
                try:
                    bps, _ = unpack_remb_fci(packet[12:])
                except ValueError:
                    continue
                self.bwe.on_remb(bps, now)
                if self.mode == "none":
                    self.mode = "remb"

    def set_demand(self, bps: int) -> None:
        """What the viewers would take if the link allowed (probes aim at it)."""
        self.bwe.set_demand(bps)

    @property
    def cluster(self) -> ProbeCluster | None:
        """The probe cluster being sent, if any."""
        return self._probe

    @property
    def probing(self) -> bool:
        """Whether a probe cluster is being sent."""
        return self._probe is not None and not self._probe_done

    def padding_due(self, media_bps: int) -> int:
        """
        Bytes of padding to send now to carry out probing (0 when none is due). Called every few milliseconds:
        a probe cluster is spread evenly over its duration.
        """
        now = now_us()
        if self._probe_done:
            self._probe = None
            self._probe_done = False
        if self._probe is None:
            if self.mode != "transport-cc":
                return 0
            self._probe = self.bwe.poll_probe(now)
            if self._probe is None:
                return 0
            self._probe_sent = 0
            self._probe_end = now + self._probe.duration_us
        probe = self._probe
        total = probe.padding_bytes(media_bps)
        if now >= self._probe_end:
            due = total - self._probe_sent
            self._probe_done = True  # packets sent now still belong to the cluster
        else:
            elapsed = probe.duration_us - (self._probe_end - now)
            due = total * elapsed // probe.duration_us - self._probe_sent
        due = max(0, due)
        self._probe_sent += due
        return due
