"""A Producer is one published track: it receives RTP from a publisher and fans it out to its sinks."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.codecs import is_rtx
from aiortc.rtp import RtpPacket, unwrap_rtx

from . import aiortc_adapter as adapter
from . import stats
from .logs import PeerLogger
from .source import Source
from .tasks import Tasks

#: At most one keyframe request per producer in this many seconds, whatever the number of subscribers.
KEYFRAME_REQUEST_INTERVAL = 0.5


class ProducerStats:
    """Counters of one producer, read by metrics."""

    __slots__ = ("packets", "bytes", "keyframe_requests")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.keyframe_requests = 0


class Producer(Source):
    """
    One published audio or video track of a peer: a :class:`~.source.Source` fed by an aiortc receiver.

    Lifecycle: *new* (negotiated, no media yet) → *live* (RTP arriving; ``paused`` while its owner has
    muted it) → *closed* (its publish transport closed it; every sink gets ``source_closed``).

    It hooks the aiortc receiver so each RTP packet is forwarded, unchanged in payload, to every sink before
    aiortc's own handling (statistics, receiver reports, NACKs) sees it. Keyframe requests from all sinks are
    merged: at most one PLI per :data:`KEYFRAME_REQUEST_INTERVAL` goes to the publisher, and a request inside
    that window is sent when the window ends rather than dropped.
    """

    def __init__(self, producer_id: str, peer_id: str, transceiver: RTCRtpTransceiver, *, tasks: Tasks,
                 log: PeerLogger) -> None:
        codecs = adapter.transceiver_codecs(transceiver)
        super().__init__(producer_id, peer_id, transceiver.kind, codecs[0])  # the first negotiated codec
        self.mid: str | None = transceiver.mid
        self.ssrc: int | None = None
        self.stats = ProducerStats()

        self._receiver = transceiver.receiver
        self._log = log
        self._tasks = tasks  # the publish transport's: it awaits them when it closes
        self._keyframe_task: asyncio.Task[None] | None = None
        self._last_keyframe_request = 0.0
        self._pending_keyframe: asyncio.TimerHandle | None = None
        adapter.disable_decoding(self._receiver)
        self._original_handler = adapter.hook_receiver_rtp(self._receiver, self._handle_rtp)

    def __repr__(self) -> str:
        return f"Producer(id={self.id}, peer={self.peer_id}, kind={self.kind}, codec={self.codec.mimeType})"

    def decoded_track(self) -> MediaStreamTrack:
        """
        Keep decoding this track and return the track that yields its decoded frames (MCU rooms mix them). Call
        before aiortc starts the receiver; the track must then be read continuously (frames queue without bound).
        """
        adapter.enable_decoding(self._receiver)
        return self._receiver.track

    # --- control ---------------------------------------------------------------------------------------

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
        if self._keyframe_task is None or self._keyframe_task.done():  # one PLI in flight at a time
            self._keyframe_task = self._tasks.spawn(adapter.send_pli(self._receiver, self.ssrc), name=f"pli {self.id}")

    def close(self) -> None:
        """Close the producer: every sink gets ``source_closed``. Idempotent."""
        if self.closed:
            return
        super().close()
        if self._pending_keyframe is not None:
            self._pending_keyframe.cancel()
            self._pending_keyframe = None
        if self._keyframe_task is not None:
            self._keyframe_task.cancel()  # the transport's Tasks awaits it
        adapter.unhook_receiver_rtp(self._receiver)
        stats.retire(self.stats, stats.PRODUCER_COUNTERS)
        self._log.info("producer closed", producer=self.id, kind=self.kind)

    # --- media -----------------------------------------------------------------------------------------

    async def _handle_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        codec = adapter.receiver_codecs(self._receiver).get(packet.payload_type)
        forward: RtpPacket | None = packet
        if codec is not None and is_rtx(codec):
            # A retransmission (answering aiortc's NACK upstream): forward the original packet it carries.
            original_ssrc = adapter.receiver_rtx_ssrcs(self._receiver).get(packet.ssrc, self.ssrc)
            apt = codec.parameters.get("apt")
            if original_ssrc is None or len(packet.payload) < 2 or apt != self.codec.payloadType:
                forward = None
            else:
                forward = unwrap_rtx(packet, payload_type=cast(int, apt), ssrc=original_ssrc)  # apt == payloadType
        elif codec is None or packet.payload_type != self.codec.payloadType:
            forward = None

        if forward is not None:
            if self.ssrc is None:
                self.ssrc = forward.ssrc
                if self.kind == "video":
                    self.request_keyframe()
            self.stats.packets += 1
            self.stats.bytes += len(forward.payload)
            await self.forward(forward)

        # aiortc's own receive path: stats, RTCP receiver reports, NACKs towards the publisher.
        await self._original_handler(packet, arrival_time_ms)
