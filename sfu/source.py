"""
The source seam: anything that sinks subscribe to, and the one routine that fans its packets out.

A :class:`Source` is a stream of RTP packets of one kind and codec: a published track (:class:`~.producer.Producer`),
an MCU mix (:class:`~.mixer.MixedStream`), and next a simulcast layer set or an ingested RTMP/SRT/WHIP stream. A
:class:`Sink` receives them: a :class:`~.consumer.Consumer` (one subscriber's copy), and next a recorder or an
HTTP egress. Neither side knows the other's class, so a new kind of source or sink plugs in without casts.

:meth:`Source.forward` does the per-packet work shared by all sinks once (the keyframe test, the clocks) and
hands every sink the packet together with that shared :class:`PacketMeta`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiortc import clock
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from .rtp import keyframe_detector
from .vp8 import Vp8Descriptor


class PacketMeta:
    """What :meth:`Source.forward` works out once per packet for all its sinks."""

    __slots__ = ("keyframe", "ntp", "abs_send_time", "now", "layer", "temporal", "vp8")

    def __init__(self, keyframe: bool, ntp: int, abs_send_time: bytes, now: float, layer: int = 0,
                 vp8: Vp8Descriptor | None = None) -> None:
        #: The packet starts a decodable picture (always true for audio).
        self.keyframe = keyframe
        #: The simulcast layer (spatial index, 0 = lowest) the packet belongs to; 0 without simulcast.
        self.layer = layer
        #: The VP8 payload descriptor, parsed once for every sink (``None`` for other codecs).
        self.vp8 = vp8
        #: The temporal layer (VP8 TID), 0 when the stream has none.
        self.temporal = (vp8.tid or 0) if vp8 is not None else 0
        #: NTP time (64-bit fixed point) of forwarding, for sender reports.
        self.ntp = ntp
        #: The 3-byte abs-send-time header extension value (6.18 fixed-point seconds of ``ntp``).
        self.abs_send_time = abs_send_time
        #: Wall-clock seconds (``time.time()``).
        self.now = now


class Sink(Protocol):
    """
    Something that receives a source's packets: one subscriber's consumer, a recorder, an egress.

    ``deliver`` is called for every packet, in order; it returns ``None`` when it is done with the packet, or an
    awaitable that the source awaits before delivering the next packet (a slow path, e.g. a TURN-relayed send).
    """

    @property
    def id(self) -> str: ...

    @property
    def wanted_layer(self) -> int | None:
        """The highest layer this sink may want (``None``: none at all). The publisher is asked to keep sending
        the layers some sink wants; a sink that always wants the best returns ``layer_count - 1``."""

    def deliver(self, packet: RtpPacket, meta: PacketMeta) -> Awaitable[object] | None: ...

    def restart(self) -> None:
        """The source resumes after a pause: start again at the next keyframe, seamlessly."""

    def source_closed(self) -> None:
        """The source ended for good; the sink closes (and tells whoever owns it)."""


class Source:
    """
    A stream of one kind and codec that sinks subscribe to.

    Subclasses feed packets to :meth:`forward` and implement :meth:`request_keyframe`. ``peer_id`` names who it
    is announced as coming from (a participant, or ``mcu`` for a mix).

    Lifecycle: *open* → *closed* (:meth:`close`: every sink gets ``source_closed`` and is detached).
    """

    def __init__(self, source_id: str, peer_id: str, kind: str, codec: RTCRtpCodecParameters) -> None:
        self.id = source_id
        self.peer_id = peer_id
        self.kind = kind
        #: The codec the packets are in (payload type as received; each sink sets its negotiated one).
        self.codec = codec
        #: While paused (the owner muted the track) nothing is delivered.
        self.paused = False
        self.closed = False
        self._sinks: dict[str, Sink] = {}
        self._fanout: tuple[Sink, ...] = ()
        #: sink id → the layers it wants packets of (``None``: all)
        self._interest: dict[str, frozenset[int] | None] = {}
        #: layer → the sinks that want its packets
        self._by_layer: list[tuple[Sink, ...]] = []
        self._is_keyframe: Callable[[bytes], bool] | None = keyframe_detector(codec.mimeType)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id}, peer={self.peer_id}, kind={self.kind}, sinks={len(self._sinks)})"

    @property
    def sink_count(self) -> int:
        return len(self._sinks)

    # Layers: a simulcast source has several (spatial index 0 = lowest resolution); others have one.

    @property
    def layer_count(self) -> int:
        return 1

    def layer_bitrate(self, layer: int) -> int:
        """Bits per second the layer is arriving at (0 when unknown)."""
        return 0

    def layer_active(self, layer: int) -> bool:
        """Whether the layer is being received now (a publisher may stop sending one)."""
        return True

    def layer_height(self, layer: int) -> int:
        """The layer's picture height in pixels (0 when unknown)."""
        return 0

    def layer_temporal(self, layer: int) -> list[int]:
        """Bits per second of each temporal layer of ``layer`` that the stream has (one entry without temporal
        layers; empty when unknown)."""
        return []

    def attach(self, sink: Sink, layers: frozenset[int] | None = None) -> None:
        """Start delivering to ``sink`` (from the next packet) the packets of ``layers`` (all when ``None``)."""
        self._sinks[sink.id] = sink
        self._interest[sink.id] = layers
        self._rebuild()

    def listen(self, sink: Sink, layers: frozenset[int] | None) -> None:
        """Change which layers' packets ``sink`` gets (a consumer switching layers needs only the one it sends
        and the one it switches to: the others are not even offered to it)."""
        if sink.id in self._sinks and self._interest.get(sink.id) != layers:
            self._interest[sink.id] = layers
            self._rebuild()

    def detach(self, sink: Sink) -> None:
        """Stop delivering to ``sink``. Idempotent."""
        if self._sinks.pop(sink.id, None) is not None:
            self._interest.pop(sink.id, None)
            self._rebuild()

    def _rebuild(self) -> None:
        self._fanout = tuple(self._sinks.values())
        def wants(sink: Sink, layer: int) -> bool:
            layers = self._interest[sink.id]
            return layers is None or layer in layers

        self._by_layer = [tuple(s for s in self._fanout if wants(s, layer)) for layer in range(self.layer_count)]

    def request_keyframe(self, layer: int | None = None) -> None:
        """A sink needs a decodable picture of ``layer`` (every layer when ``None``). No-op for audio."""

    def pause(self) -> None:
        """Stop delivering (the owner muted the track)."""
        self.paused = True

    def resume(self) -> None:
        """Deliver again; every sink restarts at the next keyframe, which is requested now."""
        if not self.paused:
            return
        self.paused = False
        for sink in self._fanout:
            sink.restart()
        self.request_keyframe()

    async def forward(self, packet: RtpPacket, keyframe: bool | None = None, layer: int = 0,
                      vp8: Vp8Descriptor | None = None) -> None:
        """
        Deliver ``packet`` (of simulcast ``layer``, with its parsed VP8 descriptor if any) to every sink. The work
        all sinks share is done here, once: whether the packet starts a decodable picture (tested unless
        ``keyframe`` is given) and the send clocks.
        """
        if self.paused:
            return
        sinks = self._by_layer[layer] if layer < len(self._by_layer) else self._fanout
        if not sinks:
            return
        if keyframe is None:
            keyframe = self._is_keyframe is None or self._is_keyframe(packet.payload)
        ntp = clock.current_ntp_time()
        meta = PacketMeta(keyframe, ntp, ((ntp >> 14) & 0x00FFFFFF).to_bytes(3, "big"), time.time(), layer, vp8)
        for sink in sinks:
            pending = sink.deliver(packet, meta)
            if pending is not None:
                await pending

    def close(self) -> None:
        """End the source: every sink gets ``source_closed``. Idempotent."""
        if self.closed:
            return
        self.closed = True
        sinks, self._sinks, self._fanout = self._fanout, {}, ()
        self._interest.clear()
        self._by_layer = []
        for sink in sinks:
            sink.source_closed()
