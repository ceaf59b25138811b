"""
The media objects every ingest protocol produces, and the sink interface that receives them.

RTMP, SRT and URL pull all end here, so whatever consumes ingest (a room source, a recorder, a test) is written
once. Timestamps are integer milliseconds on the stream's own clock, shared by its audio and video: RTMP's
message timestamps as sent, MPEG-TS and pulled streams rebased so that the first packet is at 0.

Order of delivery on one stream: a config object (:class:`VideoConfig`, :class:`AudioConfig`) comes before the
first media unit of its kind and again whenever it changes; the first :class:`VideoAccessUnit` is a keyframe
(what comes before one is dropped: it could not be decoded); :class:`Metadata` may come at any time;
:meth:`MediaSink.ended` comes exactly once, last.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import IngestError


@dataclass(frozen=True, slots=True)
class VideoConfig:
    """
    H.264 decoder configuration: the parameter sets and what they say.

    :param sps: sequence parameter sets (NAL units without start code or length prefix).
    :param pps: picture parameter sets.
    :param profile_level_id: the 6-hex-digit string of an SDP ``profile-level-id`` (RFC 6184 §8.1), e.g. ``42e01f``.
    :param may_reorder: the SPS allows frames out of presentation order (B-frames); see :func:`.h264.parse_sps`.
    :param nal_length_size: bytes of the length prefix in AVCC data (from ``avcC``), 4 when the source is Annex B.
    """

    sps: tuple[bytes, ...]
    pps: tuple[bytes, ...]
    profile_level_id: str
    width: int
    height: int
    may_reorder: bool
    nal_length_size: int = 4


@dataclass(frozen=True, slots=True)
class AudioConfig:
    """
    AAC decoder configuration.

    :param asc: the AudioSpecificConfig (ISO/IEC 14496-3 §1.6.2.1), what an MP4 ``esds`` or FLV sequence header holds.
    :param object_type: audio object type (2 = AAC LC, 5 = SBR/HE-AAC, 29 = PS).
    """

    asc: bytes
    object_type: int
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True)
class VideoAccessUnit:
    """
    One coded H.264 picture.

    :param pts_ms: presentation time; ``pts_ms - dts_ms`` is the composition offset, non-zero only with B-frames.
    :param dts_ms: decoding time, non-decreasing along the stream.
    :param keyframe: the unit holds an IDR picture (decoding can start here given the current :class:`VideoConfig`).
    :param nalus: NAL units in decoding order, without start codes or length prefixes.
    """

    pts_ms: int
    dts_ms: int
    keyframe: bool
    nalus: list[bytes]

    @property
    def composition_offset_ms(self) -> int:
        return self.pts_ms - self.dts_ms


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One raw AAC frame (no ADTS header), 1024 samples for AAC LC."""

    pts_ms: int
    aac: bytes


@dataclass(frozen=True, slots=True)
class Metadata:
    """Stream metadata: RTMP ``@setDataFrame onMetaData`` or a container's tags (``width``, ``encoder``, ...)."""

    values: dict[str, Any] = field(default_factory=dict)


MediaItem = VideoConfig | AudioConfig | VideoAccessUnit | AudioFrame | Metadata


@dataclass(frozen=True, slots=True)
class EndReason:
    """
    Why a stream ended.

    :param code: ``"unpublished"`` (the publisher said goodbye), ``"disconnected"`` (the connection closed without
        goodbye), ``"stopped"`` (Chorus stopped it), or the ``code`` of ``error``.
    :param error: the typed error that ended it, if any.
    """

    code: str
    detail: str = ""
    error: IngestError | None = None

    @classmethod
    def from_error(cls, error: IngestError) -> EndReason:
        return cls(error.code, error.reason, error)


class MediaSink(Protocol):
    """
    Receives one stream's media, on the event loop. Both methods must return quickly (hand heavy work such as
    transcoding to :mod:`.transcode`); they are never called concurrently.
    """

    def media(self, item: MediaItem) -> None: ...

    def ended(self, reason: EndReason) -> None: ...


@dataclass(frozen=True, slots=True)
class PublishSession:
    """
    One accepted publisher, as handed to ``on_publish``.

    :param protocol: ``"rtmp"``, ``"srt"`` or ``"pull"``.
    :param app: RTMP application (``live`` in ``rtmp://host/live``); the SRT resource; the pulled URL.
    :param stream_name: RTMP stream name (the key), SRT key, or the pull source's name.
    :param remote: the peer's (host, port); ``("", 0)`` for a pulled source.
    :param grant: whatever the authorize callback returned for this key (e.g. the ingress record).
    """

    protocol: str
    app: str
    stream_name: str
    remote: tuple[str, int]
    grant: Any
    id: str = ""


OnPublish = Callable[[PublishSession], Awaitable[MediaSink]]
"""``on_publish(session) -> sink``: called on the event loop once a publisher's key is accepted; may raise an
:class:`.IngestError` to refuse it (RTMP answers ``NetStream.Publish.Rejected``, SRT closes)."""


@dataclass(frozen=True, slots=True)
class RefusedConnection:
    """A connection that ended before it had a sink (wrong key, garbage, limits), for metrics and the admin API.

    :param app: RTMP application if it got that far; empty for SRT.
    :param stream_name: the key presented, if any (RTMP stream name, SRT streamid resource).
    """

    remote: tuple[str, int]
    app: str
    stream_name: str
    error: IngestError
