"""A Producer is one published track: it receives RTP from a publisher and fans it out to its sinks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.codecs import is_rtx
from aiortc.rtp import RtpPacket, unwrap_rtx

from . import aiortc_adapter as adapter
from . import stats
from .layers import LayerReceiver, vp8_keyframe_size
from .logs import PeerLogger
from .source import Source
from .tasks import Tasks
from .vp8 import parse_vp8

#: At most one keyframe request per layer in this many seconds, whatever the number of subscribers.
KEYFRAME_REQUEST_INTERVAL = 0.5
#: A simulcast layer nobody has wanted for this long is paused at the publisher (``publish_layers``).
PAUSE_LAYER_AFTER = 2.0


class ProducerStats:
    """Counters of one producer, read by metrics."""

    __slots__ = ("packets", "bytes", "keyframe_requests", "nacks_sent", "redundant_rtx")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.keyframe_requests = 0
        self.nacks_sent = 0
        self.redundant_rtx = 0


@dataclass(slots=True)
class Route:
    """Where packets of one SSRC go: a producer's layer, as media or as its retransmissions (RTX)."""

    producer: Producer
    layer: LayerReceiver
    rtx: bool


class Producer(Source):
    """
    One published audio or video track of a peer: a :class:`~.source.Source` fed by its publish transport.

    Lifecycle: *new* (negotiated, no media yet) → *live* (RTP arriving; ``paused`` while its owner has muted it)
    → *closed* (its publish transport closed it; every sink gets ``source_closed``).

    A video track published with simulcast has one :class:`~.layers.LayerReceiver` per RTP stream (``rids``,
    lowest resolution first); otherwise one. The transport learns which SSRC is which layer from the MID and
    RID header extensions (:meth:`learn`) and hands each packet to :meth:`receive`, which keeps that layer's
    receive statistics (aiortc's receiver reports are built from them), NACKs gaps, unwraps retransmissions and
    drops those that repeat a forwarded packet, then forwards it to every sink with its layer and VP8
    descriptor. aiortc's own receive path (a single jitter buffer) is not used, except to decode when an MCU
    mixes the track (:meth:`decoded_track`).

    Keyframe requests from all sinks are merged per layer: at most one PLI per
    :data:`KEYFRAME_REQUEST_INTERVAL`, and a request inside that window is sent when the window ends.
    """

    def __init__(self, producer_id: str, peer_id: str, transceiver: RTCRtpTransceiver, *, tasks: Tasks,
                 log: PeerLogger, rids: list[str] | None = None) -> None:
        codecs = adapter.transceiver_codecs(transceiver)
        super().__init__(producer_id, peer_id, transceiver.kind, codecs[0])  # the first negotiated codec
        self._payload_type: int = codecs[0].payloadType or 0
        self.mid: str | None = transceiver.mid
        self.stats = ProducerStats()
        #: Told the RFC 6464 level (0-127, -dBov) of each audio packet while not paused (active speakers).
        self.on_audio_level: Callable[[int], None] | None = None
        self.receiver = transceiver.receiver
        rate = self.codec.clockRate
        self.layers = [LayerReceiver(i, rid, rate) for i, rid in enumerate(rids)] if rids else [
            LayerReceiver(0, None, rate)]
        self.simulcast = bool(rids)
        self._codecs = {c.payloadType: c for c in codecs}
        self._is_vp8 = self.codec.mimeType.lower() == "video/vp8"
        self._decode = False
        #: How many layers (lowest first) the publisher was last asked to send; all of them at first.
        self.publish_top = len(self.layers) - 1
        self._lower_since: float | None = None
        self._log = log
        self._tasks = tasks  # the publish transport's: it awaits them when it closes
        self._pending_keyframe: dict[int, asyncio.TimerHandle] = {}
        self._keyframe_tasks: dict[int, asyncio.Task[None]] = {}
        adapter.disable_decoding(self.receiver)

    def __repr__(self) -> str:
        return (f"Producer(id={self.id}, peer={self.peer_id}, kind={self.kind}, codec={self.codec.mimeType}, "
                f"layers={len(self.layers)})")

    @property
    def ssrc(self) -> int | None:
        """The SSRC of the (first) layer's media, once learned."""
        return self.layers[0].ssrc

    @property
    def layer_count(self) -> int:
        return len(self.layers)

    def layer_bitrate(self, layer: int) -> int:
        return self.layers[layer].bitrate

    def layer_active(self, layer: int) -> bool:
        """Whether the layer is being received. A layer silent while others flow has stopped (the publisher
        paused it, or cannot afford it); all of them silent at once is the publisher or its network stalling,
        which says nothing about any one layer: those seen before count as live."""
        now = time.monotonic()
        if self.layers[layer].active(now):
            return True
        return self.layers[layer].ssrc is not None and not any(other.active(now) for other in self.layers)

    def layer_height(self, layer: int) -> int:
        return self.layers[layer].height

    def layer_temporal(self, layer: int) -> list[int]:
        receiver = self.layers[layer]
        return list(receiver.bitrate_by_tid[: receiver.temporal_layers])

    def describe_layers(self) -> list[dict[str, Any]]:
        """Each layer's rid, SSRC, bitrate per temporal layer and whether it is live (admin API)."""
        now = time.monotonic()
        return [{"rid": layer.rid, "ssrc": layer.ssrc, "active": layer.active(now), "bitrate": layer.bitrate,
                 "width": layer.width, "height": layer.height,
                 "bitrate_by_temporal": list(layer.bitrate_by_tid), "keyframes": layer.keyframes,
                 "keyframe_requests": layer.keyframe_requests, "redundant_rtx": layer.redundant_rtx}
                for layer in self.layers]

    def decoded_track(self) -> MediaStreamTrack:
        """
        Keep decoding this track and return the track that yields its decoded frames (MCU rooms mix them). Call
        before aiortc starts the receiver; the track must then be read continuously (frames queue without bound).
        """
        adapter.enable_decoding(self.receiver)
        self._decode = True
        return self.receiver.track

    @property
    def decode_layer(self) -> int:
        """The layer an MCU decodes: the middle one of three (a tile of a composite is small), else the top."""
        return 1 if len(self.layers) == 3 else len(self.layers) - 1

    def wanted_layer(self) -> int | None:
        """The highest layer any sink wants (an MCU decoding the track counts), ``None`` when none wants any."""
        wanted = [sink.wanted_layer for sink in self._fanout]
        if self._decode:
            wanted.append(self.decode_layer)
        values = [w for w in wanted if w is not None]
        return max(values) if values else None

    def publish_layers_due(self, now: float) -> list[str] | None:
        """
        The RIDs the publisher should send now, when that changed (else ``None``): the lowest layer always (a
        viewer whose network worsens falls back to it at once), and every layer up to the highest one wanted. A
        layer is added as soon as it is wanted and paused only after nobody wanted it for :data:`PAUSE_LAYER_AFTER`.
        """
        if not self.simulcast:
            return None
        top = self.wanted_layer() or 0
        if top > self.publish_top:
            self.publish_top = top
        elif top < self.publish_top:
            if self._lower_since is None:
                self._lower_since = now
            if now - self._lower_since < PAUSE_LAYER_AFTER:
                return None
            self.publish_top = top
        else:
            self._lower_since = None
            return None
        self._lower_since = None
        return [layer.rid or "" for layer in self.layers[: self.publish_top + 1]]

    # --- the receive path --------------------------------------------------------------------------------

    def learn(self, packet: RtpPacket) -> Route | None:
        """
        Which layer a packet of a new SSRC belongs to, from its RID (media) or repaired RID (RTX) header extension;
        without simulcast, the only layer. ``None`` when it cannot be placed (yet): e.g. a simulcast packet that
        carries no RID.
        """
        codec = self._codecs.get(packet.payload_type)
        if codec is None:
            return None
        rtx = is_rtx(codec)
        if self.simulcast:
            rid = packet.extensions.repaired_rtp_stream_id if rtx else packet.extensions.rtp_stream_id
            layer = next((layer for layer in self.layers if layer.rid == rid), None)
            if layer is None:
                return None
        else:
            layer = self.layers[0]
            if rtx:
                media_ssrc = adapter.receiver_rtx_ssrcs(self.receiver).get(packet.ssrc)
                if media_ssrc is not None and layer.ssrc is None:
                    layer.ssrc = media_ssrc
        if rtx:
            layer.rtx_ssrc = packet.ssrc
        else:
            layer.ssrc = packet.ssrc
            if not self._decode:  # when decoding, aiortc's own path keeps the statistics
                adapter.receiver_streams(self.receiver)[packet.ssrc] = layer.stats  # receiver reports
        self._log.debug("stream learned", producer=self.id, ssrc=packet.ssrc, layer=layer.index, rid=layer.rid,
                        rtx=rtx)
        return Route(self, layer, rtx)

    async def receive(self, packet: RtpPacket, route: Route, arrival_time_ms: int, now: float) -> None:
        """Handle one RTP packet of this track (see the class docstring)."""
        if self.closed:
            return
        layer = route.layer
        if route.rtx:
            codec = self._codecs.get(packet.payload_type)
            apt = codec.parameters.get("apt") if codec is not None else None
            if layer.ssrc is None or len(packet.payload) < 2 or apt != self._payload_type:
                return  # padding, or a retransmission of a stream we do not know yet
            packet = unwrap_rtx(packet, payload_type=self._payload_type, ssrc=layer.ssrc)
        elif packet.payload_type != self._payload_type:
            return
        if not packet.payload:
            return  # padding only
        descriptor = parse_vp8(packet.payload) if self._is_vp8 else None
        temporal = descriptor.tid or 0 if descriptor is not None else 0
        if not layer.received(packet, temporal, now, statistics=not self._decode):
            self.stats.redundant_rtx += 1
            return
        if self._decode and layer.index == self.decode_layer:
            # An MCU mixes this track: aiortc's receive path decodes it (and keeps the statistics).
            await adapter.receiver_handle_rtp(self.receiver, packet, arrival_time_ms)
        if self.kind == "video" and not self._decode:
            lost = layer.missing(packet)
            if lost and layer.ssrc is not None:
                self.stats.nacks_sent += 1
                await adapter.send_nack(self.receiver, layer.ssrc, lost)
        keyframe = descriptor.keyframe if descriptor is not None else None
        if keyframe is None:
            keyframe = self._is_keyframe is None or self._is_keyframe(packet.payload)
        if keyframe and self.kind == "video":
            layer.keyframes += 1
            if descriptor is not None:
                size = vp8_keyframe_size(packet.payload, descriptor.size)
                if size is not None:
                    layer.width, layer.height = size
        if layer.packets == 1 and self.kind == "video":
            self.request_keyframe(layer.index)  # the first packets of a stream: its viewers need a start
        self.stats.packets += 1
        self.stats.bytes += len(packet.payload)
        if self.on_audio_level is not None and packet.extensions.audio_level is not None and not self.paused:
            self.on_audio_level(packet.extensions.audio_level[1])
        await self.forward(packet, keyframe, layer.index, descriptor)

    # --- control ---------------------------------------------------------------------------------------

    def request_keyframe(self, layer: int | None = None) -> None:
        """Ask the publisher for a keyframe of ``layer`` (every layer when ``None``), merged with other requests
        (see the class docstring)."""
        if self.kind != "video" or self.closed:
            return
        for index in range(len(self.layers)) if layer is None else (layer,):
            if not 0 <= index < len(self.layers) or index in self._pending_keyframe:
                continue  # no such layer, or a request is already scheduled for the end of the window
            wait = self.layers[index].keyframe_requested_at + KEYFRAME_REQUEST_INTERVAL - time.monotonic()
            if wait > 0:
                self._pending_keyframe[index] = asyncio.get_running_loop().call_later(
                    wait, self._send_keyframe_request, index)
            else:
                self._send_keyframe_request(index)

    def _send_keyframe_request(self, index: int) -> None:
        self._pending_keyframe.pop(index, None)
        layer = self.layers[index]
        if self.closed:
            return
        if layer.ssrc is None:
            # No media yet: the first packet will trigger the request (see receive).
            layer.keyframe_requested_at = 0.0
            return
        layer.keyframe_requested_at = time.monotonic()
        layer.keyframe_requests += 1
        self.stats.keyframe_requests += 1
        task = self._keyframe_tasks.get(index)
        if task is None or task.done():  # one PLI in flight per layer
            self._keyframe_tasks[index] = self._tasks.spawn(adapter.send_pli(self.receiver, layer.ssrc),
                                                            name=f"pli {self.id}/{index}")

    def close(self) -> None:
        """Close the producer: every sink gets ``source_closed``. Idempotent."""
        if self.closed:
            return
        super().close()
        for handle in self._pending_keyframe.values():
            handle.cancel()
        self._pending_keyframe.clear()
        for task in self._keyframe_tasks.values():
            task.cancel()  # the transport's Tasks awaits them
        stats.retire(self.stats, stats.PRODUCER_COUNTERS)
        self._log.info("producer closed", producer=self.id, kind=self.kind)
