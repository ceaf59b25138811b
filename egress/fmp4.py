"""
A minimal CMAF fragmented-MP4 writer: init segments, and media fragments cut into LL-HLS parts and segments.

Boxes follow ISO/IEC 14496-12 (ISO BMFF, section numbers below are its 2022 edition); sample entries follow
ISO/IEC 14496-15 (``avc1``/``avcC``), ISO/IEC 14496-14 and 14496-1 (``mp4a``/``esds``) and "Encapsulation of Opus
in ISO Base Media File Format" (``Opus``/``dOps``). The layout is CMAF's (ISO/IEC 23000-19): **one track per
file**, one ``moof``+``mdat`` per chunk, ``tfdt`` in every fragment, ``default-base-is-moof``. Each CMAF chunk is
an LL-HLS part; a segment is the concatenation of its parts, the first preceded by ``styp``. HLS (an audio
rendition group beside the video variants) and DASH (one AdaptationSet per kind) both describe the same files.

Nothing here touches a file: every function returns bytes.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Literal

from chorus.egress.errors import EgressError
from chorus.egress.h264 import avc_decoder_configuration, parse_sps
from chorus.sfu.logs import PeerLogger

_log = PeerLogger(logging.getLogger("chorus.egress.fmp4"))

_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)  # §8.2.2.3: unity
_LANGUAGE_UND = ((ord("u") - 0x60) << 10) | ((ord("n") - 0x60) << 5) | (ord("d") - 0x60)

#: Sample flags (§8.8.3.1): ``sample_depends_on`` 2 (sync) / 1 plus ``sample_is_non_sync_sample``.
SYNC_SAMPLE_FLAGS = 0x02000000
NON_SYNC_SAMPLE_FLAGS = 0x01010000


def box(kind: bytes, *payload: bytes) -> bytes:
    """An ISO BMFF box (§4.2): 32-bit size, four-character type, payload."""
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A FullBox (§4.2): a box whose payload starts with an 8-bit version and 24-bit flags."""
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


# -- sample entries


def _descriptor(tag: int, body: bytes) -> bytes:
    """An MPEG-4 descriptor (ISO/IEC 14496-1 §7.2.2.1): tag, size in 7-bit groups, body."""
    size = len(body)
    length = bytes([size & 0x7F])
    size >>= 7
    while size:
        length = bytes([0x80 | (size & 0x7F)]) + length
        size >>= 7
    return bytes([tag]) + length + body


_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def aac_audio_specific_config(sample_rate: int, channels: int) -> bytes:
    """AAC-LC ``AudioSpecificConfig`` (ISO/IEC 14496-3 §1.6.2.1): object type 2, rate index, channels."""
    if sample_rate not in _AAC_RATES or not 1 <= channels <= 7:
        raise EgressError("bad_input", f"no AAC config for {sample_rate} Hz, {channels} channels")
    value = (2 << 11) | (_AAC_RATES.index(sample_rate) << 7) | (channels << 3)
    return value.to_bytes(2, "big")


def _visual_entry(kind: bytes, width: int, height: int, *children: bytes) -> bytes:
    """VisualSampleEntry (§12.1.3.2)."""
    return box(kind, bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", width, height),
               struct.pack(">II", 0x00480000, 0x00480000), bytes(4), struct.pack(">H", 1), bytes(32),
               struct.pack(">Hh", 0x0018, -1), *children)


def _audio_entry(kind: bytes, channels: int, sample_rate: int, *children: bytes) -> bytes:
    """AudioSampleEntry (§12.2.3.2), version 0: 16-bit samples, rate as 16.16 (rates above 65535 Hz unsupported)."""
    return box(kind, bytes(6), struct.pack(">H", 1), bytes(8), struct.pack(">HH", channels, 16), bytes(4),
               struct.pack(">I", (sample_rate & 0xFFFF) << 16), *children)


