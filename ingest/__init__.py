"""
Chorus ingest: the protocol level of bringing encoders and cameras into rooms.

RTMP (:mod:`.rtmp`) and SRT (:mod:`.srt`) listeners and a URL puller (:mod:`.pull`) turn what arrives into the
same media objects (:mod:`.media`), handed to a :class:`~.media.MediaSink` that ``on_publish`` supplies;
:mod:`.keys` checks stream keys from any thread; :mod:`.h264` packetizes H.264 for RTP (RFC 6184) and tells
when a stream needs re-encoding; :mod:`.transcode` makes Opus from AAC and browser-safe H.264, off the event
loop. This package never imports ``signaling``; from ``sfu`` it uses only logging and task ownership.
"""

from .errors import (
    ForbiddenPathError,
    IngestError,
    IngestTimeoutError,
    LimitError,
    ProtocolError,
    SourceError,
    TranscodeError,
    UnauthorizedError,
    UnsupportedMediaError,
)
from .keys import StreamKeys
from .media import (
    AudioConfig,
    AudioFrame,
    EndReason,
    MediaItem,
    MediaSink,
    Metadata,
    OnPublish,
    PublishSession,
    RefusedConnection,
    VideoAccessUnit,
    VideoConfig,
)
from .pull import PullSettings, PullSource
from .rtmp import RtmpLimits, RtmpServer
from .srt import SrtLimits, SrtServer
from .transcode import AacToOpus, H264Reencoder, OpusPacket, ReencodeSettings

__all__ = [
    "AacToOpus",
    "AudioConfig",
    "AudioFrame",
    "EndReason",
    "ForbiddenPathError",
    "H264Reencoder",
    "IngestError",
    "IngestTimeoutError",
    "LimitError",
    "MediaItem",
    "MediaSink",
    "Metadata",
    "OnPublish",
    "OpusPacket",
    "ProtocolError",
    "PublishSession",
    "PullSettings",
    "PullSource",
    "RefusedConnection",
    "ReencodeSettings",
    "RtmpLimits",
    "RtmpServer",
    "SourceError",
    "SrtLimits",
    "SrtServer",
    "StreamKeys",
    "TranscodeError",
    "UnauthorizedError",
    "UnsupportedMediaError",
    "VideoAccessUnit",
    "VideoConfig",
]
