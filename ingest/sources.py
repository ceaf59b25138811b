"""
The ingest side of the media plane's source seam: :class:`chorus.sfu.source.Source` objects fed by an ingested
stream, so a room's participants (and WHEP viewers) consume an encoder or a camera exactly like a published track.

- :class:`H264Source` — H.264 access units packetized to RTP (RFC 6184, packetization-mode 1, SPS/PPS in a STAP-A
  before every IDR, see :class:`.h264.H264Packetizer`), its codec naming the stream's own ``profile-level-id``.
- :class:`OpusSource` — Opus packets (RFC 7587) from :class:`.transcode.AacToOpus`.

Both are fed from the event loop without blocking (``push``): packets of one access unit or Opus packet are queued,
and one task per source hands them to :meth:`~chorus.sfu.source.Source.forward` in order (a sink may make it
wait: a TURN-relayed subscriber's send). When sinks hold it up for longer than the queue allows, whole units are
dropped — for video until the next keyframe, since a decoder cannot skip a reference picture.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable

from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from chorus.sfu.source import Source
from chorus.sfu.tasks import Tasks

from .h264 import CLOCK_RATE, H264Packetizer, rtp_timestamp
from .media import VideoAccessUnit, VideoConfig
from .transcode import OPUS_RATE, OpusPacket

#: Payload types the sources are labelled with (each subscriber's consumer writes its negotiated one).
H264_PAYLOAD_TYPE = 102
OPUS_PAYLOAD_TYPE = 111
#: Seconds over which :meth:`IngestSource.layer_bitrate` is measured.
RATE_WINDOW = 2.0
#: Largest RTP payload produced (fits a 1280-byte IPv6 MTU path with SRTP and header extensions).
MAX_PAYLOAD = 1200


class SourceStats:
    """Counters of one ingest source, read by the admin API."""

    __slots__ = ("units", "keyframes", "packets", "bytes", "dropped_units", "keyframe_requests")

    def __init__(self) -> None:
        self.units = 0
        self.keyframes = 0
        self.packets = 0
        self.bytes = 0
        self.dropped_units = 0
        self.keyframe_requests = 0


def h264_codec(config: VideoConfig) -> RTCRtpCodecParameters:
    """The RTP codec of an H.264 stream: packetization-mode 1 and the stream's own ``profile-level-id``."""
    return RTCRtpCodecParameters(
        mimeType="video/H264", clockRate=CLOCK_RATE, payloadType=H264_PAYLOAD_TYPE,
        parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1",
                    "profile-level-id": config.profile_level_id.lower()},
    )


OPUS_CODEC = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=OPUS_RATE, channels=2,
                                   payloadType=OPUS_PAYLOAD_TYPE, parameters={})


