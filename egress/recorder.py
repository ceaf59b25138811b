"""
Per-track recording without transcoding: encoded access units (from :mod:`~chorus.egress.depacketize`) muxed by
PyAV into WebM (VP8, Opus), fragmented MP4 (H.264, Opus) or Matroska (any of them).

Crash safety: MP4 is fragmented (``movflags=+frag_keyframe+empty_moov+default_base_moof``, ``frag_duration`` 1 s)
and Matroska/WebM starts a cluster at least every second (``cluster_time_limit``); ``flush_packets`` pushes every
packet to the operating system at once, so a SIGKILL of the server loses at most the last fragment or cluster
(≤ 1 s plus the frame being written). :meth:`TrackRecorder.close` finalizes (MP4 index, Matroska cues and
duration).

A/V sync: all tracks of a participant share one ``origin`` (Unix time of media time 0). Each track's first access
unit is placed on that timeline through the publisher's RTCP sender report (RFC 3550 §6.4.1: an NTP time and the
RTP timestamp of the same instant) when one is known, else through its arrival time; after that the RTP clock
alone advances it. Files store the origin as metadata ``chorus_origin`` and the wall time of their first sample as
``chorus_start`` (ISO 8601); WebM/Matroska timestamps also start at the track's offset from the origin, while
fragmented MP4 starts each file at 0, so players and tools align MP4 tracks by ``chorus_start``.
"""

from __future__ import annotations

import fractions
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import av

from chorus.egress.depacketize import AccessUnit
from chorus.egress.errors import EgressError
from chorus.egress.fmp4 import aac_audio_specific_config
from chorus.egress.h264 import NAL_PPS, NAL_SPS, join_annexb, nal_type, parse_sps, split_annexb
from chorus.sfu.logs import PeerLogger

_log = PeerLogger(logging.getLogger("chorus.egress.recorder"))

#: Formats by file suffix, and the codecs each may carry.
FORMATS: dict[str, tuple[str, frozenset[str]]] = {
    ".webm": ("webm", frozenset({"vp8", "opus"})),
    ".mp4": ("mp4", frozenset({"h264", "opus"})),
    ".mkv": ("matroska", frozenset({"vp8", "h264", "opus"})),
}
_NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)


def ntp_to_unix(ntp_timestamp: int) -> float:
    """A 64-bit NTP timestamp (RFC 3550 §4: seconds since 1900 in 32.32 fixed point) as Unix time."""
    return (ntp_timestamp >> 32) - _NTP_EPOCH_OFFSET + (ntp_timestamp & 0xFFFFFFFF) / (1 << 32)


def _finalize(container: Any, path: Path, log: PeerLogger, message: str, packets: int) -> None:
    """Close a recorder's container (index, cues, duration written), if it was ever opened.

    :raises EgressError: ``io_error``, the file could not be finalized.
    """
    if container is None:
        return
    try:
        container.close()
    except (OSError, av.error.FFmpegError) as exc:
        raise EgressError("io_error", f"cannot finalize {path}: {exc}") from exc
    log.info(message, packets=packets)


class SenderReportClock:
    """
    Maps a track's RTP timestamps to wall-clock time with its latest RTCP sender report (RFC 3550 §6.4.1).

    :meth:`update` takes the SR's NTP time (Unix seconds; see :func:`ntp_to_unix`) and RTP timestamp.
    """

    __slots__ = ("clock_rate", "ntp", "rtp")

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.ntp: float | None = None
        self.rtp = 0

    def update(self, ntp: float, rtp_timestamp: int) -> None:
        self.ntp, self.rtp = ntp, rtp_timestamp & 0xFFFFFFFF

    def wall_time(self, rtp_timestamp: int) -> float | None:
        """Unix time of ``rtp_timestamp`` (32-bit), or ``None`` before the first sender report."""
        if self.ntp is None:
            return None
        delta = (rtp_timestamp - self.rtp) & 0xFFFFFFFF
        if delta >= 1 << 31:
            delta -= 1 << 32
        return self.ntp + delta / self.clock_rate