@dataclass(frozen=True, slots=True)
class Track:
    """
    One CMAF track: what the init segment says about it and what manifests need.

    Build with :meth:`h264`, :meth:`aac` or :meth:`opus`.

    :param codec: the RFC 6381 codec string (``avc1.42e01f``, ``mp4a.40.2``, ``opus``).
    """

    track_id: int
    kind: Literal["video", "audio"]
    timescale: int
    sample_entry: bytes
    codec: str
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0

    @classmethod
    def h264(cls, sps: bytes, pps: bytes, *, track_id: int = 1, timescale: int = 90000) -> Track:
        """An H.264 video track from its parameter sets (NAL units without start codes)."""
        info = parse_sps(sps)
        entry = _visual_entry(b"avc1", info.width, info.height, box(b"avcC", avc_decoder_configuration(sps, pps)))
        return cls(track_id, "video", timescale, entry, info.codec_string, info.width, info.height)

    @classmethod
    def aac(cls, sample_rate: int, channels: int, *, config: bytes | None = None, track_id: int = 1,
            bitrate: int = 128_000) -> Track:
        """An AAC-LC audio track; ``config`` is the encoder's AudioSpecificConfig (built when omitted)."""
        asc = config or aac_audio_specific_config(sample_rate, channels)
        decoder_config = _descriptor(0x04, bytes([0x40, (0x05 << 2) | 1]) + (6144).to_bytes(3, "big")
                                     + struct.pack(">II", bitrate, bitrate) + _descriptor(0x05, asc))
        es = _descriptor(0x03, struct.pack(">HB", 0, 0) + decoder_config + _descriptor(0x06, b"\x02"))
        entry = _audio_entry(b"mp4a", channels, sample_rate, full_box(b"esds", 0, 0, es))
        return cls(track_id, "audio", sample_rate, entry, "mp4a.40.2", sample_rate=sample_rate, channels=channels)

    @classmethod
    def opus(cls, channels: int = 2, *, pre_skip: int = 312, input_sample_rate: int = 48000,
             track_id: int = 1) -> Track:
        """An Opus audio track (timescale 48 kHz; ``dOps`` with channel mapping family 0, so 1 or 2 channels)."""
        if channels not in (1, 2):
            raise EgressError("bad_input", "Opus mapping family 0 carries one or two channels")
        dops = box(b"dOps", struct.pack(">BBHIhB", 0, channels, pre_skip, input_sample_rate, 0, 0))
        entry = _audio_entry(b"Opus", channels, 48000, dops)
        return cls(track_id, "audio", 48000, entry, "opus", sample_rate=48000, channels=channels)


# -- init segment


def init_segment(track: Track) -> bytes:
    """
    ``ftyp`` + ``moov`` for one track (CMAF header): empty sample tables, ``mvex``/``trex`` announcing fragments.
    """
    video = track.kind == "video"
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6", b"cmfc", b"mp41", b"isom")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x00010000, 0x0100),
                    bytes(10), _MATRIX, bytes(24), struct.pack(">I", track.track_id + 1))
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track.track_id, 0, 0), bytes(8),
                    struct.pack(">hhhH", 0, 0, 0 if video else 0x0100, 0), _MATRIX,
                    struct.pack(">II", track.width << 16, track.height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, track.timescale, 0, _LANGUAGE_UND, 0))
    handler, name = (b"vide", b"VideoHandler\x00") if video else (b"soun", b"SoundHandler\x00")
    hdlr = full_box(b"hdlr", 0, 0, bytes(4), handler, bytes(12), name)
    media_header = full_box(b"vmhd", 0, 1, bytes(8)) if video else full_box(b"smhd", 0, 0, bytes(4))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(b"stbl",
               full_box(b"stsd", 0, 0, struct.pack(">I", 1), track.sample_entry),
               full_box(b"stts", 0, 0, bytes(4)),
               full_box(b"stsc", 0, 0, bytes(4)),
               full_box(b"stsz", 0, 0, bytes(8)),
               full_box(b"stco", 0, 0, bytes(4)))
    trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", media_header, dinf, stbl)))
    mvex = box(b"mvex", full_box(b"trex", 0, 0, struct.pack(">IIIII", track.track_id, 1, 0, 0, 0)))
    return ftyp + box(b"moov", mvhd, trak, mvex)


# -- media fragments


@dataclass(frozen=True, slots=True)
class Sample:
    """
    One sample in MP4 form (H.264: 4-byte length-prefixed NAL units, not Annex B).

    :param dts: decode time in the track's timescale (≥ 0, increasing).
    :param cto: composition offset, ``pts - dts`` (0 without B-frames).
    """

    data: bytes
    dts: int
    keyframe: bool
    cto: int = 0


