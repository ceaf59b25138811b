"""A Consumer forwards one Source's RTP to one subscriber, rewritten for that subscriber's connection."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtpPacket,
    unpack_remb_fci,
)
from aiortc.utils import uint16_gt

from . import aiortc_adapter as adapter
from . import stats
from .logs import PeerLogger
from .rtp import RtpWriter
from .source import PacketMeta, Source

#: Packets kept per consumer to answer NACKs (aiortc's own sender keeps 128).
NACK_CACHE_SIZE = 1024


class ConsumerStats:
    __slots__ = ("packets", "bytes", "nacks", "retransmitted", "plis", "firs", "remb_bps")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.nacks = 0
        self.retransmitted = 0
        self.plis = 0
        self.firs = 0
        self.remb_bps: int | None = None


class IdleTrack(MediaStreamTrack):
    """
    The track given to a consumer's RTCRtpSender. Its ``recv`` never returns, so aiortc's encoding loop
    waits forever (no encoder is ever created) while Chorus writes packets to the transport itself.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def recv(self) -> Any:
        await asyncio.Event().wait()  # cancelled when the sender stops


class Consumer:
    """
    One source forwarded to one subscriber: a :class:`~.source.Sink` writing to a sendonly transceiver.

    Lifecycle: *new* (its transceiver is added to the subscriber's connection, awaiting negotiation) →
    *bound* (aiortc started the sender on a connected transport: the negotiated payload type, MID and header
    extension IDs are now known; a keyframe is requested) → *forwarding* (from the first keyframe start; until
    then video packets are held back, since a decoder cannot start mid-picture) → *closed*. :meth:`restart`
    returns to waiting for a keyframe (after the source resumes).

    Two ways to close, as in mediasoup: :meth:`close` when the subscribe transport that owns it closes it, and
    :meth:`source_closed` when the source ends, which also tells the owner (``on_source_closed``) so it can
    retire the m-section.

    Per packet it rewrites SSRC, payload type, sequence number and timestamp (offsets fixed when forwarding
    (re)starts, so the subscriber sees one continuous stream) and the header extensions, keeps the last
    :data:`NACK_CACHE_SIZE` packets to answer NACKs, and keeps sender statistics for SRs. Subscriber PLI/FIR
    go to the source, which merges them; REMB is recorded.
    """

    def __init__(
        self,
        consumer_id: str,
        source: Source,
        subscriber_id: str,
        transceiver: RTCRtpTransceiver,
        *,
        on_source_closed: Callable[[Consumer], None],
        log: PeerLogger,
    ) -> None:
        self.id = consumer_id
        self.source = source
        self.subscriber_id = subscriber_id
        self.kind = source.kind
        self.transceiver = transceiver
        self.closed = False
        self.stats = ConsumerStats()

        self._sender = transceiver.sender
        self._on_source_closed = on_source_closed
        self._log = log
        self._bound = False
        self._waiting_keyframe = True
        self._writer = RtpWriter(0, 0, mid=None, mid_id=None, abs_send_time_id=None, audio_level_id=None)
        self._direct: Callable[[bytes], None] | None = None
        self._clock_rate = source.codec.clockRate
        # Output numbering; offsets are set each time forwarding (re)starts.
        self._next_seq = random.randint(0, 0x7FFF)
        self._last_ts = random.getrandbits(32)
        self._last_send_time = 0.0
        self._seq_offset = 0
        self._ts_offset = 0
        self._started_once = False
        self._cache: list[tuple[int, bytes] | None] = [None] * NACK_CACHE_SIZE
        self._original_rtcp = adapter.hook_sender_rtcp(self._sender, self._handle_rtcp)
        source.attach(self)

    def __repr__(self) -> str:
        return f"Consumer(id={self.id}, source={self.source.id}, subscriber={self.subscriber_id})"

    @property
    def mid(self) -> str | None:
        return self.transceiver.mid

    @property
    def forwarding(self) -> bool:
        return self._bound and not self._waiting_keyframe

    def restart(self) -> None:
        """Hold packets until the next keyframe start, then continue the output stream seamlessly."""
        self._waiting_keyframe = True

    # --- media -----------------------------------------------------------------------------------------

    def _bind(self) -> None:
        codecs = adapter.transceiver_codecs(self.transceiver)
        payload_type = cast(int, codecs[0].payloadType)  # always set once negotiated
        mid = adapter.sender_mid(self._sender)
        mid_id, abs_id, audio_id = adapter.header_extension_ids(adapter.sender_header_extensions(self._sender))
        self._writer = RtpWriter(payload_type, adapter.sender_ssrc(self._sender), mid=mid, mid_id=mid_id,
                                 abs_send_time_id=abs_id, audio_level_id=audio_id)
        self._bound = True
        self._log.debug("consumer bound", consumer=self.id, source=self.source.id, mid=mid)
        self.source.request_keyframe()

    def deliver(self, packet: RtpPacket, meta: PacketMeta) -> Awaitable[bool] | None:
        """
        Rewrite one source packet for this subscriber and send it: synchronously when the nominated ICE pair
        allows (see :func:`adapter.direct_rtp_sender`), else by returning the asynchronous send to await.
        Nothing is sent before negotiation completes, while waiting for a keyframe, or once closed.
        """
        if self.closed:
            return None
        if not self._bound:
            if not adapter.sender_started(self._sender):
                return None
            self._bind()
        if self._waiting_keyframe:
            if not meta.keyframe:
                return None
            self._start_at(packet, meta.now)

        seq = (packet.sequence_number + self._seq_offset) & 0xFFFF
        timestamp = (packet.timestamp + self._ts_offset) & 0xFFFFFFFF
        data = self._writer.write(packet, seq, timestamp, meta.abs_send_time)
        self._cache[seq % NACK_CACHE_SIZE] = (seq, data)
        if uint16_gt(seq, (self._next_seq - 1) & 0xFFFF):
            self._next_seq = (seq + 1) & 0xFFFF
            self._last_ts = timestamp
            self._last_send_time = meta.now
        payload_size = len(packet.payload)

        send = self._direct
        if send is None:
            send = self._direct = adapter.direct_rtp_sender(self._sender)
        if send is None:  # no synchronous path to this subscriber (e.g. a TURN-relayed pair)
            return self._transmit(data, payload_size, meta.ntp)
        try:
            send(data)
        except ConnectionError:
            self._direct = None
            return None
        self._count_sent(payload_size, meta.ntp)
        return None

    async def _transmit(self, data: bytes, payload_size: int, ntp_time: int) -> bool:
        """Send prepared bytes through aiortc's transport (works for every candidate pair)."""
        try:
            await adapter.send_rtp(self._sender, data)
        except ConnectionError:
            return False
        self._count_sent(payload_size, ntp_time)
        return True

    def _count_sent(self, payload_size: int, ntp_time: int) -> None:
        adapter.sender_count_sent(self._sender, payload_size, self._last_ts, ntp_time)
        self.stats.packets += 1
        self.stats.bytes += payload_size

    def _start_at(self, packet: RtpPacket, now: float) -> None:
        """Fix offsets so ``packet`` follows the last packet sent, in sequence and in time."""
        self._seq_offset = (self._next_seq - packet.sequence_number) & 0xFFFF
        if self._started_once:
            elapsed = max(now - self._last_send_time, 0.001)
            target_ts = (self._last_ts + int(elapsed * self._clock_rate)) & 0xFFFFFFFF
        else:
            target_ts = self._last_ts
        self._ts_offset = (target_ts - packet.timestamp) & 0xFFFFFFFF
        self._started_once = True
        self._waiting_keyframe = False

    # --- RTCP from the subscriber ----------------------------------------------------------------------

    async def _handle_rtcp(self, packet: AnyRtcpPacket) -> None:
        if self.closed:
            return
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            if packet.fmt == RTCP_PSFB_PLI:
                self.stats.plis += 1
            else:
                self.stats.firs += 1
            self.source.request_keyframe()
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.stats.nacks += 1
            for seq in packet.lost:
                entry = self._cache[seq % NACK_CACHE_SIZE]
                if entry is not None and entry[0] == seq:
                    try:
                        await adapter.send_rtp(self._sender, entry[1])
                    except ConnectionError:
                        return
                    self.stats.retransmitted += 1
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                self.stats.remb_bps = unpack_remb_fci(packet.fci)[0]
            except ValueError:
                pass
        else:
            # Receiver reports: aiortc keeps round-trip time and remote-inbound stats.
            await self._original_rtcp(packet)

    # --- closing ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop forwarding and detach from the source (the owning transport closes it). Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.source.detach(self)
        self._cache = []
        adapter.unhook_sender_rtcp(self._sender)
        stats.retire(self.stats, stats.CONSUMER_COUNTERS)

    def source_closed(self) -> None:
        """The source ended: close, and tell the owning transport so it retires the m-section."""
        if self.closed:
            return
        self.close()
        self._on_source_closed(self)
