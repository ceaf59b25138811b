"""A Producer is one published track: it receives RTP from a publisher and fans it out to Consumers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from aiortc import RTCRtpReceiver, RTCRtpTransceiver, clock
from aiortc.codecs import is_rtx
from aiortc.rtp import RtpPacket, unwrap_rtx

from . import aiortc_adapter as adapter
from . import stats
from .logs import PeerLogger
from .rtp import keyframe_detector

if TYPE_CHECKING:
    from .consumer import Consumer

logger = logging.getLogger("chorus.sfu.producer")

#: At most one keyframe request per producer in this many seconds, whatever the number of subscribers.
KEYFRAME_REQUEST_INTERVAL = 0.5


class ProducerStats:
    """Counters of one producer, read by metrics."""

    __slots__ = ("packets", "bytes", "keyframe_requests", "forwarded_packets", "forwarded_bytes")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.keyframe_requests = 0
        self.forwarded_packets = 0
        self.forwarded_bytes = 0


class Producer:
    """
    One published audio or video track of a peer.

    Lifecycle: *new* (negotiated, no media yet) → *live* (RTP arriving; ``paused`` while its owner has
    muted it) → *closed* (its peer left or renegotiated it away; every consumer is closed with it).

    It hooks the aiortc receiver so each RTP packet is forwarded, unchanged in payload, to every consumer
    before aiortc's own handling (statistics, receiver reports, NACKs) sees it. Keyframe requests from
    all consumers are merged: at most one PLI per :data:`KEYFRAME_REQUEST_INTERVAL` goes to the publisher,
    and a request inside that window is sent when the window ends rather than dropped.
    """

    def __init__(
        self,
        producer_id: str,
        peer_id: str,
        transceiver: RTCRtpTransceiver,
        *,
        log: PeerLogger,
    ) -> None:
        receiver = transceiver.receiver
        codecs = adapter.transceiver_codecs(transceiver)
        self.id = producer_id
        self.peer_id = peer_id
        self.kind: str = transceiver.kind
        self.mid: str | None = transceiver.mid
        #: The codec the publisher sends (the first negotiated one).
        self.codec = codecs[0]
        self.paused = False
        self.closed = False
        self.ssrc: int | None = None
        self.stats = ProducerStats()
        self.consumers: dict[str, Consumer] = {}

        self._receiver: RTCRtpReceiver = receiver
        self._log = log
        self._is_keyframe = keyframe_detector(self.codec.mimeType)
        self._last_keyframe_request = 0.0
        self._pending_keyframe: asyncio.TimerHandle | None = None
        self._keyframe_task: asyncio.Task[None] | None = None
        self._on_close: list[Callable[[Producer], object]] = []
        adapter.disable_decoding(receiver)
        self._original_handler = adapter.hook_receiver_rtp(receiver, self._handle_rtp)

    def __repr__(self) -> str:
        return f"Producer(id={self.id}, peer={self.peer_id}, kind={self.kind}, codec={self.codec.mimeType})"

    # --- consumers -----------------------------------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers[consumer.id] = consumer

    def remove_consumer(self, consumer: Consumer) -> None:
        self.consumers.pop(consumer.id, None)

    def on_close(self, callback: Callable[[Producer], object]) -> None:
        """Register ``callback(producer)`` to run once when the producer closes."""
        self._on_close.append(callback)

    # --- control ---------------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop forwarding (the owner muted the track)."""
        self.paused = True

    def resume(self) -> None:
        """Resume forwarding; every consumer restarts at the next keyframe, which is requested now."""
        if not self.paused:
            return
        self.paused = False
        for consumer in self.consumers.values():
            consumer.restart()
        self.request_keyframe()

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe, merged with other requests (see class docstring)."""
        if self.kind != "video" or self.closed:
            return
        if self._pending_keyframe is not None:
            return  # one is already scheduled for the end of the window
        wait = self._last_keyframe_request + KEYFRAME_REQUEST_INTERVAL - time.monotonic()
        if wait > 0:
            self._pending_keyframe = asyncio.get_running_loop().call_later(wait, self._send_keyframe_request)
        else:
            self._send_keyframe_request()

    def _send_keyframe_request(self) -> None:
        self._pending_keyframe = None
        if self.closed:
            return
        if self.ssrc is None:
            # No media yet: the first packet will trigger the request (see _handle_rtp).
            self._last_keyframe_request = 0.0
            return
        self._last_keyframe_request = time.monotonic()
        self.stats.keyframe_requests += 1
        if self._keyframe_task is None or self._keyframe_task.done():
            self._keyframe_task = asyncio.ensure_future(adapter.send_pli(self._receiver, self.ssrc))

    def close(self) -> None:
        """Close the producer and all its consumers. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._pending_keyframe is not None:
            self._pending_keyframe.cancel()
            self._pending_keyframe = None
        if self._keyframe_task is not None:
            self._keyframe_task.cancel()
        for consumer in list(self.consumers.values()):
            consumer.close()
        self.consumers.clear()
        adapter.unhook_receiver_rtp(self._receiver)
        stats.retire(self.stats, stats.PRODUCER_COUNTERS)
        for callback in self._on_close:
            callback(self)
        self._on_close.clear()
        self._log.info("producer closed", producer=self.id, kind=self.kind)

    # --- media -----------------------------------------------------------------------------------------

    async def _handle_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        codec = adapter.receiver_codecs(self._receiver).get(packet.payload_type)
        forward = packet
        if codec is not None and is_rtx(codec):
            # A retransmission (answering aiortc's NACK upstream): forward the original packet it carries.
            original_ssrc = adapter.receiver_rtx_ssrcs(self._receiver).get(packet.ssrc, self.ssrc)
            apt = codec.parameters.get("apt")
            if original_ssrc is None or len(packet.payload) < 2 or apt != self.codec.payloadType:
                forward = None  # type: ignore[assignment]
            else:
                forward = unwrap_rtx(packet, payload_type=cast(int, apt), ssrc=original_ssrc)  # apt == payloadType
        elif codec is None or packet.payload_type != self.codec.payloadType:
            forward = None  # type: ignore[assignment]

        if forward is not None:
            if self.ssrc is None:
                self.ssrc = forward.ssrc
                if self.kind == "video":
                    self.request_keyframe()
            self.stats.packets += 1
            self.stats.bytes += len(forward.payload)
            if not self.paused and self.consumers:
                # Work shared by every consumer is done once per packet: keyframe test and clocks.
                keyframe = self._is_keyframe is None or self._is_keyframe(forward.payload)
                ntp = clock.current_ntp_time()
                abs_send_time = ((ntp >> 14) & 0x00FFFFFF).to_bytes(3, "big")
                now = time.time()
                sent = 0
                for consumer in list(self.consumers.values()):
                    data = consumer.prepare(forward, keyframe, abs_send_time, now)
                    if data is None:
                        continue
                    done = consumer.transmit_now(data, ntp)
                    if done is None:  # no synchronous path to this subscriber (e.g. TURN relay)
                        done = await consumer.transmit(data, ntp)
                    sent += done
                self.stats.forwarded_packets += sent
                self.stats.forwarded_bytes += sent * len(forward.payload)

        # aiortc's own receive path: stats, RTCP receiver reports, NACKs towards the publisher.
        await self._original_handler(packet, arrival_time_ms)
