"""
Cheap subscribers: count what arrives, never decode.

:func:`hook_receiver` replaces an aiortc receiver's ``_handle_rtp_packet`` on the instance. Per packet it
feeds aiortc's own receive statistics (so the subscriber still sends honest RTCP receiver reports) and
counts packets, bytes and frames, the loss seen in sequence numbers, the one-way latency of each frame
(arrival of its *first* packet minus the send time the publisher put in the frame's trailer), the time
of the first complete keyframe, and the picture size of the last keyframe (which simulcast layer arrives).
Nothing goes to the jitter buffer or a decoder.

The fast path makes a subscriber connection cheaper still, so that one generator core can
receive what a server sends to a hundred subscribers: once an SSRC has been seen (and routed) by aiortc's
normal path, its SRTP packets are taken straight from the UDP protocol's ``datagram_received``,
unprotected and counted synchronously — skipping aioice's STUN parse attempt, its queue, a task wake-up,
and aiortc's full RTP parse and routing. STUN, DTLS and RTCP still go the normal way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pylibsrtp
from aiortc import RTCRtpReceiver
from aiortc.codecs import is_rtx
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RtpPacket, is_rtcp

from chorus.sfu import aiortc_adapter
from chorus.sfu.layers import vp8_keyframe_size
from chorus.sfu.rtp import vp8_is_keyframe_start

from .media import TRAILER_SIZE, read_trailer


def vp8_descriptor_size(payload: bytes) -> int:
    """Length of the VP8 payload descriptor (RFC 7741) at the start of ``payload``."""
    size = 1
    if payload[0] & 0x80:
        x = payload[1]
        size = 2
        if x & 0x80:
            size += 2 if payload[2] & 0x80 else 1
        if x & 0x40:
            size += 1
        if x & 0x30:
            size += 1
    return size


class TrackRecord:
    """What one subscriber received on one track."""

    __slots__ = (
        "kind", "start", "packets", "bytes", "frames", "latencies", "first_frame", "streams", "wanted", "width",
        "height", "keyframes", "_ts", "_frame_arrival", "_keyframe", "_prev", "_mark",
    )

    def __init__(self, kind: str, start: float | None) -> None:
        self.kind = kind
        self.start = start  # when the subscriber asked to join (for join → first frame), or None
        self.packets = 0
        self.bytes = 0
        self.frames = 0
        self.latencies: list[float] = []  # seconds, since the last mark
        self.first_frame: float | None = None
        self.streams: dict[int, StreamStatistics] = {}
        #: The simulcast layer the subscriber asked for (0 = lowest), if it asked.
        self.wanted: int | None = None
        #: The picture size of the last keyframe received (0 until one arrived), and how many arrived.
        self.width = 0
        self.height = 0
        self.keyframes = 0
        self._ts: int | None = None
        self._frame_arrival = 0.0
        self._keyframe = False
        self._prev = b""
        self._mark = (0, 0, 0, 0, 0)

    def _expected_received(self) -> tuple[int, int]:
        expected = received = 0
        for stats in self.streams.values():
            if stats.max_seq is not None:
                expected += stats.packets_expected
                received += stats.packets_received
        return expected, received

    def mark(self) -> None:
        """Start a measurement window."""
        self._mark = (self.packets, self.bytes, self.frames, *self._expected_received())
        self.latencies = []

    def window(self) -> dict[str, Any]:
        """Counts since :meth:`mark`."""
        packets, nbytes, frames, expected, received = self._mark
        now_expected, now_received = self._expected_received()
        return {
            "kind": self.kind,
            "packets": self.packets - packets,
            "bytes": self.bytes - nbytes,
            "frames": self.frames - frames,
            "expected": now_expected - expected,
            "received": now_received - received,
            "latencies_ms": [round(x * 1000, 3) for x in self.latencies],
            "first_frame_ms": None if self.first_frame is None or self.start is None
            else round((self.first_frame - self.start) * 1000, 1),
            "wanted_layer": self.wanted,
            "width": self.width,
            "height": self.height,
        }

    # --- per packet --------------------------------------------------------------------------------------

    def video_packet(self, packet: RtpPacket, now: float) -> None:
        payload = packet.payload
        self.packets += 1
        self.bytes += len(payload)
        if packet.timestamp != self._ts:
            self._ts = packet.timestamp
            self._frame_arrival = now
            self._keyframe = vp8_is_keyframe_start(payload)
            self._prev = b""
            if self._keyframe:
                self.keyframes += 1
                size = vp8_keyframe_size(payload, vp8_descriptor_size(payload))
                if size is not None:
                    self.width, self.height = size
        if not packet.marker:
            self._prev = payload
            return
        self.frames += 1
        if self._keyframe and self.first_frame is None:
            self.first_frame = now
        data = payload[vp8_descriptor_size(payload):] if len(payload) > 1 else payload
        if len(data) < TRAILER_SIZE and self._prev:
            prev = self._prev
            data = prev[vp8_descriptor_size(prev):][-(TRAILER_SIZE - len(data)):] + data
        sent = read_trailer(data)
        if sent is not None:
            self.latencies.append(self._frame_arrival - sent)

    def audio_packet(self, packet: RtpPacket, now: float) -> None:
        payload = packet.payload
        self.packets += 1
        self.bytes += len(payload)
        self.frames += 1
        if self.first_frame is None:
            self.first_frame = now
        sent = read_trailer(payload)
        if sent is not None:
            self.latencies.append(now - sent)


class FastPacket:
    """The RTP fields the counters read (a stand-in for aiortc's RtpPacket, parsed minimally)."""

    __slots__ = ("payload_type", "marker", "sequence_number", "timestamp", "ssrc", "payload")

    def __init__(self, data: bytes) -> None:
        b0 = data[0]
        b1 = data[1]
        self.marker = b1 >> 7
        self.payload_type = b1 & 0x7F
        self.sequence_number = (data[2] << 8) | data[3]
        self.timestamp = int.from_bytes(data[4:8], "big")
        self.ssrc = int.from_bytes(data[8:12], "big")
        pos = 12 + 4 * (b0 & 0x0F)
        if b0 & 0x10:  # header extension
            pos += 4 + 4 * ((data[pos + 2] << 8) | data[pos + 3])
        end = len(data) - (data[-1] if b0 & 0x20 else 0)
        self.payload = data[pos:end]


FastHandler = Callable[[bytes], None]

#: Per DTLS transport (one per subscriber connection with max-bundle): SSRC → fast handler.
_FAST_TABLE = "_bench_fast_handlers"


def hook_receiver(receiver: RTCRtpReceiver, record: TrackRecord) -> None:
    """Count ``receiver``'s packets into ``record`` instead of depacketizing and decoding them."""
    aiortc_adapter.disable_decoding(receiver)  # no decoder thread work, ever
    codecs = aiortc_adapter.receiver_codecs(receiver)
    streams = aiortc_adapter.receiver_streams(receiver)
    record.streams = streams
    on_packet = record.video_packet if record.kind == "video" else record.audio_packet
    clock = time.time

    def count(packet: Any, now: float, clock_rate: int) -> None:
        stats = streams.get(packet.ssrc)
        if stats is None:
            stats = streams[packet.ssrc] = StreamStatistics(clock_rate)
        stats.add(packet)  # aiortc's receiver reports are built from these
        on_packet(packet, now)

    async def handle(packet: RtpPacket, arrival_time_ms: int) -> None:
        now = clock()
        codec = codecs.get(packet.payload_type)
        if codec is None or is_rtx(codec):
            return
        count(packet, now, codec.clockRate)
        # From now on this SSRC may take the fast path (see install_fast_path).
        table = _fast_table(receiver.transport)
        if packet.ssrc not in table:
            clock_rate = codec.clockRate
            payload_type = packet.payload_type

            def fast(data: bytes) -> None:
                fast_packet = FastPacket(data)
                if fast_packet.payload_type == payload_type:
                    count(fast_packet, clock(), clock_rate)

            table[packet.ssrc] = fast

    aiortc_adapter.hook_receiver_rtp(receiver, handle)  # aiortc's own handler is never called


def _fast_table(dtls: Any) -> dict[int, FastHandler]:
    """The SSRC → handler table of a DTLS transport, installing the fast path on its first use (by then
    ICE has gathered: its sockets exist)."""
    table: dict[int, FastHandler] | None = getattr(dtls, _FAST_TABLE, None)
    if table is None:
        table = {}
        setattr(dtls, _FAST_TABLE, table)
        for protocol in aiortc_adapter.ice_protocols(dtls):
            aiortc_adapter.intercept_datagrams(protocol, _fast_receiver(dtls, table))
    return table


def _fast_receiver(dtls: Any, table: dict[int, FastHandler]) -> aiortc_adapter.DatagramHandler:
    """Takes SRTP datagrams of SSRCs in ``table`` (decrypted, to their handler); leaves the rest to aioice."""
    unprotect: Callable[[bytes], bytes] | None = None

    def receive(data: bytes, addr: tuple[Any, ...]) -> bool:
        nonlocal unprotect
        if len(data) > 12 and 127 < data[0] < 192 and not is_rtcp(data):
            handler = table.get(int.from_bytes(data[8:12], "big"))  # the SSRC is not encrypted
            if unprotect is None:
                unprotect = aiortc_adapter.srtp_unprotect(dtls)
            if handler is not None and unprotect is not None:
                try:
                    handler(unprotect(data))
                except pylibsrtp.Error:
                    pass
                return True
        return False

    return receive