def opus_head(channels: int = 2, pre_skip: int = 312, input_rate: int = 48000) -> bytes:
    """The Ogg/Matroska/MP4 Opus identification header (RFC 7845 §5.1), channel mapping family 0."""
    return (b"OpusHead" + bytes([1, channels]) + pre_skip.to_bytes(2, "little") + input_rate.to_bytes(4, "little")
            + b"\x00\x00\x00")


def _vp8_size(frame: bytes) -> tuple[int, int]:
    """Width and height of a VP8 key frame (RFC 6386 §9.1: 14-bit little-endian after the start code)."""
    return int.from_bytes(frame[6:8], "little") & 0x3FFF, int.from_bytes(frame[8:10], "little") & 0x3FFF


class TrackRecorder:
    """
    One track → one file, as encoded packets (no decoding, no encoding).

    Lifecycle: *waiting* (nothing written until the first key frame; the file is created then) → *recording* →
    *closed* (:meth:`close` finalized the file). A publisher who reconnects gets a new recorder (a new file) with
    the same ``origin``, so the pieces still line up.

    :param codec: ``"vp8"``, ``"h264"`` or ``"opus"``.
    :param origin: Unix time of media time 0, shared by the participant's tracks.
    :param clock: the track's sender-report mapping (updated by the caller as SRs arrive); arrival time is used
        while it has none.
    """

    def __init__(self, path: Path, codec: Literal["vp8", "h264", "opus"], *, origin: float,
                 clock: SenderReportClock | None = None, clock_rate: int | None = None, channels: int = 2,
                 fragment_seconds: float = 1.0, log: PeerLogger | None = None) -> None:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None or codec not in fmt[1]:
            raise EgressError("unsupported_codec", f"{codec} cannot be recorded into {path.suffix or 'that file'}")
        self.path = path
        self.codec = codec
        self.format = fmt[0]
        self.origin = origin
        self.clock_rate = clock_rate or (48000 if codec == "opus" else 90000)
        self.clock = clock or SenderReportClock(self.clock_rate)
        self.channels = channels
        self.fragment_seconds = fragment_seconds
        self.packets = 0
        self.closed = False
        self._log = (log or _log).bind(file=path.name, codec=codec)
        self._container: Any = None
        self._stream: Any = None
        self._offset = 0  # output pts of extended RTP pts 0
        self._last_pts: int | None = None
        self._parameter_sets: list[bytes] = []

    @property
    def started(self) -> bool:
        return self._container is not None

    def write(self, unit: AccessUnit) -> None:
        """
        Append one access unit (arrival time, when given, anchors the track if no sender report is known).

        :raises EgressError: ``invalid_state`` after :meth:`close`; ``io_error`` if the file cannot be written.
        """
        if self.closed:
            raise EgressError("invalid_state", "recorder closed")
        if self.codec == "h264":
            self._parameter_sets = [n for n in split_annexb(unit.data) if nal_type(n) in (NAL_SPS, NAL_PPS)] \
                or self._parameter_sets
        if self._container is None:
            if not unit.keyframe:
                return
            self._open(unit)
        pts = unit.pts + self._offset
        if self._last_pts is not None and pts <= self._last_pts:
            return  # not after the previous one: a muxer would refuse it
        packet = av.Packet(unit.data)
        packet.pts = packet.dts = pts
        packet.time_base = fractions.Fraction(1, self.clock_rate)
        packet.is_keyframe = unit.keyframe
        packet.stream = self._stream
        try:
            self._container.mux(packet)
        except (OSError, av.error.FFmpegError) as exc:
            raise EgressError("io_error", f"cannot write {self.path}: {exc}") from exc
        self._last_pts = pts
        self.packets += 1

    def _open(self, unit: AccessUnit) -> None:
        wall = self.clock.wall_time(unit.rtp_timestamp)
        source = "sender report"
        if wall is None:
            wall, source = (unit.arrival if unit.arrival is not None else time.time()), "arrival"
        start = max(0, round((wall - self.origin) * self.clock_rate))
        self._offset = start - unit.pts
        options = {"flush_packets": "1"}
        format_options: dict[str, str] = {}
        if self.format == "mp4":
            format_options = {"movflags": "+frag_keyframe+empty_moov+default_base_moof+use_metadata_tags",
                              "frag_duration": str(int(self.fragment_seconds * 1_000_000))}
        else:
            format_options = {"cluster_time_limit": str(int(self.fragment_seconds * 1000))}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(self.path), "w", format=self.format, options=format_options,
                                container_options=options)
        except (OSError, av.error.FFmpegError) as exc:
            raise EgressError("io_error", f"cannot create {self.path}: {exc}") from exc
        container.metadata["chorus_origin"] = datetime.fromtimestamp(self.origin, UTC).isoformat()
        # MP4 starts every track at 0 (no edit list in a fragmented file): the first sample's time says where.
        container.metadata["chorus_start"] = datetime.fromtimestamp(self.origin + start / self.clock_rate,
                                                                     UTC).isoformat()
        stream: Any
        if self.codec == "opus":
            stream = container.add_stream("libopus", rate=48000)
            stream.codec_context.layout = "stereo" if self.channels == 2 else "mono"
            stream.codec_context.extradata = opus_head(self.channels)
        elif self.codec == "vp8":
            stream = container.add_stream("libvpx")
            stream.codec_context.width, stream.codec_context.height = _vp8_size(unit.data)
        else:
            stream = container.add_stream("libx264")
            sps = next((n for n in self._parameter_sets if nal_type(n) == NAL_SPS), None)
            if sps is None:
                container.close()
                raise EgressError("bad_input", "an H.264 key frame without a sequence parameter set")
            info = parse_sps(sps)
            stream.codec_context.width, stream.codec_context.height = info.width, info.height
            stream.codec_context.extradata = join_annexb(self._parameter_sets)
        stream.time_base = fractions.Fraction(1, self.clock_rate)
        self._container, self._stream = container, stream
        self._log.info("recording started", anchor=source, offset_s=round(start / self.clock_rate, 3))

    def close(self) -> None:
        """Finalize the file (index, cues, duration). Idempotent; a recorder that never started writes nothing."""
        if not self.closed:
            self.closed = True
            _finalize(self._container, self.path, self._log, "recording finished", self.packets)


