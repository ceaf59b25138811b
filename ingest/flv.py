"""
FLV tag bodies as RTMP audio/video messages carry them ("Adobe Flash Video File Format Specification v10.1",
Annex E.4.2 audio and E.4.3 video; "Enhanced RTMP" v2 for the extended video header), turned into
:mod:`.media` objects.

A :class:`FlvDepacketizer` is fed one message body at a time; it keeps the current ``avcC`` to split NAL
units and returns what each message holds.
"""

from __future__ import annotations

from .aac import parse_asc
from .errors import ProtocolError, UnsupportedMediaError
from .h264 import parse_avcc, split_avcc, video_config
from .media import AudioConfig, AudioFrame, MediaItem, VideoAccessUnit, VideoConfig

# E.4.3.1 VIDEODATA
FRAME_KEY, FRAME_INTER, FRAME_DISPOSABLE, FRAME_GENERATED_KEY, FRAME_COMMAND = 1, 2, 3, 4, 5
CODEC_AVC = 7
AVC_SEQUENCE_HEADER, AVC_NALU, AVC_END_OF_SEQUENCE = 0, 1, 2
# Enhanced RTMP: IsExHeader bit, PacketType values, FourCC
_EX_HEADER = 0x80
EX_SEQUENCE_START, EX_CODED_FRAMES, EX_SEQUENCE_END, EX_CODED_FRAMES_X, EX_METADATA = 0, 1, 2, 3, 4
# E.4.2.1 AUDIODATA
SOUND_AAC = 10
SOUND_EX_HEADER = 9
AAC_SEQUENCE_HEADER, AAC_RAW = 0, 1


def _si24(data: bytes) -> int:
    value = int.from_bytes(data, "big")
    return value - (1 << 24) if value & 0x800000 else value


class FlvDepacketizer:
    """
    Turns the bodies of RTMP audio (type 8) and video (type 9) messages into media objects.

    :raises UnsupportedMediaError: (from the methods) a codec other than H.264 or AAC.
    :raises ProtocolError: (from the methods) a malformed body, or media before its sequence header.
    """

    def __init__(self) -> None:
        self.video_config: VideoConfig | None = None
        self.audio_config: AudioConfig | None = None
        self._started = False

    def video(self, timestamp_ms: int, body: bytes) -> list[MediaItem]:
        """The media objects of one video message (E.4.3.1; Enhanced RTMP ``avc1`` too)."""
        if not body:
            return []
        frame_type = (body[0] >> 4) & 0x07
        if body[0] & _EX_HEADER:
            packet_type = body[0] & 0x0F
            if len(body) < 5:
                raise ProtocolError("enhanced video header is truncated")
            fourcc = body[1:5]
            if fourcc != b"avc1":
                raise UnsupportedMediaError(f"video codec {fourcc!r} is not supported (H.264 only)")
            if packet_type == EX_SEQUENCE_START:
                return self._sequence_header(body[5:])
            if packet_type == EX_CODED_FRAMES:
                if len(body) < 8:
                    raise ProtocolError("enhanced video frame is truncated")
                return self._frames(timestamp_ms, _si24(body[5:8]), frame_type, body[8:])
            if packet_type == EX_CODED_FRAMES_X:
                return self._frames(timestamp_ms, 0, frame_type, body[5:])
            return []  # sequence end, metadata, multitrack: nothing to forward
        codec = body[0] & 0x0F
        if frame_type == FRAME_COMMAND:
            return []  # video info/command frame: no picture
        if codec != CODEC_AVC:
            raise UnsupportedMediaError(f"FLV video codec id {codec} is not supported (H.264 only)")
        if len(body) < 5:
            raise ProtocolError("AVC video tag is truncated")
        packet_type = body[1]
        if packet_type == AVC_SEQUENCE_HEADER:
            return self._sequence_header(body[5:])
        if packet_type == AVC_NALU:
            return self._frames(timestamp_ms, _si24(body[2:5]), frame_type, body[5:])
        return []  # end of sequence

    def _sequence_header(self, record: bytes) -> list[MediaItem]:
        parsed = parse_avcc(record)
        config = video_config(parsed.sps, parsed.pps, parsed.nal_length_size)
        if config == self.video_config:
            return []
        self.video_config = config
        return [config]

    def _frames(self, timestamp_ms: int, composition_ms: int, frame_type: int, data: bytes) -> list[MediaItem]:
        if self.video_config is None:
            raise ProtocolError("H.264 frames before the AVC sequence header")
        nalus = split_avcc(data, self.video_config.nal_length_size)
        if not nalus:
            return []
        keyframe = frame_type in (FRAME_KEY, FRAME_GENERATED_KEY) or any(n[0] & 0x1F == 5 for n in nalus)
        if not keyframe and not self._started:
            return []  # nothing is decodable before the first keyframe
        self._started = True
        return [VideoAccessUnit(timestamp_ms + composition_ms, timestamp_ms, keyframe, nalus)]

    def audio(self, timestamp_ms: int, body: bytes) -> list[MediaItem]:
        """The media objects of one audio message (E.4.2.1)."""
        if not body:
            return []
        sound_format = body[0] >> 4
        if sound_format != SOUND_AAC:
            raise UnsupportedMediaError(f"FLV sound format {sound_format} is not supported (AAC only)")
        if len(body) < 2:
            raise ProtocolError("AAC audio tag is truncated")
        if body[1] == AAC_SEQUENCE_HEADER:
            config = parse_asc(body[2:])
            if config == self.audio_config:
                return []
            self.audio_config = config
            return [config]
        if self.audio_config is None:
            raise ProtocolError("AAC frames before the AAC sequence header")
        return [AudioFrame(timestamp_ms, body[2:])] if len(body) > 2 else []