def styp() -> bytes:
    """The segment type box (§8.16.2) that starts every segment: CMAF segment brands."""
    return box(b"styp", b"msdh", struct.pack(">I", 0), b"msdh", b"msix", b"cmfs")


def fragment(track_id: int, sequence_number: int, samples: list[tuple[Sample, int]]) -> bytes:
    """
    One ``moof`` + ``mdat`` (§8.8.4, §8.1.1) holding ``samples`` as ``(sample, duration)``: ``tfhd`` with
    ``default-base-is-moof``, ``tfdt`` version 1 (64-bit base decode time, §8.8.12), and a version 1 ``trun``
    (§8.8.8) with per-sample duration, size, flags and (only if any is non-zero) composition offset.
    """
    if not samples:
        raise EgressError("bad_input", "a fragment needs at least one sample")
    with_cto = any(s.cto for s, _ in samples)
    flags = 0x000001 | 0x000100 | 0x000200 | 0x000400 | (0x000800 if with_cto else 0)
    entries = bytearray()
    for sample, duration in samples:
        entries += struct.pack(">III", duration, len(sample.data),
                               SYNC_SAMPLE_FLAGS if sample.keyframe else NON_SYNC_SAMPLE_FLAGS)
        if with_cto:
            entries += struct.pack(">i", sample.cto)
    mfhd = full_box(b"mfhd", 0, 0, struct.pack(">I", sequence_number))
    tfhd = full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track_id))
    tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", samples[0][0].dts))

    def moof(data_offset: int) -> bytes:
        trun = full_box(b"trun", 1, flags, struct.pack(">Ii", len(samples), data_offset), bytes(entries))
        return box(b"moof", mfhd, box(b"traf", tfhd, tfdt, trun))

    size = len(moof(0))
    payload = b"".join(s.data for s, _ in samples)
    return moof(size + 8) + box(b"mdat", payload)


# -- cutting a track into parts and segments


@dataclass(frozen=True, slots=True)
class Part:
    """
    One CMAF chunk = one LL-HLS partial segment: ``data`` is ``moof``+``mdat`` (``styp`` first when ``index`` is 0).

    :param segment: media sequence number of its segment. :param index: its position in the segment.
    :param start, duration: decode time of its first sample and its length, in the track's timescale.
    :param independent: it starts with a sync sample (``INDEPENDENT=YES``).
    """

    segment: int
    index: int
    data: bytes
    start: int
    duration: int
    independent: bool
    samples: int


@dataclass(frozen=True, slots=True)
class Segment:
    """A completed segment: its parts, in order, are its bytes; ``start``/``duration`` in the track timescale."""

    number: int
    start: int
    duration: int
    parts: int