@dataclass(frozen=True, slots=True)
class RecordingInfo:
    """A recording file: ``duration`` in seconds (``None`` if unreadable), ``size`` in bytes."""

    name: str
    path: Path
    size: int
    duration: float | None
    modified: float


def probe_duration(path: Path) -> float | None:
    """
    Seconds from the first to the last packet end of ``path``: from the container when it says, else by reading
    packet timestamps (no decoding: a crashed, unfinalized recording has no duration in its header).
    """
    try:
        with av.open(str(path)) as container:
            first: float | None = None
            last = 0.0
            for packet in container.demux():
                if packet.pts is None or packet.time_base is None:
                    continue
                start = float(packet.pts * packet.time_base)
                end = start + float((packet.duration or 0) * packet.time_base)
                first = start if first is None else min(first, start)
                last = max(last, end)
            return None if first is None else last - first
    except (OSError, av.error.FFmpegError):
        return None


def list_recordings(folder: Path) -> list[RecordingInfo]:
    """Every recording (``.webm``, ``.mp4``, ``.mkv``) in ``folder``, oldest first, with duration and size."""
    if not folder.is_dir():
        raise EgressError("not_found", f"{folder} is not a folder")
    out = []
    for path in folder.iterdir():
        if path.is_file() and path.suffix.lower() in FORMATS:
            stat = path.stat()
            out.append(RecordingInfo(path.name, path, stat.st_size, probe_duration(path), stat.st_mtime))
    return sorted(out, key=lambda r: (r.modified, r.name))


