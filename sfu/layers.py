"""
What a publisher's video arrives as: one RTP stream per simulcast layer (one layer without simulcast), each with
its own receive path.

A :class:`LayerReceiver` is that path for one stream: receive statistics that aiortc's receiver reports are built
from, NACKs for gaps, retransmissions (RTX) unwrapped and dropped when they repeat what was already forwarded
(Chromium pads with redundant RTX while it probes), a bitrate per temporal layer over the last second, and
whether the stream is alive. It replaces aiortc's single per-receiver jitter buffer, which fed three layers
requests a keyframe for nearly every packet.
"""

from __future__ import annotations

from aiortc.rtcrtpreceiver import NackGenerator, StreamStatistics
from aiortc.rtp import RtpPacket

#: A layer that sent nothing for this long is inactive: its viewers fall back to another layer.
INACTIVE_AFTER = 0.5
#: Sequence numbers remembered per layer to tell a useful retransmission from a redundant one.
HISTORY = 2048
#: The bitrate of a layer is measured over this window (seconds).
RATE_WINDOW = 1.0


class LayerReceiver:
    """
    The receive path of one RTP stream (one simulcast layer, or the only stream of a track).

    :param index: spatial index, 0 = lowest resolution.
    :param rid: the RTP stream id (``a=rid``), or ``None`` without simulcast.
    """

    __slots__ = ("index", "rid", "ssrc", "rtx_ssrc", "stats", "nacks", "last_arrival", "packets", "bytes",
                 "_forwarded", "_rate_bytes", "_rate_start", "bitrate_by_tid", "keyframes",
                 "keyframe_requested_at", "keyframe_requests", "redundant_rtx", "width", "height",
                 "temporal_layers")

    def __init__(self, index: int, rid: str | None, clock_rate: int) -> None:
        self.index = index
        self.rid = rid
        self.ssrc: int | None = None
        self.rtx_ssrc: int | None = None
        self.stats = StreamStatistics(clock_rate)
        self.nacks = NackGenerator()
        self.last_arrival = 0.0
        self.packets = 0
        self.bytes = 0
        self.keyframes = 0
        #: When a keyframe of this layer was last requested (monotonic seconds), for throttling.
        self.keyframe_requested_at = 0.0
        #: Keyframe requests sent to the publisher for this layer.
        self.keyframe_requests = 0
        #: Retransmissions dropped because the packet had been forwarded already.
        self.redundant_rtx = 0
        self._forwarded = bytearray(HISTORY // 8)
        self._rate_start = 0.0
        self._rate_bytes = [0, 0, 0, 0]
        #: Picture size, read from the last keyframe (VP8), 0 while unknown.
        self.width = 0
        self.height = 0
        #: How many temporal layers the stream carries (highest TID seen + 1).
        self.temporal_layers = 1
        #: Bits per second of each temporal layer (TID 0..3) over the last :data:`RATE_WINDOW`.
        self.bitrate_by_tid = [0, 0, 0, 0]

    def __repr__(self) -> str:
        return f"LayerReceiver({self.index}, rid={self.rid}, ssrc={self.ssrc}, {self.bitrate} bps)"

    @property
    def bitrate(self) -> int:
        """Bits per second of the whole layer (every temporal layer)."""
        return sum(self.bitrate_by_tid)

    def active(self, now: float) -> bool:
        """Whether the layer sent anything in the last :data:`INACTIVE_AFTER` seconds."""
        return now - self.last_arrival < INACTIVE_AFTER

    def received(self, packet: RtpPacket, temporal: int, now: float, *, statistics: bool = True) -> bool:
        """
        Account a media packet (RTX already unwrapped); ``statistics``: add it to the receive statistics too.
        Returns ``False`` when it repeats a packet already forwarded (then it must not be forwarded again).
        """
        seq = packet.sequence_number
        byte, bit = divmod(seq % HISTORY, 8)
        mask = 1 << bit
        if self.nacks.max_seq is not None and self._forwarded[byte] & mask and not self._is_newer(seq):
            self.redundant_rtx += 1
            return False
        self._forwarded[byte] |= mask
        # Clear the bit HISTORY/2 ahead, so a number seen one wrap ago does not count as forwarded.
        ahead = (seq + HISTORY // 2) % HISTORY
        self._forwarded[ahead // 8] &= ~(1 << (ahead % 8)) & 0xFF
        if statistics:
            self.stats.add(packet)
        self.last_arrival = now
        self.packets += 1
        size = len(packet.payload)
        self.bytes += size
        if now - self._rate_start >= RATE_WINDOW:
            elapsed = now - self._rate_start
            if elapsed < 2 * RATE_WINDOW:
                self.bitrate_by_tid = [int(b * 8 / elapsed) for b in self._rate_bytes]
            else:
                self.bitrate_by_tid = [0, 0, 0, 0]
            self._rate_bytes = [0, 0, 0, 0]
            self._rate_start = now
        self._rate_bytes[min(temporal, 3)] += size
        if temporal >= self.temporal_layers:
            self.temporal_layers = min(temporal, 3) + 1
        return True

    def _is_newer(self, seq: int) -> bool:
        newest = self.nacks.max_seq
        return newest is None or (seq != newest and (seq - newest) & 0xFFFF < 0x8000)

    def missing(self, packet: RtpPacket) -> list[int]:
        """Feed the NACK generator; the sequence numbers to ask for again (empty when nothing new is missing)."""
        if self.nacks.add(packet):
            return sorted(self.nacks.missing)
        return []


def vp8_keyframe_size(payload: bytes, descriptor_size: int) -> tuple[int, int] | None:
    """Width and height from the first packet of a VP8 key frame (RFC 6386 §9.1: a 3-byte frame tag, the start
    code 9d 01 2a, then 14-bit width and height, little-endian), ``None`` if it is not there."""
    at = descriptor_size
    if len(payload) < at + 10 or payload[at + 3: at + 6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(payload[at + 6: at + 8], "little") & 0x3FFF
    height = int.from_bytes(payload[at + 8: at + 10], "little") & 0x3FFF
    return width, height