class Fragmenter:
    """
    Cuts one track's samples into parts (CMAF chunks) and segments, exactly on sample boundaries.

    A sample's duration is known when the next sample arrives, so each sample is held until then (latency: one
    frame). A segment starts with a sync sample. Segment boundaries are either given (``boundary=True`` on
    :meth:`push`, used to align the rungs of a ladder and the audio on the video's cuts) or chosen: the first
    sync sample at or after the next multiple of ``segment_duration`` from the first sample, less a tolerance of
    10 % for video (keyframes come when asked, a little late or early). Parts end before they would exceed
    ``part_duration``; without it, each segment is one fragment.

    Lifecycle: *empty* (for video, samples before the first key frame are dropped) → *cutting* → *finished*
    (:meth:`finish` closed the last part and segment; :meth:`push` then raises ``invalid_state``).

    :param first_segment: media sequence number of the first segment.
    """

    def __init__(self, track: Track, *, segment_duration: float = 2.0, part_duration: float | None = None,
                 first_segment: int = 0, log: PeerLogger | None = None) -> None:
        if segment_duration <= 0 or (part_duration is not None and not 0 < part_duration <= segment_duration):
            raise EgressError("bad_input", "need 0 < part_duration <= segment_duration")
        self.track = track
        self.segment_ticks = round(segment_duration * track.timescale)
        self.part_ticks = round(part_duration * track.timescale) if part_duration else None
        self._tolerance = self.segment_ticks // 10 if track.kind == "video" else 0
        self._log = (log or _log).bind(track=track.track_id, kind=track.kind)
        self._sequence = 1  # mfhd sequence number (§8.8.5: starts at 1, increases per fragment)
        self._segment = first_segment
        self._index = 0  # next part index in the current segment
        self._held: Sample | None = None
        self._pending: list[tuple[Sample, int]] = []
        self._pending_ticks = 0
        self._last_duration = 0
        self._origin: int | None = None
        self._segment_start = 0
        self._next_cut = 0
        self.finished = False
        #: Samples dropped: before the first key frame, or with a decode time not after the previous one.
        self.dropped = 0

    @property
    def segment_number(self) -> int:
        """Media sequence number of the segment being filled."""
        return self._segment

    def push(self, sample: Sample, *, boundary: bool | None = None,
             segment: int | None = None) -> list[Part | Segment]:
        """
        Add a sample; return the parts (and the segment) it completed, in order.

        :param boundary: ``True`` cuts a segment before this sample (it must be a sync sample), ``False`` never
            does, ``None`` decides by the segment duration.
        :param segment: with a cut, the media sequence number of the segment this sample starts (default: the
            next one), so renditions cut on the same instants keep the same numbers even if one missed a cut.
        :raises EgressError: ``invalid_state`` after :meth:`finish`; ``bad_input`` for a forced cut at a
            non-sync sample.
        """
        if self.finished:
            raise EgressError("invalid_state", "fragmenter finished")
        if boundary and not sample.keyframe:
            raise EgressError("bad_input", "a segment must start with a sync sample")
        held = self._held
        if held is None:
            if not sample.keyframe or sample.dts < 0:
                self.dropped += 1
                return []
            self._held = sample
            self._origin = self._segment_start = sample.dts
            self._next_cut = sample.dts + self.segment_ticks
            return []
        duration = sample.dts - held.dts
        if duration <= 0:
            self.dropped += 1
            self._log.debug("sample dropped: decode time not increasing", dts=sample.dts, previous=held.dts)
            return []
        self._pending.append((held, duration))
        self._pending_ticks += duration
        self._last_duration = duration
        self._held = sample
        out: list[Part | Segment] = []
        if boundary is None:
            boundary = sample.keyframe and sample.dts >= self._next_cut - self._tolerance
        if boundary:
            out += self._close_segment(sample.dts, segment)
        elif self.part_ticks is not None and self._pending_ticks + duration > self.part_ticks:
            out.append(self._close_part())
        return out

    def finish(self, last_duration: int | None = None) -> list[Part | Segment]:
        """Close the last part and segment; the held sample lasts ``last_duration`` (default: as the one before)."""
        if self.finished:
            return []
        self.finished = True
        if self._held is None:
            return []
        duration = last_duration or self._last_duration or max(1, self.track.timescale // 30)
        self._pending.append((self._held, duration))
        self._pending_ticks += duration
        end = self._held.dts + duration
        self._held = None
        return self._close_segment(end)

    def _close_part(self) -> Part:
        samples, self._pending = self._pending, []
        ticks, self._pending_ticks = self._pending_ticks, 0
        data = fragment(self.track.track_id, self._sequence, samples)
        if self._index == 0:
            data = styp() + data
        part = Part(self._segment, self._index, data, samples[0][0].dts, ticks, samples[0][0].keyframe,
                    len(samples))
        self._sequence += 1
        self._index += 1
        return part

    def _close_segment(self, end: int, number: int | None = None) -> list[Part | Segment]:
        out: list[Part | Segment] = []
        if self._pending:
            out.append(self._close_part())
        out.append(Segment(self._segment, self._segment_start, end - self._segment_start, self._index))
        self._segment = max(self._segment + 1, number or 0)
        self._index = 0
        self._segment_start = end
        assert self._origin is not None
        # The next planned cut: the first multiple of the segment duration (from the origin) beyond this one.
        k = (end - self._origin + self._tolerance) // self.segment_ticks + 1
        self._next_cut = self._origin + k * self.segment_ticks
        return out
