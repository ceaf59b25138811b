"""
The renditions of one HLS/DASH egress: which samples go into which CMAF track, where segments are cut, and the
master playlist and MPD that describe them.

Three ways in, one way out:

- **Passthrough** (an H.264 source): the publisher's access units are the top rung (``source``) as they are; its
  fragmenter cuts a segment at the first key frame after each segment length (the egress asks the publisher
  for one every segment length). The same units go to the ladder, which encodes the lower rungs with an IDR
  on every source key frame; a lower rung cuts exactly where the top rung did, with the same media sequence
  number.
- **Encoded** (a VP8 source): every rung, ``source`` included, comes from the ladder; this class chooses the cut
  instants (the first frame at or after each segment length) and asks the ladder for an IDR on every rung there.
- **Composite**: the ladder's composite worker puts an IDR on every rung at each multiple of the segment length;
  the segment number is that multiple, in every rung and in the audio.

Audio (AAC from the ladder) is cut at the first frame at or after each video cut, with the same number, so an
HLS player (and a DASH one: same ``$Number$``) finds the same instants in every rendition. A jump in media time
(a pause, a publisher who reconnected) closes the segment being filled and marks the next one
``EXT-X-DISCONTINUITY``.

Nothing here is asynchronous or touches a socket: :class:`HlsOutput` is fed on the event loop and its work is
byte shuffling (CMAF boxes, playlists). It never raises into its callers: a failure (a full disk) goes to
``on_error`` once.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chorus.egress.depacketize import AccessUnit
from chorus.egress.errors import EgressError
from chorus.egress.fmp4 import Fragmenter, Part, Sample, Segment, Track
from chorus.egress.h264 import NAL_PPS, NAL_SPS, annexb_to_length_prefixed, nal_type, split_annexb
from chorus.egress.ladder import AAC_BITRATE, VIDEO_CLOCK, EncodedFrame, Ladder, Rung, aac_bitrate, opus_channels
from chorus.egress.playlist import Audio, Rendition, Variant, dash_manifest, master_playlist
from chorus.sfu.logs import PeerLogger

_log = PeerLogger(logging.getLogger("chorus.egress.hls"))

AUDIO_CLOCK = 48000
TOP = "source"
AUDIO = "audio"
#: A jump of media time this long (seconds) between two samples is a discontinuity, not a long frame.
GAP = 1.0
#: The master playlist is published once the top rung has this many segments (RFC 8216 §6.2.2: a live playlist
#: holds at least three target durations, so a player starting at the hold-back point needs them; with LL-HLS
#: one segment and its parts will do) and every rung and the audio have one, or two segments later without a
#: rung that does not come (it is then left out).
READY_SEGMENTS = 3

Mode = Literal["passthrough", "encoded", "composite"]


@dataclass(frozen=True, slots=True)
class HlsSettings:
    """
    :param segment: segment length, seconds. :param part: LL-HLS part length, or ``None`` for plain HLS.
    :param rungs: the lower rungs. :param top_bitrate: the top rung's bit rate when it is encoded.
    :param directory: also write every file there (an external web server or CDN origin serves it).
    :param base_url: where the files are, as the MPD's ``BaseURL`` (``/hls/{room}/``).
    :param audio: ``aac`` (Opus transcoded in the worker: every player) or ``opus`` (passed through untouched:
        no transcoding at all, for players with Opus in MP4 — Chromium, Firefox, recent Safari through hls.js).
    """

    segment: float = 2.0
    part: float | None = None
    window: int = 6
    rungs: tuple[Rung, ...] = ()
    top_bitrate: int = 2_500_000
    frame_rate: float = 30.0
    directory: Path | None = None
    base_url: str | None = None
    audio: Literal["aac", "opus"] = "aac"


@dataclass(slots=True)
class _Rung:
    """One video rendition being filled."""

    rendition: Rendition
    nominal_bitrate: int
    fragmenter: Fragmenter | None = None
    last_pts: int | None = None
    samples: int = 0


@dataclass(slots=True)
class _AudioState:
    rendition: Rendition | None = None
    fragmenter: Fragmenter | None = None
    last_pts: int | None = None
    cut_index: int = 0  # next entry of the cut list to apply


@dataclass(slots=True)
class _Cuts:
    """Segment starts of the video: pts (90 kHz) → media sequence number, in order."""

    by_pts: OrderedDict[int, int] = field(default_factory=OrderedDict)

    def add(self, pts: int, number: int) -> None:
        self.by_pts[pts] = number
        while len(self.by_pts) > 64:
            self.by_pts.popitem(last=False)


def parameter_sets(annexb: bytes) -> tuple[bytes, bytes] | None:
    """The SPS and PPS NAL units of an access unit, if it carries both."""
    nals = split_annexb(annexb)
    sps = next((n for n in nals if nal_type(n) == NAL_SPS), None)
    pps = next((n for n in nals if nal_type(n) == NAL_PPS), None)
    return (sps, pps) if sps is not None and pps is not None else None


class HlsOutput:
    """
    The CMAF renditions of one egress and the manifests that describe them (see the module docstring).

    Lifecycle: *starting* (no manifest yet: :meth:`master` is ``None``) → *live* (the top rung has segments; the
    set of renditions is then fixed) → *ended* (:meth:`end`: last segments closed, ``EXT-X-ENDLIST``, a static
    MPD).

    :param ladder: where source units go to be encoded (lower rungs, AAC); its outputs come back through
        :meth:`encoded`.
    :param origin: Unix time of media time 0 (the egress timeline).
    """

    def __init__(self, settings: HlsSettings, *, origin: float, ladder: Ladder | None, mode: Mode | None = None,
                 on_error: Callable[[EgressError], None] = lambda e: None, log: PeerLogger | None = None) -> None:
        self.settings = settings
        self.origin = origin
        self.mode: Mode | None = mode
        self.ladder = ladder
        self.ended = False
        self.error: EgressError | None = None
        self._on_error = on_error
        self._log = log or _log
        self._rungs: dict[str, _Rung] = {}
        self._audio = _AudioState()
        self._audio_seen = False
        self._audio_channels = 2
        self._cuts = _Cuts()
        self._segment_ticks = round(settings.segment * VIDEO_CLOCK)
        self._next_cut: int | None = None  # encoded mode: pts at or after which the next cut goes
        self._last_input: int | None = None
        self._next_number = 0
        self._published: list[str] | None = None  # rendition names in the manifests, fixed once live
        self._nominal = {r.name: r.bitrate for r in settings.rungs}
        self._nominal[TOP] = settings.top_bitrate
        if mode == "composite":
            self._audio_rendition()  # a composite always has sound (silence while nobody speaks)

    # -- what the egress feeds

    def video_unit(self, unit: AccessUnit, codec: str) -> None:
        """A source video access unit (pts on the egress timeline, 90 kHz)."""
        if self.ended or self.error is not None:
            return
        try:
            if self.mode is None:
                self.mode = "passthrough" if codec == "h264" else "encoded"
                self._log.info("video source", codec=codec, mode=self.mode)
            if self.mode == "passthrough" and codec == "h264":
                self._passthrough(unit)
            elif self.mode == "encoded" or codec != "h264":
                self._encode_input(unit, codec)
        except EgressError as exc:
            self._fail(exc)

    def audio_unit(self, unit: AccessUnit) -> None:
        """A source Opus packet (pts on the egress timeline, 48 kHz): to the ladder, to come back as AAC (or, with
        ``audio="opus"``, straight into its rendition)."""
        if self.ended or self.error is not None:
            return
        if not (self._cuts.by_pts or self.mode == "composite"):  # nothing before the first video cut
            return
        if not self._audio_seen:
            self._audio_seen = True
            self._audio_channels = opus_channels(unit.data)  # the worker reads the same first packet
            try:
                self._audio_rendition()
            except EgressError as exc:
                self._fail(exc)
        if self.settings.audio == "opus" and self.mode != "composite":
            try:
                self._audio_frame(EncodedFrame(AUDIO, unit.data, unit.pts, True))
            except EgressError as exc:
                self._fail(exc)
        elif self.ladder is not None:
            self.ladder.push_audio(unit.data, unit.pts)

    def encoded(self, frame: EncodedFrame) -> None:
        """An output of the ladder: a rung's access unit, or AAC."""
        if self.ended or self.error is not None:
            return
        try:
            if frame.rung == AUDIO:
                self._audio_frame(frame)
            else:
                self._rung_frame(frame)
        except EgressError as exc:
            self._fail(exc)

    # -- video

    def _passthrough(self, unit: AccessUnit) -> None:
        top = self._rungs.get(TOP)
        if top is None:
            sets = parameter_sets(unit.data) if unit.keyframe else None
            if sets is None:
                return  # wait for a key frame with its parameter sets
            top = self._rungs[TOP] = self._new_rung(TOP, Track.h264(*sets))
        sample = Sample(annexb_to_length_prefixed(unit.data), unit.pts, unit.keyframe)
        if self._gap(top, unit.pts):
            self._break(top)
        if top.fragmenter is None:
            if not unit.keyframe:
                return
            top.fragmenter = self._fragmenter(top, self._next_number)
            top.fragmenter.push(sample)
            self._cut(unit.pts, self._next_number)
        else:
            events = top.fragmenter.push(sample)
            if any(isinstance(e, Segment) for e in events):
                self._cut(unit.pts, top.fragmenter.segment_number)
            self._add(top, events)
        top.last_pts = unit.pts
        top.samples += 1
        if self.ladder is not None and self.settings.rungs:  # without lower rungs the worker only makes AAC
            self.ladder.push_video(unit.data, unit.pts, keyframe=unit.keyframe, codec="h264")

    def _encode_input(self, unit: AccessUnit, codec: str) -> None:
        """Encoded mode: choose the cut instants and send the unit to the ladder, IDR on every rung at a cut."""
        if self.ladder is None:
            raise EgressError("unsupported_codec", f"{codec} needs the ladder to go into HLS")
        gap = self._last_input is not None and unit.pts - self._last_input > GAP * VIDEO_CLOCK
        force = self._next_cut is None or unit.pts >= self._next_cut or gap
        if force:
            # On the segment grid (multiples of the segment length), never less than half a segment apart.
            self._cut(unit.pts, self._next_number)
            seg = self._segment_ticks
            self._next_cut = max((unit.pts // seg + 1) * seg, unit.pts + seg // 2)
        self._last_input = unit.pts
        self.ladder.push_video(unit.data, unit.pts, keyframe=unit.keyframe, force_keyframe=force,
                               codec="vp8" if codec == "vp8" else "h264", encode_top=True)

    def _cut(self, pts: int, number: int) -> None:
        self._cuts.add(pts, number)
        self._next_number = number + 1

    def _rung_frame(self, frame: EncodedFrame) -> None:
        rung = self._rungs.get(frame.rung)
        if rung is None:
            sets = parameter_sets(frame.data) if frame.keyframe else None
            if sets is None:
                return
            rung = self._rungs[frame.rung] = self._new_rung(frame.rung, Track.h264(*sets))
        if self.mode == "composite" and frame.keyframe and frame.pts not in self._cuts.by_pts:
            self._cuts.add(frame.pts, frame.pts // self._segment_ticks)
        number = self._cuts.by_pts.get(frame.pts) if frame.keyframe else None
        if self._gap(rung, frame.pts):
            self._break(rung)
        sample = Sample(annexb_to_length_prefixed(frame.data), frame.pts, frame.keyframe)
        if rung.fragmenter is None:
            if number is None:
                return  # a rung starts (and restarts after a gap) at a cut
            rung.fragmenter = self._fragmenter(rung, number)
            rung.fragmenter.push(sample)
        else:
            self._add(rung, rung.fragmenter.push(sample, boundary=number is not None, segment=number))
        rung.last_pts = frame.pts
        rung.samples += 1

    def _gap(self, rung: _Rung, pts: int) -> bool:
        return rung.fragmenter is not None and rung.last_pts is not None and pts - rung.last_pts > GAP * VIDEO_CLOCK

    def _break(self, rung: _Rung) -> None:
        """Close the segment being filled (media time jumps), the next one is a discontinuity."""
        assert rung.fragmenter is not None
        self._add(rung, rung.fragmenter.finish())
        rung.fragmenter = None
        rung.rendition.discontinuity()

    # -- audio

    def _audio_rendition(self) -> Rendition:
        """The audio rendition, made as soon as the audio is known (before its first segment, so that the master
        playlist lists it even while a busy worker is late with the AAC)."""
        state = self._audio
        if state.rendition is None:
            channels = 2 if self.mode == "composite" else self._audio_channels
            if self.settings.audio == "opus" and self.mode != "composite":
                track = Track.opus(channels)
            else:
                track = Track.aac(AUDIO_CLOCK, channels, bitrate=aac_bitrate(channels))
            state.rendition = self._rendition(AUDIO, track)
        return state.rendition

    def _audio_frame(self, frame: EncodedFrame) -> None:
        state = self._audio
        rendition = self._audio_rendition()
        cut = self._audio_cut(frame.pts)
        if state.fragmenter is not None and state.last_pts is not None and \
                frame.pts - state.last_pts > GAP * AUDIO_CLOCK:
            self._add_events(rendition, state.fragmenter.finish())
            state.fragmenter = None
            rendition.discontinuity()
        sample = Sample(frame.data, frame.pts, True)
        if state.fragmenter is None:
            if cut is None:
                return  # audio starts at a video cut
            state.fragmenter = Fragmenter(rendition.track, segment_duration=self.settings.segment,
                                          part_duration=self.settings.part, first_segment=cut, log=self._log)
            state.fragmenter.push(sample)
        else:
            self._add_events(rendition, state.fragmenter.push(sample, boundary=cut is not None, segment=cut))
        state.last_pts = frame.pts

    def _audio_cut(self, pts: int) -> int | None:
        """The segment number that starts at this AAC frame, if it is the first at or after a video cut."""
        state = self._audio
        current = state.fragmenter.segment_number if state.fragmenter is not None else -1
        if self.mode == "composite":
            number = pts * VIDEO_CLOCK // AUDIO_CLOCK // self._segment_ticks
            return number if number > current else None
        found = None
        for cut_pts, number in self._cuts.by_pts.items():
            if cut_pts * AUDIO_CLOCK // VIDEO_CLOCK <= pts and number > current:
                found = number
        return found

    # -- renditions

    def _rendition(self, name: str, track: Track) -> Rendition:
        directory = self.settings.directory
        return Rendition(name, track, segment_duration=self.settings.segment, part_duration=self.settings.part,
                         wall_clock_origin=self.origin, window=self.settings.window, directory=directory,
                         frame_rate=self.settings.frame_rate if track.kind == "video" else None, log=self._log)

    def _new_rung(self, name: str, track: Track) -> _Rung:
        self._log.info("rendition started", rendition=name, width=track.width, height=track.height,
                       codec=track.codec)
        return _Rung(self._rendition(name, track), self._nominal.get(name, self.settings.top_bitrate))

    def _fragmenter(self, rung: _Rung, first: int) -> Fragmenter:
        return Fragmenter(rung.rendition.track, segment_duration=self.settings.segment,
                          part_duration=self.settings.part, first_segment=first, log=self._log)

    def _add(self, rung: _Rung, events: list[Part | Segment]) -> None:
        self._add_events(rung.rendition, events)
        if rung.rendition.name == TOP and any(isinstance(e, Segment) for e in events):
            self._manifests_changed()

    def _add_events(self, rendition: Rendition, events: list[Part | Segment]) -> None:
        if events:
            rendition.add(events)

    def _fail(self, exc: EgressError) -> None:
        if self.error is None:
            self.error = exc
            self._log.error("hls output failed", code=exc.code, reason=exc.reason)
            self._on_error(exc)

    # -- manifests

    @property
    def renditions(self) -> dict[str, Rendition]:
        """Every rendition by name (the audio too)."""
        out = {name: r.rendition for name, r in self._rungs.items()}
        if self._audio.rendition is not None:
            out[AUDIO] = self._audio.rendition
        return out

    def rendition(self, name: str) -> Rendition | None:
        return self.renditions.get(name)

    def _expected(self) -> list[str]:
        return [TOP] + [r.name for r in self.settings.rungs]

    def _ready(self) -> list[str] | None:
        """The renditions the manifests list, fixed the first time they are all ready (see module constants)."""
        if self._published is not None:
            return self._published
        top = self._rungs.get(TOP)
        if top is None or not top.rendition.segments:
            return None
        have = {name for name, r in self.renditions.items() if r.segments}
        if self._audio.rendition is not None:
            have.add(AUDIO)  # listed from the start: its segments come (a worker under load may be late)
        expected = self._expected()
        audio_wanted = self._audio_seen or self.mode == "composite"
        complete = all(n in have for n in expected) and (not audio_wanted or AUDIO in have)
        need = 1 if self.settings.part is not None else READY_SEGMENTS
        count = len(top.rendition.segments)
        if not self.ended and (count < need or (not complete and count < need + 2)):
            return None
        self._published = [n for n in expected if n in have] + ([AUDIO] if AUDIO in have else [])
        self._log.info("manifests published", renditions=",".join(self._published))
        return self._published

    def _variants(self) -> tuple[list[tuple[Rendition, Variant]], tuple[Rendition, Audio] | None]:
        names = self._ready() or []
        video = [(self._rungs[n].rendition, Variant.of(self._rungs[n].rendition,
                                                       nominal_bitrate=self._rungs[n].nominal_bitrate,
                                                       frame_rate=self.settings.frame_rate))
                 for n in names if n in self._rungs]
        audio = self._audio.rendition
        with_audio = (audio, Audio.of(audio, nominal_bitrate=AAC_BITRATE)) if audio is not None and AUDIO in names \
            else None
        return video, with_audio

    def master(self) -> str | None:
        """The master playlist, or ``None`` before the top rung has a segment."""
        if self._ready() is None:
            return None
        video, audio = self._variants()
        return master_playlist([v for _, v in video], audio[1] if audio else None)

    def mpd(self) -> str | None:
        """The DASH manifest of the same files, or ``None`` before the top rung has a segment."""
        if self._ready() is None:
            return None
        video, audio = self._variants()
        return dash_manifest(video, audio, base_url=self.settings.base_url)

    def _manifests_changed(self) -> None:
        directory = self.settings.directory
        if directory is None or self._ready() is None:
            return
        master, mpd = self.master(), self.mpd()
        assert master is not None and mpd is not None
        write_atomic(directory / "index.m3u8", master.encode())
        write_atomic(directory / "index.mpd", mpd.encode())

    @property
    def bytes_written(self) -> int:
        return sum(r.bytes_written for r in self.renditions.values())

    def describe(self) -> list[dict[str, object]]:
        """Each rendition: name, size, segments, bytes."""
        out: list[dict[str, object]] = []
        for name, r in self.renditions.items():
            track = r.track
            peak, average = r.bandwidth()
            out.append({"name": name, "kind": track.kind, "codec": track.codec, "width": track.width,
                        "height": track.height, "segments": len(r.segments), "bytes": r.bytes_written,
                        "bandwidth": average})
        return out

    def end(self) -> None:
        """Close the last segments (call after the ladder delivered its last outputs) and end every playlist."""
        if self.ended:
            return
        try:
            for rung in self._rungs.values():
                if rung.fragmenter is not None and not rung.rendition.ended:
                    self._add_events(rung.rendition, rung.fragmenter.finish())
            if self._audio.fragmenter is not None and self._audio.rendition is not None:
                self._add_events(self._audio.rendition, self._audio.fragmenter.finish())
        except EgressError as exc:
            self._fail(exc)
        self.ended = True
        for rendition in self.renditions.values():
            try:
                rendition.end()
            except EgressError as exc:
                self._fail(exc)
        try:
            self._manifests_changed()
        except EgressError as exc:
            self._fail(exc)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename, so a web server never serves half of it.

    :raises EgressError: ``io_error``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise EgressError("io_error", f"cannot write {path}: {exc.strerror}") from exc