class CompositeRecorder:
    """
    A room composite → one fragmented MP4 with H.264 video and AAC audio (the composite ladder's top rung and
    mix), muxed without further encoding. Crash-safe like :class:`TrackRecorder` (fragments of at most
    ``fragment_seconds``, every packet flushed).

    Lifecycle: *waiting* (for the first video key frame; audio before it is dropped) → *recording* → *closed*.
    ``pts`` of the inputs are on the egress timeline (90 kHz video, 48 kHz audio since ``origin``); the file starts
    at the first key frame (``chorus_start``).
    """

    def __init__(self, path: Path, *, origin: float, fragment_seconds: float = 1.0,
                 log: PeerLogger | None = None) -> None:
        if path.suffix.lower() != ".mp4":
            raise EgressError("unsupported_codec", "a composite is recorded into MP4")
        self.path = path
        self.origin = origin
        self.fragment_seconds = fragment_seconds
        self.packets = 0
        self.closed = False
        self._log = (log or _log).bind(file=path.name, codec="h264+aac")
        self._container: Any = None
        self._video: Any = None
        self._audio: Any = None
        self._start = 0  # 90 kHz pts of the first key frame
        self._last: dict[str, int] = {}

    @property
    def started(self) -> bool:
        return self._container is not None

    def write_video(self, data: bytes, pts: int, keyframe: bool) -> None:
        """One H.264 Annex B access unit. :raises EgressError: ``io_error``, ``invalid_state`` after close."""
        if self.closed:
            raise EgressError("invalid_state", "recorder closed")
        if self._container is None:
            if not keyframe:
                return
            self._open(data, pts)
        self._mux(self._video, "video", data, pts - self._start, 90000, keyframe)

    def write_audio(self, data: bytes, pts: int) -> None:
        """One raw AAC-LC frame (48 kHz stereo)."""
        if self.closed:
            raise EgressError("invalid_state", "recorder closed")
        if self._container is None:
            return
        start = self._start * 48000 // 90000
        if pts >= start:
            self._mux(self._audio, "audio", data, pts - start, 48000, True)

    def _open(self, data: bytes, pts: int) -> None:
        sets = [n for n in split_annexb(data) if nal_type(n) in (NAL_SPS, NAL_PPS)]
        sps = next((n for n in sets if nal_type(n) == NAL_SPS), None)
        if sps is None:
            raise EgressError("bad_input", "an H.264 key frame without a sequence parameter set")
        info = parse_sps(sps)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(self.path), "w", format="mp4", container_options={"flush_packets": "1"},
                                options={"movflags": "+frag_keyframe+empty_moov+default_base_moof+use_metadata_tags",
                                         "frag_duration": str(int(self.fragment_seconds * 1_000_000))})
        except (OSError, av.error.FFmpegError) as exc:
            raise EgressError("io_error", f"cannot create {self.path}: {exc}") from exc
        self._start = pts
        container.metadata["chorus_origin"] = datetime.fromtimestamp(self.origin, UTC).isoformat()
        container.metadata["chorus_start"] = datetime.fromtimestamp(self.origin + pts / 90000, UTC).isoformat()
        video = container.add_stream("libx264")
        video.codec_context.width, video.codec_context.height = info.width, info.height
        video.codec_context.extradata = join_annexb(sets)
        video.time_base = fractions.Fraction(1, 90000)
        audio = container.add_stream("aac", rate=48000)
        audio.codec_context.layout = "stereo"
        audio.codec_context.extradata = aac_audio_specific_config(48000, 2)
        audio.time_base = fractions.Fraction(1, 48000)
        self._container, self._video, self._audio = container, video, audio
        self._log.info("composite recording started", width=info.width, height=info.height)

    def _mux(self, stream: Any, kind: str, data: bytes, pts: int, rate: int, keyframe: bool) -> None:
        if pts <= self._last.get(kind, -1):
            return
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.time_base = fractions.Fraction(1, rate)
        packet.is_keyframe = keyframe
        packet.stream = stream
        try:
            self._container.mux(packet)
        except (OSError, av.error.FFmpegError) as exc:
            raise EgressError("io_error", f"cannot write {self.path}: {exc}") from exc
        self._last[kind] = pts
        self.packets += 1

    def close(self) -> None:
        """Finalize the file. Idempotent."""
        if not self.closed:
            self.closed = True
            _finalize(self._container, self.path, self._log, "composite recording finished", self.packets)