class IngestSource(Source):
    """
    A :class:`~chorus.sfu.source.Source` fed from the loop: :meth:`_enqueue` queues the packets of one unit, a task
    (owned by ``tasks``) forwards them in order.

    Lifecycle: *open* (created; the forwarding task runs) → *closed* (:meth:`close`: queued units are dropped,
    every sink gets ``source_closed``).
    """

    def __init__(self, source_id: str, peer_id: str, kind: str, codec: RTCRtpCodecParameters, *, tasks: Tasks,
                 max_queue: int = 64) -> None:
        super().__init__(source_id, peer_id, kind, codec)
        self.stats = SourceStats()
        self._queue: asyncio.Queue[list[tuple[RtpPacket, bool]] | None] = asyncio.Queue(max_queue)
        self._sequence = random.randint(0, 0xFFFF)
        self._skip_to_keyframe = False
        self._sizes: deque[tuple[float, int]] = deque()
        self._task = tasks.spawn(self._run(), name=f"forward {source_id}")

    def _packets(self, payloads: list[tuple[bytes, bool]], timestamp: int, keyframe: bool) -> list[
            tuple[RtpPacket, bool]]:
        packets = []
        for i, (payload, marker) in enumerate(payloads):
            packets.append((RtpPacket(payload_type=self.codec.payloadType or 0, marker=int(marker),
                                      sequence_number=self._sequence, timestamp=timestamp & 0xFFFFFFFF,
                                      payload=payload), keyframe and i == 0))
            self._sequence = (self._sequence + 1) & 0xFFFF
        return packets

    def _enqueue(self, packets: list[tuple[RtpPacket, bool]], keyframe: bool) -> None:
        if self.closed or not packets:
            return
        if self._skip_to_keyframe and not keyframe:
            self.stats.dropped_units += 1
            return
        try:
            self._queue.put_nowait(packets)
        except asyncio.QueueFull:
            self.stats.dropped_units += 1
            self._skip_to_keyframe = self.kind == "video"
            return
        self._skip_to_keyframe = False
        self.stats.units += 1
        self.stats.keyframes += int(keyframe and self.kind == "video")
        self.stats.packets += len(packets)
        size = sum(len(p.payload) for p, _ in packets)
        self.stats.bytes += size
        now = time.monotonic()
        self._sizes.append((now, size))
        while self._sizes[0][0] < now - RATE_WINDOW:
            self._sizes.popleft()

    def layer_bitrate(self, layer: int) -> int:
        """Bits per second forwarded over the last :data:`RATE_WINDOW` seconds (the only layer)."""
        now = time.monotonic()
        return int(sum(size for at, size in self._sizes if at >= now - RATE_WINDOW) * 8 / RATE_WINDOW)

    async def _run(self) -> None:
        while (packets := await self._queue.get()) is not None:
            for packet, keyframe in packets:
                await self.forward(packet, keyframe)

    def close(self) -> None:
        """Stop forwarding (queued packets are dropped); every sink gets ``source_closed``. Idempotent."""
        if self.closed:
            return
        super().close()
        self._task.cancel()  # its Tasks owner awaits it


class H264Source(IngestSource):
    """
    H.264 access units → RTP. The codec is fixed when the source is created, from the stream's configuration
    (its ``profile-level-id`` is what subscribers are offered); later configurations (a new resolution) only
    change the parameter sets sent before each IDR.

    :param on_keyframe_request: what :meth:`request_keyframe` does: ask the re-encoder for an IDR. ``None`` for a
        stream forwarded as it arrives (passthrough): an RTMP/SRT encoder or a camera cannot be asked, so a new
        subscriber starts at the stream's next periodic keyframe (the encoder's keyframe interval; see
        docs/ingest.md), and the request is only counted.
    """

    def __init__(self, source_id: str, peer_id: str, config: VideoConfig, *, tasks: Tasks,
                 on_keyframe_request: Callable[[], None] | None = None) -> None:
        super().__init__(source_id, peer_id, "video", h264_codec(config), tasks=tasks)
        self.packetizer = H264Packetizer(MAX_PAYLOAD)
        self.packetizer.config = config
        self._on_keyframe_request = on_keyframe_request

    def set_config(self, config: VideoConfig) -> None:
        """New parameter sets (sent before the next IDR); the advertised codec stays as negotiated."""
        self.packetizer.config = config

    def push(self, unit: VideoAccessUnit) -> None:
        """Packetize one access unit (``pts_ms == dts_ms``: no reordering) and queue it for forwarding."""
        payloads = self.packetizer.packetize(unit)
        self._enqueue(self._packets(payloads, rtp_timestamp(unit.pts_ms), unit.keyframe), unit.keyframe)

    def request_keyframe(self, layer: int | None = None) -> None:
        """Ask the re-encoder for an IDR; nothing can be asked of a passthrough stream (see the class docstring).
        There is one layer."""
        if self.closed:
            return
        self.stats.keyframe_requests += 1
        if self._on_keyframe_request is not None:
            self._on_keyframe_request()


class OpusSource(IngestSource):
    """Opus packets (48 kHz, 20 ms) → RTP; every packet is decodable on its own."""

    def __init__(self, source_id: str, peer_id: str, *, tasks: Tasks) -> None:
        super().__init__(source_id, peer_id, "audio", OPUS_CODEC, tasks=tasks)

    def push(self, packet: OpusPacket) -> None:
        self._enqueue(self._packets([(packet.data, False)], packet.timestamp, True), True)
