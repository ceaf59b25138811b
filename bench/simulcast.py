"""
A simulcast publisher for the load generator. aiortc cannot send simulcast, so the video is sent by hand:

* **The offer.** An aiortc offer whose video m-section has a sender that never produces a frame
  (:class:`~chorus.sfu.consumer.IdleTrack`) is rewritten as a browser's simulcast offer (Chromium 156's, see
  ``tests/fixtures/chromium156_simulcast_offer.sdp``): ``a=rid:<rid> send`` for each layer,
  ``a=simulcast:send q;h;f`` (lowest first), the RID and repaired-RID ``a=extmap`` lines beside aiortc's MID and
  abs-send-time ones, and no ``a=ssrc`` lines (the servers learn each layer's SSRC from its RID).
* **The media.** Once connected, :class:`SimulcastSender` sends the three pre-encoded layers of
  :func:`~.media.load_simulcast_clip` at 30 fps on the video sender's transport (SRTP-protected by aiortc's DTLS
  session, through ``aiortc_adapter``), each layer with its own SSRC and random sequence, timestamp, picture-id
  and TL0PICIDX bases, as a browser's layers are. Packets carry the VP8 payload descriptor Chromium writes (15-bit
  picture id, TL0PICIDX, TID and Y bit of the L1T3 structure), abs-send-time, and the MID and RID header
  extensions until a receiver report acknowledges the layer's SSRC (as libwebrtc does). Every frame ends with the
  send-time trailer of :mod:`.media`, so subscribers measure latency as they do for the single-layer clip.
* **Keyframe requests.** RTCP about the layers' SSRCs is routed to the video sender
  (``aiortc_adapter.register_sender_ssrc``); a PLI for a layer makes that layer skip ahead to its clip's next
  keyframe, like :class:`~.media.ClipVideoTrack`; a FIR does so for every layer.
"""

from __future__ import annotations

import asyncio
import random
import re
import struct
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpTransceiver
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, AnyRtcpPacket, RtcpPsfbPacket, RtcpRrPacket, RtcpSrPacket

from chorus.sfu import aiortc_adapter
from chorus.sfu.simulcast import MID_URI, REPAIRED_RID_URI, RID_URI
from chorus.sfu.tasks import Tasks

from .media import VIDEO_FPS, LayerClip, SimulcastClip, tag_vp8

ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
#: Header extension IDs for the RID and repaired RID (aiortc's offer uses 1-3; Chromium uses 10 and 11).
RID_ID = 10
REPAIRED_RID_ID = 11
#: The most VP8 payload bytes per RTP packet (as aiortc's packetizer).
MAX_PAYLOAD = 1200
_NTP_EPOCH = 2208988800  # seconds from 1900 to 1970
_EXTMAP = re.compile(r"a=extmap:(\d+)(?:/\w+)?\s+(\S+)")


def simulcast_offer(sdp: str, mid: str, rids: list[str]) -> str:
    """
    ``sdp`` (an aiortc offer) with the m-section of ``mid`` turned into a simulcast offer of ``rids`` (lowest
    resolution first): see the module docstring.

    :raises ValueError: no such m-section.
    """
    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")] + [len(lines)]
    for start, end in zip(starts, starts[1:], strict=False):
        section = lines[start:end]
        if f"a=mid:{mid}" not in section:
            continue
        kept = [line for line in section if not line.startswith(("a=ssrc:", "a=ssrc-group:"))]
        last_extmap = max((i for i, line in enumerate(kept) if line.startswith("a=extmap:")), default=1)
        kept[last_extmap + 1:last_extmap + 1] = [f"a=extmap:{RID_ID} {RID_URI}",
                                                 f"a=extmap:{REPAIRED_RID_ID} {REPAIRED_RID_URI}"]
        kept += [f"a=rid:{rid} send" for rid in rids] + ["a=simulcast:send " + ";".join(rids)]
        return newline.join(lines[:start] + kept + lines[end:]) + newline
    raise ValueError(f"no m-section with mid {mid!r} in the offer")


