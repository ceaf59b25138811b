"""
RTP helpers for forwarding: which codecs Chorus forwards and where a decodable picture starts.

Everything here works on RTP payload bytes; nothing decodes media.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping

from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from aiortc.rtp import RtpPacket
from aiortc.sdp import H264Profile, parse_h264_profile_level_id

#: Codecs forwarded without transcoding, by lower-case MIME type.
FORWARDABLE = frozenset({"audio/opus", "video/vp8", "video/h264"})


def is_forwardable(codec: RTCRtpCodecParameters) -> bool:
    return codec.mimeType.lower() in FORWARDABLE


def h264_profile(codec: RTCRtpCodecParameters | RTCRtpCodecCapability) -> H264Profile | None:
    """
    The H.264 profile of a codec's ``profile-level-id`` as libwebrtc (and aiortc) classify it (RFC 6184 §8.1; the
    constraint flags matter: ``42e01f`` is constrained baseline, ``42001f`` baseline), or ``None`` for a profile
    WebRTC does not know (High 10, 4:2:2, ...). A missing parameter means constrained baseline, as in libwebrtc.
    """
    try:
        return parse_h264_profile_level_id(str(codec.parameters.get("profile-level-id", "42e01f")))[0]
    except ValueError:
        return None


def same_codec(capability: RTCRtpCodecCapability, codec: RTCRtpCodecParameters) -> bool:
    """
    Whether ``capability`` (something we can offer) is the very format ``codec`` (what a source sends): same MIME
    type and clock rate, and for H.264 the same packetization mode and profile (the level may differ: the
    subscribe SDP is then given the source's own ``profile-level-id``, see :func:`advertise_h264_levels`).
    """
    if capability.mimeType.lower() != codec.mimeType.lower() or capability.clockRate != codec.clockRate:
        return False
    if codec.mimeType.lower() == "video/h264":
        if str(capability.parameters.get("packetization-mode", "0")) != str(
                codec.parameters.get("packetization-mode", "0")):
            return False
        profile = h264_profile(codec)
        return profile is not None and h264_profile(capability) == profile
    return True


_MID_LINE = re.compile(r"^a=mid:(\S+)\s*$", re.M)
_PROFILE_LEVEL_ID = re.compile(r"(a=fmtp:\d+ [^\r\n]*profile-level-id=)([0-9a-fA-F]{6})")


def advertise_h264_levels(sdp: str, codecs: Mapping[str | None, RTCRtpCodecParameters]) -> str:
    """
    ``sdp`` with the H.264 ``profile-level-id`` of each m-section named in ``codecs`` (mid → the codec of the
    source it carries) replaced by that source's own.

    aiortc matches H.264 codecs by profile only and keeps one capability per profile (see
    :func:`.aiortc_adapter.offerable_codec`), so the SDP it writes names that capability's level; the subscriber
    is told the level the source really sends (RFC 6184 §8.2.2: for a send-only stream the level is the one of
    the stream). Only the SDP text changes: aiortc's own negotiation state is unaffected.
    """
    profile_level_ids = {
        mid: str(codec.parameters["profile-level-id"]).lower() for mid, codec in codecs.items()
        if mid is not None and codec.mimeType.lower() == "video/h264" and "profile-level-id" in codec.parameters
    }
    if not profile_level_ids:
        return sdp
    sections = re.split(r"(?=^m=)", sdp, flags=re.M)
    for i, section in enumerate(sections):
        match = _MID_LINE.search(section)
        if match is not None and (plid := profile_level_ids.get(match.group(1))) is not None:
            sections[i] = _PROFILE_LEVEL_ID.sub(lambda m, plid=plid: m.group(1) + plid, section)
    return "".join(sections)


def vp8_is_keyframe_start(payload: bytes) -> bool:
    """
    True if this VP8 RTP payload (RFC 7741) starts a key frame: S=1, PID=0 and the VP8 header's P bit 0.
    """
    n = len(payload)
    if n < 2:
        return False
    b0 = payload[0]
    if not b0 & 0x10 or b0 & 0x07:  # S bit, partition index
        return False
    i = 1
    if b0 & 0x80:  # X: extension byte follows
        x = payload[1]
        i = 2
        if x & 0x80:  # I: picture id, 7 or 15 bits
            if i >= n:
                return False
            i += 2 if payload[i] & 0x80 else 1
        if x & 0x40:  # L: TL0PICIDX
            i += 1
        if x & 0x30:  # T or K: TID/KEYIDX byte
            i += 1
    if i >= n:
        return False
    return not payload[i] & 0x01  # P bit: 0 means key frame


_H264_IDR = 5
_H264_SPS = 7
_H264_STAP_A = 24
_H264_FU_A = 28


def h264_is_keyframe_start(payload: bytes) -> bool:
    """
    True if this H.264 RTP payload (RFC 6184) starts a decodable picture: an SPS or IDR NAL unit, alone,
    inside a STAP-A, or as the first fragment of an FU-A.
    """
    if not payload:
        return False
    nal_type = payload[0] & 0x1F
    if nal_type in (_H264_IDR, _H264_SPS):
        return True
    if nal_type == _H264_STAP_A:
        i = 1
        while i + 2 < len(payload):
            size = (payload[i] << 8) | payload[i + 1]
            if payload[i + 2] & 0x1F in (_H264_IDR, _H264_SPS):
                return True
            i += 2 + size
        return False
    if nal_type == _H264_FU_A and len(payload) > 1:
        fu_header = payload[1]
        return bool(fu_header & 0x80) and (fu_header & 0x1F) in (_H264_IDR, _H264_SPS)
    return False


def keyframe_detector(mime_type: str) -> Callable[[bytes], bool] | None:
    """The keyframe-start test for a video MIME type, or ``None`` when every packet is decodable (audio)."""
    return {"video/vp8": vp8_is_keyframe_start, "video/h264": h264_is_keyframe_start}.get(mime_type.lower())


_RTP_HEADER = struct.Struct("!BBHII")
_EXT_HEADER = struct.Struct("!HH")


class RtpWriter:
    """
    Serializes forwarded packets for one subscriber, byte for byte as aiortc's ``RtpPacket.serialize``
    would with that subscriber's header-extension IDs, but without building a packet object and an
    extension list per send. The MID element never changes and is built once.

    With ``transport_cc_id`` each packet also carries a transport-wide sequence number (draft-holmer-rmcat-
    transport-wide-cc-extensions-01 §2), given per write; :attr:`transport_cc_at` is where its two bytes are in
    the last packet written, so a retransmission can be renumbered in place.

    :param mid_id, abs_send_time_id, audio_level_id, transport_cc_id: negotiated one-byte extension IDs, 0/None
        if absent.
    """

    __slots__ = ("payload_type", "ssrc", "_mid_element", "_abs_prefix", "_audio_id", "_twcc_prefix",
                 "transport_cc_at")

    def __init__(self, payload_type: int, ssrc: int, *, mid: str | None, mid_id: int | None,
                 abs_send_time_id: int | None, audio_level_id: int | None,
                 transport_cc_id: int | None = None) -> None:
        self.payload_type = payload_type
        self.ssrc = ssrc
        encoded = (mid or "").encode()
        self._mid_element = (bytes([(mid_id << 4) | (len(encoded) - 1)]) + encoded
                             if mid_id and 0 < len(encoded) <= 16 else b"")
        self._abs_prefix = bytes([(abs_send_time_id << 4) | 2]) if abs_send_time_id else b""
        self._audio_id = audio_level_id or 0
        self._twcc_prefix = bytes([(transport_cc_id << 4) | 1]) if transport_cc_id else b""
        #: Offset of the transport-wide sequence number in the last packet written (-1: none).
        self.transport_cc_at = -1

    @property
    def transport_cc(self) -> bool:
        return bool(self._twcc_prefix)

    def write(self, packet: RtpPacket, seq: int, timestamp: int, abs_send_time: bytes | None,
              payload: bytes | None = None, transport_seq: int | None = None) -> bytes:
        """``packet`` with this subscriber's payload type, SSRC and extensions, and the given sequence number
        and timestamp; ``abs_send_time`` is the 3-byte extension value (shared by all subscribers); ``payload``
        replaces the packet's (e.g. a rewritten VP8 descriptor); ``transport_seq`` is written when the
        subscriber negotiated transport-cc."""
        extensions = self._mid_element
        if abs_send_time is not None and self._abs_prefix:
            extensions += self._abs_prefix + abs_send_time
        level = packet.extensions.audio_level
        if level is not None and self._audio_id:
            extensions += bytes([self._audio_id << 4, (0x80 if level[0] else 0) | (level[1] & 0x7F)])
        twcc_at = -1
        if transport_seq is not None and self._twcc_prefix:
            twcc_at = 12 + 4 + len(extensions) + 1
            extensions += self._twcc_prefix + (transport_seq & 0xFFFF).to_bytes(2, "big")
        self.transport_cc_at = twcc_at
        first = 0x80
        if extensions:
            first |= 0x10
            extensions += b"\x00" * (-len(extensions) % 4)
            extensions = _EXT_HEADER.pack(0xBEDE, len(extensions) // 4) + extensions
        padding = packet.padding_size
        if padding:
            first |= 0x20
        data = _RTP_HEADER.pack(first, (packet.marker << 7) | self.payload_type, seq, timestamp, self.ssrc)
        data += extensions + (packet.payload if payload is None else payload)
        if padding:
            data += bytes(padding - 1) + bytes([padding])
        return data

    def padding(self, seq: int, timestamp: int, abs_send_time: bytes | None, size: int,
                transport_seq: int | None = None) -> bytes:
        """A padding-only packet (RFC 3550 §5.1: P bit, no payload, ``size`` bytes of padding, 1..255) — what
        bandwidth probes are made of."""
        extensions = self._mid_element
        if abs_send_time is not None and self._abs_prefix:
            extensions += self._abs_prefix + abs_send_time
        if transport_seq is not None and self._twcc_prefix:
            extensions += self._twcc_prefix + (transport_seq & 0xFFFF).to_bytes(2, "big")
        first = 0xA0  # version 2, P
        if extensions:
            first |= 0x10
            extensions += b"\x00" * (-len(extensions) % 4)
            extensions = _EXT_HEADER.pack(0xBEDE, len(extensions) // 4) + extensions
        size = max(1, min(size, 255))
        return (_RTP_HEADER.pack(first, self.payload_type, seq, timestamp, self.ssrc) + extensions
                + bytes(size - 1) + bytes([size]))
