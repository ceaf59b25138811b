"""
PyAV packets of H.264 and AAC streams → :mod:`.media` objects, whatever the container framed them as.

MPEG-TS (SRT, HLS) and RTSP give H.264 as Annex B with in-band parameter sets and AAC as ADTS frames (or LATM,
refused); FLV and MP4 (RTMP pull, files) give ``avcC`` + length-prefixed NAL units and an AudioSpecificConfig.
:class:`PacketNormalizer` accepts both and emits config objects whenever the parameters change, so a consumer
sees exactly what the RTMP server produces. :func:`run_demux` drives a container in the calling (worker) thread.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import av.container

from .aac import is_adts, parse_asc, split_adts
from .errors import ProtocolError, UnsupportedMediaError
from .h264 import NAL_IDR, NAL_PPS, NAL_SPS, nal_type, parse_avcc, split_annexb, split_avcc, video_config
from .media import AudioConfig, AudioFrame, MediaItem, Metadata, VideoAccessUnit, VideoConfig


class PacketNormalizer:
    """
    Converts packets of one container's chosen video and audio stream. Timestamps become milliseconds rebased so
    that the first packet seen (of either stream) is at 0; packets without a timestamp are dropped.

    :raises UnsupportedMediaError: (constructor) the streams are not H.264 / AAC.
    """

    def __init__(self, video: av.video.stream.VideoStream | None, audio: av.audio.stream.AudioStream | None) -> None:
        if video is None and audio is None:
            raise UnsupportedMediaError("the source has neither video nor audio")
        if video is not None and video.codec_context.name != "h264":
            raise UnsupportedMediaError(f"video codec {video.codec_context.name} is not supported (H.264 only)")
        if audio is not None and audio.codec_context.name != "aac":
            raise UnsupportedMediaError(f"audio codec {audio.codec_context.name} is not supported (AAC only)")
        self.video = video
        self.audio = audio
        self.video_config: VideoConfig | None = None
        self.audio_config: AudioConfig | None = None
        self._origin: int | None = None
        self._length_size = 0  # 0: Annex B
        self._sps: list[bytes] = []
        self._pps: list[bytes] = []
        self._pending: list[MediaItem] = []
        self._started = False
        if video is not None:
            extradata = bytes(video.codec_context.extradata or b"")
            if extradata[:1] == b"\x01":
                record = parse_avcc(extradata)
                self._length_size = record.nal_length_size
                self._config_from(list(record.sps), list(record.pps))
            elif extradata:
                nalus = split_annexb(extradata)
                self._config_from([n for n in nalus if nal_type(n) == NAL_SPS],
                                  [n for n in nalus if nal_type(n) == NAL_PPS])
        if audio is not None:
            extradata = bytes(audio.codec_context.extradata or b"")
            if extradata:
                self._audio_config(parse_asc(extradata))

    def _config_from(self, sps: list[bytes], pps: list[bytes]) -> None:
        if sps:
            self._sps = sps
        if pps:
            self._pps = pps
        if self._sps and self._pps:
            config = video_config(self._sps, self._pps, self._length_size or 4)
            if config != self.video_config:
                self.video_config = config
                self._pending.append(config)

    def _audio_config(self, config: AudioConfig) -> None:
        if config != self.audio_config:
            self.audio_config = config
            self._pending.append(config)

    def _ms(self, value: int | None, time_base: Fraction | None) -> int | None:
        if value is None or time_base is None:
            return None
        return round(value * time_base * 1000)

    def packet(self, packet: av.Packet[Any]) -> list[MediaItem]:
        """The media objects of one demuxed packet (configs first when they changed)."""
        data = bytes(packet)
        if not data:
            return []
        dts = self._ms(packet.dts if packet.dts is not None else packet.pts, packet.time_base)
        pts = self._ms(packet.pts if packet.pts is not None else packet.dts, packet.time_base)
        if dts is None or pts is None:
            return []
        if self._origin is None:
            self._origin = dts
        dts -= self._origin
        pts -= self._origin
        out: list[MediaItem] = []
        if self.video is not None and packet.stream.index == self.video.index:
            out = self._video(pts, dts, data)
        elif self.audio is not None and packet.stream.index == self.audio.index:
            out = self._audio(pts, data)
        if self._pending:
            out = [*self._pending, *out]
            self._pending = []
        return out

    def _video(self, pts: int, dts: int, data: bytes) -> list[MediaItem]:
        nalus = split_avcc(data, self._length_size) if self._length_size else split_annexb(data)
        sps = [n for n in nalus if nal_type(n) == NAL_SPS]
        pps = [n for n in nalus if nal_type(n) == NAL_PPS]
        if sps or pps:
            self._config_from(sps, pps)
        if self.video_config is None or not nalus:
            return []  # nothing decodable before the first parameter sets
        keyframe = any(nal_type(n) == NAL_IDR for n in nalus)
        if not keyframe and not self._started:
            return []  # joined mid-stream (a camera): nothing is decodable before the first IDR
        self._started = True
        return [VideoAccessUnit(pts, dts, keyframe, nalus)]

    def _audio(self, pts: int, data: bytes) -> list[MediaItem]:
        if is_adts(data):
            out: list[MediaItem] = []
            for i, (config, frame) in enumerate(split_adts(data)):
                self._audio_config(config)
                # several ADTS frames in one PES: 1024 samples apart
                out.append(AudioFrame(pts + round(i * 1024_000 / config.sample_rate), frame))
            return out
        if self.audio_config is None:
            raise ProtocolError("AAC frames without ADTS headers or an AudioSpecificConfig (LATM is not supported)")
        return [AudioFrame(pts, data)]


def run_demux(container: av.container.InputContainer, deliver: Callable[[MediaItem], None],
              should_stop: Callable[[], bool]) -> None:
    """
    Demux ``container`` until it ends or ``should_stop()``: the first H.264 and the first AAC stream are
    delivered (container metadata first), other streams are ignored. Runs in the calling thread.

    :raises UnsupportedMediaError: no H.264/AAC stream.
    :raises ProtocolError: malformed H.264/AAC framing.
    :raises av.FFmpegError: from PyAV, on read errors (the caller maps them).
    """
    video = next((s for s in container.streams.video if s.codec_context.name == "h264"), None)
    audio = next((s for s in container.streams.audio if s.codec_context.name == "aac"), None)
    if video is None and audio is None:
        names = [s.codec_context.name for s in container.streams if s.type in ("video", "audio")]
        raise UnsupportedMediaError(f"no H.264 or AAC stream (found {names or 'none'})")
    normalizer = PacketNormalizer(video, audio)
    metadata: dict[str, Any] = dict(container.metadata)
    if video is not None:
        metadata.update(width=video.codec_context.width, height=video.codec_context.height)
    deliver(Metadata(metadata))
    streams = [s for s in (video, audio) if s is not None]
    for packet in container.demux(streams):
        if should_stop():
            return
        for item in normalizer.packet(packet):
            deliver(item)