def extmap_ids(sdp: str, mid: str) -> dict[str, int]:
    """The header extension IDs (by URI) of the m-section of ``mid`` (empty when there is none)."""
    sections: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append([])
        elif sections:
            sections[-1].append(line)
    for section in sections:
        if f"a=mid:{mid}" in section:
            return {m.group(2): int(m.group(1)) for line in section if (m := _EXTMAP.match(line)) is not None}
    return {}


def _element(ext_id: int, value: bytes) -> bytes:
    """One element of a one-byte header extension block (RFC 8285 §4.2)."""
    return bytes([(ext_id << 4) | (len(value) - 1)]) + value


def rtp_packet(payload_type: int, marker: bool, seq: int, timestamp: int, ssrc: int, elements: bytes,
               payload: bytes) -> bytes:
    """A serialized RTP packet (RFC 3550 §5.1) with a one-byte header extension block of ``elements``."""
    header = struct.pack("!BBHII", 0x90 if elements else 0x80, (0x80 if marker else 0) | payload_type, seq,
                         timestamp, ssrc)
    if not elements:
        return header + payload
    padded = elements + b"\x00" * (-len(elements) % 4)
    return header + struct.pack("!HH", 0xBEDE, len(padded) // 4) + padded + payload


class _Layer:
    """The sending state of one simulcast layer."""

    __slots__ = ("clip", "rid", "ssrc", "seq", "ts_base", "picture_id", "tl0", "offset", "acked", "keyframe_wanted",
                 "keyframes_forced", "packets", "bytes")

    def __init__(self, clip: LayerClip, rng: random.Random) -> None:
        self.clip = clip
        self.rid = clip.rid
        self.ssrc = rng.getrandbits(32)
        self.seq = rng.randrange(0x10000)
        self.ts_base = rng.getrandbits(32)
        self.picture_id = rng.randrange(0x8000)
        self.tl0 = rng.randrange(0x100)
        self.offset = 0
        self.acked = False  # a receiver report mentioned this SSRC: MID and RID no longer needed
        self.keyframe_wanted = False
        self.keyframes_forced = 0
        self.packets = 0
        self.bytes = 0


class SimulcastSender:
    """
    Sends the simulcast clip on a video transceiver (see the module docstring).

    Lifecycle: *new* → :meth:`offer` (rewrites the offer) → :meth:`start` (negotiated and connected: sends until
    closed) → :meth:`close`.
    """

    def __init__(self, clip: SimulcastClip) -> None:
        rng = random.Random()
        self.layers = [_Layer(layer, rng) for layer in clip.layers]
        self._by_ssrc = {layer.ssrc: layer for layer in self.layers}
        self._tasks = Tasks("bench simulcast sender")
        self._transceiver: RTCRtpTransceiver | None = None
        self._ids: dict[str, int] = {}
        self._mid = b""
        self.frames = 0

    @property
    def rids(self) -> list[str]:
        return [layer.rid for layer in self.layers]

    def offer(self, sdp: str, transceiver: RTCRtpTransceiver) -> str:
        """The simulcast version of aiortc's offer ``sdp`` whose video is ``transceiver``'s."""
        mid = transceiver.mid
        if mid is None:
            raise ValueError("the video transceiver has no MID yet (call after setLocalDescription)")
        self._transceiver = transceiver
        self._mid = mid.encode()
        offer = simulcast_offer(sdp, mid, self.rids)
        self._ids = extmap_ids(offer, mid)
        return offer

    def start(self) -> None:
        """Start sending (the transceiver is negotiated and its transport connected)."""
        transceiver = self._transceiver
        if transceiver is None:
            raise RuntimeError("offer() was not called")
        sender = transceiver.sender
        for layer in self.layers:
            aiortc_adapter.register_sender_ssrc(sender, layer.ssrc)
        aiortc_adapter.hook_sender_rtcp(sender, self._on_rtcp)
        payload_type = aiortc_adapter.transceiver_codecs(transceiver)[0].payloadType
        assert payload_type is not None
        self._tasks.spawn(self._run(sender, payload_type), name="bench simulcast send")

    async def close(self) -> None:
        await self._tasks.close()
        if self._transceiver is not None:
            aiortc_adapter.unhook_sender_rtcp(self._transceiver.sender)

    # --- sending ---------------------------------------------------------------------------------------------

    async def _run(self, sender: Any, payload_type: int) -> None:
        direct: Callable[[bytes], None] | None = None
        mid_id, abs_id = self._ids.get(MID_URI), self._ids.get(ABS_SEND_TIME_URI)
        rid_id = self._ids.get(RID_URI, RID_ID)
        start = time.time()
        n = 0
        while True:
            wait = start + n / VIDEO_FPS - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.time()
            abs_send_time = b"" if abs_id is None else _element(
                abs_id, (int((now + _NTP_EPOCH) * (1 << 18)) & 0xFFFFFF).to_bytes(3, "big"))
            packets: list[bytes] = []
            for layer in self.layers:
                elements = abs_send_time
                if not layer.acked:
                    elements = (_element(mid_id, self._mid) if mid_id else b"") + _element(
                        rid_id, layer.rid.encode()) + elements
                packets += self._frame(layer, n, now, payload_type, elements)
            if direct is None:
                direct = aiortc_adapter.direct_rtp_sender(sender)
            for data in packets:
                if direct is not None:
                    try:
                        direct(data)
                        continue
                    except ConnectionError:
                        direct = None
                try:
                    await aiortc_adapter.send_rtp(sender, data)
                except ConnectionError:
                    return
            n += 1
            self.frames = n

    def _frame(self, layer: _Layer, n: int, now: float, payload_type: int, elements: bytes) -> list[bytes]:
        """The RTP packets of ``layer``'s next frame."""
        clip = layer.clip
        size = len(clip.frames)
        index = (n + layer.offset) % size
        if layer.keyframe_wanted:
            layer.keyframe_wanted = False
            if index not in clip.keyframes:
                following = next((k for k in clip.keyframes if k > index), clip.keyframes[0] + size)
                layer.offset += following - index
                layer.keyframes_forced += 1
                index = (n + layer.offset) % size
        frame = tag_vp8(clip.frames[index], now)
        keyframe = index in clip.keyframes
        tid, sync = (0, False) if keyframe else clip.temporal(index)
        if tid == 0:
            layer.tl0 = (layer.tl0 + 1) & 0xFF
        layer.picture_id = (layer.picture_id + 1) & 0x7FFF
        # What Chromium writes: X; I (15-bit picture id), L (TL0PICIDX), T (TID, Y); no K.
        tail = bytes([0xE0, 0x80 | (layer.picture_id >> 8), layer.picture_id & 0xFF, layer.tl0,
                      (tid << 6) | (0x20 if sync else 0)])
        timestamp = (layer.ts_base + (n * 90000) // VIDEO_FPS) & 0xFFFFFFFF
        chunks = [frame[i:i + MAX_PAYLOAD] for i in range(0, len(frame), MAX_PAYLOAD)]
        out = []
        for i, chunk in enumerate(chunks):
            descriptor = bytes([0x90 if i == 0 else 0x80]) + tail  # S on the first packet, partition 0
            out.append(rtp_packet(payload_type, i == len(chunks) - 1, layer.seq, timestamp, layer.ssrc, elements,
                                  descriptor + chunk))
            layer.seq = (layer.seq + 1) & 0xFFFF
            layer.packets += 1
            layer.bytes += len(chunk)
        return out

    # --- RTCP from the server ----------------------------------------------------------------------------------

    async def _on_rtcp(self, packet: AnyRtcpPacket) -> None:
        if isinstance(packet, RtcpRrPacket | RtcpSrPacket):
            for report in packet.reports:
                layer = self._by_ssrc.get(report.ssrc)
                if layer is not None:
                    layer.acked = True
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
            layer = self._by_ssrc.get(packet.media_ssrc)
            if layer is not None:
                layer.keyframe_wanted = True
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_FIR:
            for layer in self.layers:
                layer.keyframe_wanted = True

    def stats(self) -> dict[str, Any]:
        return {layer.rid: {"ssrc": layer.ssrc, "packets": layer.packets, "bytes": layer.bytes,
                            "keyframes_forced": layer.keyframes_forced} for layer in self.layers}
