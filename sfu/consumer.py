"""A Consumer forwards one Source's RTP to one subscriber, rewritten for that subscriber's connection."""

from __future__ import annotations

import asyncio
import time
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

from . import aiortc_adapter as adapter
from . import stats
from .bandwidth import TRANSPORT_CC_ID, SubscriberBandwidth
from .logs import PeerLogger
from .packetcache import PacketCache
from .rtp import RtpWriter
from .seqmanager import SeqManager, TimestampRebaser
from .source import PacketMeta, Source
from .vp8 import Vp8Munger

#: Packets kept per consumer to answer NACKs (aiortc's own sender keeps 128).
NACK_CACHE_SIZE = 1024
#: A switch to another layer whose keyframe has not come within this long asks for one again (seconds).
SWITCH_RETRY = 1.0
#: The most temporal layers a VP8 stream has (L1T3: TID 0..2).
MAX_TEMPORAL = 2


class ConsumerStats:
    __slots__ = ("packets", "bytes", "nacks", "retransmitted", "plis", "firs", "remb_bps", "switches",
                 "padding_bytes")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.nacks = 0
        self.retransmitted = 0
        self.plis = 0
        self.firs = 0
        self.remb_bps: int | None = None
        self.switches = 0
        self.padding_bytes = 0


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
    extension IDs are now known; a keyframe is requested) → *forwarding* (from the first keyframe start of the
    target layer; until then video packets are held back, since a decoder cannot start mid-picture) → *closed*.
    :meth:`restart` returns to waiting for a keyframe (after the source resumes).

    Two ways to close, as in mediasoup: :meth:`close` when the subscribe transport that owns it closes it, and
    :meth:`source_closed` when the source ends, which also tells the owner (``on_source_closed``) so it can
    retire the m-section.

    **Layers.** The subscribe transport's allocation sets a *target* (:meth:`set_target`): a spatial layer of a
    simulcast source and the highest temporal layer. Packets of other spatial layers are not sent; a switch to
    the target layer happens at its next keyframe (requested, again after :data:`SWITCH_RETRY`), so the
    subscriber's decoder never sees a picture it cannot decode. Sequence numbers stay contiguous across
    switches and dropped temporal layers (:class:`~.seqmanager.SeqManager`), timestamps follow wall time
    (:class:`~.seqmanager.TimestampRebaser`), and VP8 picture ids, TL0PICIDX and KEYIDX are rewritten
    (:class:`~.vp8.Vp8Munger`) so the subscriber sees one continuous stream.

    Per packet it also rewrites SSRC, payload type and the header extensions (adding the transport-wide
    sequence number when negotiated), keeps the last :data:`NACK_CACHE_SIZE` packets (video; an eighth for audio)
    in a fixed-size :class:`~.packetcache.PacketCache` to answer NACKs, and keeps
    sender statistics for SRs. Subscriber PLI/FIR go to the source (for the layer being sent), which merges
    them; REMB is recorded.
    """

    def __init__(
        self,
        consumer_id: str,
        source: Source,
        subscriber_id: str,
        transceiver: RTCRtpTransceiver,
        *,
        on_source_closed: Callable[[Consumer], None],
        bandwidth: SubscriberBandwidth | None = None,
        log: PeerLogger,
    ) -> None:
        self.id = consumer_id
        self.source = source
        self.subscriber_id = subscriber_id
        self.kind = source.kind
        self.transceiver = transceiver
        self.closed = False
        self.stats = ConsumerStats()
        #: What the viewer asked for (``set_preferences``): the tile's height in device pixels, and paused.
        self.max_height: int | None = None
        self.viewer_paused = False
        #: Higher first when bandwidth is shared (pinned or speaker tiles, screen shares).
        self.priority = 0
        #: The spatial layer being sent (``None`` until forwarding starts) and the one wanted.
        self.layer: int | None = None
        self.target_layer = source.layer_count - 1
        #: Why the target is what it is (allocation), for the admin API and metrics.
        self.reason = "start"
        #: The layer the viewer's size calls for, whatever the bandwidth (``None``: paused); the publisher is
        #: asked to keep sending the layers some sink wants (see ``Producer.wanted_layers``).
        self.wanted_layer: int | None = source.layer_count - 1

        self._sender = transceiver.sender
        self._on_source_closed = on_source_closed
        self._bandwidth = bandwidth
        self._log = log
        self._bound = False
        self._waiting_keyframe = True
        self._suspended = False
        self._switch_requested = 0.0
        self._writer = RtpWriter(0, 0, mid=None, mid_id=None, abs_send_time_id=None, audio_level_id=None)
        self._transport_cc = False
        self._direct: Callable[[bytes], None] | None = None
        self._seq = SeqManager()
        self._ts = TimestampRebaser(source.codec.clockRate)
        self._vp8 = Vp8Munger(MAX_TEMPORAL) if source.codec.mimeType.lower() == "video/vp8" else None
        self._munge: bool | None = None  # decided at the first packet: simulcast, or temporal layers present
        self._last_ts = self._ts.last_output
        # Browsers negotiate NACK for video only: audio keeps a short history.
        self._cache = PacketCache(NACK_CACHE_SIZE if self.kind == "video" else NACK_CACHE_SIZE // 8)
        self._original_rtcp = adapter.hook_sender_rtcp(self._sender, self._handle_rtcp)
        source.attach(self, self._layers_needed())

    def __repr__(self) -> str:
        return f"Consumer(id={self.id}, source={self.source.id}, subscriber={self.subscriber_id})"

    @property
    def mid(self) -> str | None:
        return self.transceiver.mid

    @property
    def forwarding(self) -> bool:
        return self._bound and not self._waiting_keyframe

    @property
    def target_temporal(self) -> int:
        return self._vp8.target_temporal if self._vp8 is not None else MAX_TEMPORAL

    @property
    def temporal(self) -> int:
        """The highest temporal layer being sent."""
        return self._vp8.temporal if self._vp8 is not None and self._munge else MAX_TEMPORAL

    def restart(self) -> None:
        """Hold packets until the next keyframe start, then continue the output stream seamlessly."""
        self._waiting_keyframe = True

    def _layers_needed(self) -> frozenset[int] | None:
        """The layers whose packets this consumer needs: the one it sends and the one it switches to."""
        if self.source.layer_count == 1:
            return None
        return frozenset(x for x in (self.layer, self.target_layer) if x is not None)

    def suspend(self, suspended: bool) -> None:
        """Send nothing (the viewer paused it, or there is no bandwidth for even its lowest layer); on resuming,
        start again at a keyframe."""
        if suspended == self._suspended:
            return
        self._suspended = suspended
        if not suspended:
            self._waiting_keyframe = True
            if self._bound:
                self._request_switch()

    def set_target(self, layer: int, temporal: int = MAX_TEMPORAL, reason: str = "") -> None:
        """Send spatial ``layer`` up to ``temporal`` from now on (a spatial change at that layer's next keyframe,
        which is requested)."""
        layer = max(0, min(layer, self.source.layer_count - 1))
        if reason:
            self.reason = reason
        if self._vp8 is not None:
            self._vp8.target_temporal = max(0, min(temporal, MAX_TEMPORAL))
        if layer != self.target_layer:
            self.target_layer = layer
            self.source.listen(self, self._layers_needed())
            if self.layer != layer and self._bound:
                self._request_switch()

    def describe(self) -> dict[str, Any]:
        """The consumer's state for the admin API."""
        return {"id": self.id, "track_id": self.source.id, "kind": self.kind, "layer": self.layer,
                "target_layer": self.target_layer, "temporal": self.temporal if self.kind == "video" else None,
                "max_height": self.max_height, "paused": self.viewer_paused, "suspended": self._suspended,
                "reason": self.reason,
                "packets": self.stats.packets, "switches": self.stats.switches}

    # --- media -----------------------------------------------------------------------------------------

    def _bind(self) -> None:
        codecs = adapter.transceiver_codecs(self.transceiver)
        payload_type = cast(int, codecs[0].payloadType)  # always set once negotiated
        mid = adapter.sender_mid(self._sender)
        mid_id, abs_id, audio_id = adapter.header_extension_ids(adapter.sender_header_extensions(self._sender))
        bandwidth = self._bandwidth
        self._transport_cc = bandwidth is not None and bandwidth.transport_cc
        self._writer = RtpWriter(payload_type, adapter.sender_ssrc(self._sender), mid=mid, mid_id=mid_id,
                                 abs_send_time_id=abs_id, audio_level_id=audio_id,
                                 transport_cc_id=TRANSPORT_CC_ID if self._transport_cc else None)
        self._bound = True
        self._log.debug("consumer bound", consumer=self.id, source=self.source.id, mid=mid)
        self._request_switch()

    def _request_switch(self) -> None:
        self._switch_requested = time.monotonic()
        self.source.request_keyframe(self.target_layer)

    def deliver(self, packet: RtpPacket, meta: PacketMeta) -> Awaitable[bool] | None:
        """
        Rewrite one source packet for this subscriber and send it: synchronously when the nominated ICE pair
        allows (see :func:`adapter.direct_rtp_sender`), else by returning the asynchronous send to await.
        Nothing is sent before negotiation completes, while waiting for a keyframe, for another layer than the
        one being sent, or once closed.
        """
        if self.closed:
            return None
        if not self._bound:
            if not adapter.sender_started(self._sender):
                return None
            self._bind()
        if self._suspended:
            return None
        layer = meta.layer
        if layer != self.layer or self._waiting_keyframe:
            if layer != self.target_layer or not meta.keyframe:
                if self.layer != self.target_layer and time.monotonic() - self._switch_requested > SWITCH_RETRY:
                    self._request_switch()  # the keyframe did not come (lost, or the layer is not sent)
                if layer != self.layer or self._waiting_keyframe:
                    return None
            else:
                self._switch(layer)
        payload = packet.payload
        if self._munge is None:
            self._munge = self._vp8 is not None and (self.source.layer_count > 1 or meta.temporal > 0 or (
                meta.vp8 is not None and meta.vp8.tid is not None))
        if self._munge and meta.vp8 is not None:
            assert self._vp8 is not None
            munged = self._vp8.munge(payload, layer, meta.vp8)
            if munged is None:
                self._seq.drop(packet.sequence_number)
                return None
            payload = munged
        seq = self._seq.forward(packet.sequence_number)
        if seq is None:
            return None
        timestamp = self._ts.rewrite(packet.timestamp, meta.now)
        self._last_ts = timestamp
        tseq = self._bandwidth.next_seq() if self._transport_cc and self._bandwidth is not None else None
        data = self._writer.write(packet, seq, timestamp, meta.abs_send_time, payload, tseq)
        self._cache.put(seq, data, self._writer.transport_cc_at)
        return self._send(data, len(payload), meta.ntp, tseq)

    def _switch(self, layer: int) -> None:
        if self.layer is not None and layer != self.layer:
            self.stats.switches += 1
            self._log.debug("layer switch", consumer=self.id, source=self.source.id, layer=layer,
                            previous=self.layer, reason=self.reason)
        self.layer = layer
        self._waiting_keyframe = False
        self._seq.switch()
        self._ts.switch()
        self.source.listen(self, self._layers_needed())

    def _send(self, data: bytes, payload_size: int, ntp: int, tseq: int | None) -> Awaitable[bool] | None:
        send = self._direct
        if send is None:
            send = self._direct = adapter.direct_rtp_sender(self._sender)
        if send is None:  # no synchronous path to this subscriber (e.g. a TURN-relayed pair)
            return self._transmit(data, payload_size, ntp, tseq)
        try:
            send(data)
        except ConnectionError:
            self._direct = None
            return None
        self._count_sent(data, payload_size, ntp, tseq)
        return None

    async def _transmit(self, data: bytes, payload_size: int, ntp_time: int, tseq: int | None) -> bool:
        """Send prepared bytes through aiortc's transport (works for every candidate pair)."""
        try:
            await adapter.send_rtp(self._sender, data)
        except ConnectionError:
            return False
        self._count_sent(data, payload_size, ntp_time, tseq)
        return True

    def _count_sent(self, data: bytes, payload_size: int, ntp_time: int, tseq: int | None) -> None:
        adapter.sender_count_sent(self._sender, payload_size, self._last_ts, ntp_time)
        self.stats.packets += 1
        self.stats.bytes += payload_size
        if tseq is not None and self._bandwidth is not None:
            self._bandwidth.sent(tseq, len(data))

    async def send_padding(self, size: int, abs_send_time: bytes | None) -> int:
        """Send one padding-only packet of about ``size`` bytes (a bandwidth probe); returns the bytes sent."""
        if not self.forwarding or self._bandwidth is None or not self._transport_cc:
            return 0
        seq = self._seq.insert()
        tseq = self._bandwidth.next_seq()
        data = self._writer.padding(seq, self._last_ts, abs_send_time, size, tseq)
        try:
            await adapter.send_rtp(self._sender, data)
        except ConnectionError:
            return 0
        self._bandwidth.sent(tseq, len(data))
        self.stats.padding_bytes += len(data)
        return len(data)

    # --- RTCP from the subscriber ----------------------------------------------------------------------

    async def _handle_rtcp(self, packet: AnyRtcpPacket) -> None:
        if self.closed:
            return
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            if packet.fmt == RTCP_PSFB_PLI:
                self.stats.plis += 1
            else:
                self.stats.firs += 1
            self.source.request_keyframe(self.layer if self.layer is not None else self.target_layer)
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.stats.nacks += 1
            for seq in packet.lost:
                entry = self._cache.get(seq)
                if entry is not None:
                    data, at = entry
                    tseq = None
                    if at >= 0 and self._bandwidth is not None:
                        tseq = self._bandwidth.next_seq()  # a retransmission is a new packet on the wire
                        data = data[:at] + tseq.to_bytes(2, "big") + data[at + 2:]
                    try:
                        await adapter.send_rtp(self._sender, data)
                    except ConnectionError:
                        return
                    if tseq is not None and self._bandwidth is not None:
                        self._bandwidth.sent(tseq, len(data))
                    self.stats.retransmitted += 1
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                self.stats.remb_bps = unpack_remb_fci(packet.fci)[0]
            except ValueError:
                pass
        elif isinstance(packet, RtcpRtpfbPacket):
            pass  # transport-cc (fmt 15, read from the raw datagram by the subscribe transport) and others
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
        self._cache.clear()
        adapter.unhook_sender_rtcp(self._sender)
        stats.retire(self.stats, stats.CONSUMER_COUNTERS)

    def source_closed(self) -> None:
        """The source ended: close, and tell the owning transport so it retires the m-section."""
        if self.closed:
            return
        self.close()
        self._on_source_closed(self)

