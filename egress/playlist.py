"""
HLS and DASH descriptions of the same CMAF files, and blocking playlist reload.

- Media playlists follow RFC 8216 with the Low-Latency additions of draft-pantos-hls-rfc8216bis (§4.4.3.7
  ``EXT-X-PART-INF``, §4.4.3.8 ``EXT-X-SERVER-CONTROL``, §4.4.4.9 ``EXT-X-PART``, §4.4.5.3
  ``EXT-X-PRELOAD-HINT``, §6.2.5.2 blocking reload). Sliding window with ``EXT-X-MEDIA-SEQUENCE``;
  ``EXT-X-ENDLIST`` once ended.
- The master playlist (RFC 8216 §4.3.4.2 ``EXT-X-STREAM-INF``, §4.3.4.1 ``EXT-X-MEDIA``) lists one variant per
  video rung and, when audio is a separate track, one audio rendition group that every variant refers to.
- The DASH MPD (ISO/IEC 23009-1) is dynamic while live (static once ended), one AdaptationSet per kind, one
  Representation per rung, ``SegmentTemplate`` with a ``SegmentTimeline`` (exact durations) and ``$Number$``
  equal to the HLS media sequence number, so both name the very same files.

File layout of one rendition (``name`` is its folder): ``{name}/index.m3u8``, ``{name}/init.mp4``,
``{name}/seg{N}.m4s`` and the parts ``{name}/seg{N}.{i}.m4s``. A segment file is the concatenation of its parts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from chorus.egress.errors import EgressError
from chorus.egress.fmp4 import Part, Segment, Track, init_segment
from chorus.sfu.logs import PeerLogger

_log = PeerLogger(logging.getLogger("chorus.egress.playlist"))

#: Content types for everything an egress serves.
CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".mpd": "application/dash+xml",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
}

#: The Advance Part Limit (rfc8216bis §6.2.5.2): how far past the newest part a blocking request may point.
ADVANCE_PART_LIMIT = 3

INIT_NAME = "init.mp4"
PLAYLIST_NAME = "index.m3u8"
_MEDIA_NAME = re.compile(r"seg(\d{1,12})(?:\.(\d{1,6}))?\.m4s")


def segment_name(number: int, part: int | None = None) -> str:
    """``seg{N}.m4s`` or, for a part, ``seg{N}.{i}.m4s``."""
    return f"seg{number}.m4s" if part is None else f"seg{number}.{part}.m4s"


def parse_media_name(name: str) -> tuple[int, int | None] | None:
    """``(segment, part)`` for a segment or part file name, ``None`` for anything else."""
    m = _MEDIA_NAME.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) is not None else None)


def cache_control(name: str) -> str:
    """
    ``Cache-Control`` a CDN honours: playlists and manifests are revalidated on every request (a blocking
    request carries ``_HLS_msn``/``_HLS_part`` in its URL, so each answer is cached under its own key for a
    moment); init segments, segments and parts never change once written.
    """
    if name.endswith((".m3u8", ".mpd")):
        return "public, max-age=1"
    return "public, max-age=86400, immutable"


def _seconds(ticks: int, timescale: int) -> str:
    return f"{ticks / timescale:.5f}"


def _date_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_blocking_query(query: Mapping[str, str]) -> tuple[int | None, int | None]:
    """
    ``(_HLS_msn, _HLS_part)`` from a playlist request's query (rfc8216bis §6.2.5.2).

    :raises EgressError: ``bad_request`` for a non-integer or negative value, or ``_HLS_part`` without
        ``_HLS_msn`` (the server answers 400).
    """
    def number(key: str) -> int | None:
        raw = query.get(key)
        if raw is None:
            return None
        if not raw.isdigit() or len(raw) > 12:
            raise EgressError("bad_request", f"{key} must be a non-negative integer")
        return int(raw)

    msn, part = number("_HLS_msn"), number("_HLS_part")
    if part is not None and msn is None:
        raise EgressError("bad_request", "_HLS_part without _HLS_msn")
    return msn, part


class BlockingReload:
    """
    When a playlist request may be answered (rfc8216bis §6.2.5.2).

    ``(msn, None)`` waits until segment ``msn`` is complete; ``(msn, p)`` until part ``p`` of segment ``msn``
    exists, or a later part does (a part index past the end of a segment is satisfied by the next segment's
    first part). Once :meth:`end` was called every wait returns at once.

    Lifecycle: *live* (:meth:`published` advances) → *ended*.
    """

    def __init__(self) -> None:
        self.complete = -1  # newest complete segment
        self.newest: tuple[int, int] = (-1, -1)  # newest part: (segment, index)
        self.ended = False
        self._waiters: list[tuple[int, int | None, asyncio.Future[None]]] = []

    def available(self, msn: int, part: int | None) -> bool:
        if self.ended or self.complete >= msn:
            return True
        return part is not None and self.newest >= (msn, part)

    def check(self, msn: int, part: int | None) -> None:
        """
        :raises EgressError: ``bad_request`` for a request too far ahead: ``msn`` beyond the newest segment plus
            two, or ``part`` beyond the newest part plus the Advance Part Limit.
        """
        newest_msn = max(self.complete, self.newest[0])
        if msn > newest_msn + 2:
            raise EgressError("bad_request", f"_HLS_msn={msn} is too far ahead (newest segment {newest_msn})")
        if part is not None and msn == self.newest[0] and part > self.newest[1] + ADVANCE_PART_LIMIT:
            raise EgressError("bad_request", f"_HLS_part={part} is too far ahead")

    async def wait(self, msn: int, part: int | None, timeout: float) -> None:
        """
        Return when ``(msn, part)`` is available.

        :raises EgressError: ``bad_request`` (see :meth:`check`), ``timeout`` after ``timeout`` seconds (the
            server answers 503, as the draft suggests for a request it cannot satisfy in time).
        """
        self.check(msn, part)
        if self.available(msn, part):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (msn, part, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise EgressError("timeout", f"segment {msn} part {part} not available within {timeout} s") from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def published(self, segment: int, part: int | None) -> None:
        """A part (``part`` = its index) or a whole segment (``part`` = ``None``) is now in the playlist."""
        if part is None:
            self.complete = max(self.complete, segment)
        else:
            self.newest = max(self.newest, (segment, part))
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        for msn, part, future in self._waiters:
            if not future.done() and self.available(msn, part):
                future.set_result(None)


@dataclass(slots=True)
class _SegmentEntry:
    number: int
    start: int
    duration: int = 0
    parts: list[Part] = field(default_factory=list)
    complete: bool = False
    size: int = 0
    discontinuity: bool = False  # media time jumps before it (a pause, a publisher who came back)


class Rendition:
    """
    One CMAF track as an HLS media playlist and its files: takes a :class:`~chorus.egress.fmp4.Fragmenter`'s
    output, keeps the newest files in memory (and optionally writes them to ``directory``), renders the
    playlist, and answers blocking requests.

    :param name: the rendition's folder name (``720p``, ``360p``, ``audio``), a safe path segment.
    :param wall_clock_origin: Unix time of media time 0 (``EXT-X-PROGRAM-DATE-TIME``, DASH
        ``availabilityStartTime``).
    :param window: complete segments listed in the playlist; files of ``keep_extra`` more are still served.
    :param part_duration: the part target (enables LL-HLS tags), or ``None`` for plain HLS.

    Lifecycle: *live* (:meth:`add`) → *ended* (:meth:`end`: ``EXT-X-ENDLIST``, waiters released).
    """

    def __init__(self, name: str, track: Track, *, segment_duration: float = 2.0,
                 part_duration: float | None = None, wall_clock_origin: float | None = None, window: int = 6,
                 keep_extra: int = 2, directory: Path | None = None, frame_rate: float | None = None,
                 log: PeerLogger | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
            raise EgressError("bad_input", f"rendition name {name!r} is not a safe path segment")
        self.name = name
        self.track = track
        self.segment_duration = segment_duration
        self.part_duration = part_duration
        self.wall_clock_origin = time.time() if wall_clock_origin is None else wall_clock_origin
        self.window = window
        self.keep_extra = keep_extra
        self.directory = directory / name if directory is not None else None
        self.frame_rate = frame_rate
        self.reload = BlockingReload()
        self.ended = False
        self.bytes_written = 0
        self._log = (log or _log).bind(rendition=name)
        self._segments: OrderedDict[int, _SegmentEntry] = OrderedDict()
        self._discontinuous_next = False
        self._evicted_discontinuities = 0
        self._files: dict[str, bytes] = {INIT_NAME: init_segment(track)}
        self._max_extinf = max(1, round(segment_duration))
        if self.directory is not None:
            self._write(INIT_NAME, self._files[INIT_NAME])

    # -- input

    def add(self, events: Iterable[Part | Segment]) -> None:
        """
        Take the parts and segments a fragmenter produced.

        :raises EgressError: ``invalid_state`` after :meth:`end`; ``io_error`` if writing to ``directory`` failed
            (the in-memory copy is still served).
        """
        if self.ended:
            raise EgressError("invalid_state", f"rendition {self.name} has ended")
        for event in events:
            if isinstance(event, Part):
                entry = self._segments.get(event.segment)
                if entry is None:
                    entry = self._segments[event.segment] = self._entry(event.segment, event.start)
                entry.parts.append(event)
                entry.size += len(event.data)
                if self.part_duration is not None:  # plain HLS serves whole segments only
                    self._store(segment_name(event.segment, event.index), event.data)
                self.reload.published(event.segment, event.index)
            else:
                entry = self._segments.get(event.number) or self._entry(event.number, event.start)
                self._segments[event.number] = entry
                entry.duration, entry.complete = event.duration, True
                self._max_extinf = max(self._max_extinf, round(event.duration / self.track.timescale))
                self._store(segment_name(event.number), b"".join(p.data for p in entry.parts))
                self._evict()
                self.reload.published(event.number, None)
        if self.directory is not None:
            self._write(PLAYLIST_NAME, self.playlist().encode())

    def discontinuity(self) -> None:
        """The next segment does not continue the last one in media time (``EXT-X-DISCONTINUITY``)."""
        self._discontinuous_next = True

    def _entry(self, number: int, start: int) -> _SegmentEntry:
        entry = _SegmentEntry(number, start, discontinuity=self._discontinuous_next and bool(self._segments))
        self._discontinuous_next = False
        return entry

    def end(self) -> None:
        """No more media: the playlist gets ``EXT-X-ENDLIST`` and every blocked request is answered."""
        if not self.ended:
            self.ended = True
            self.reload.end()
            if self.directory is not None:
                self._write(PLAYLIST_NAME, self.playlist().encode())

    # -- output

    def get(self, name: str) -> bytes | None:
        """A file of this rendition (``init.mp4``, a segment or a part), ``None`` if it does not exist (now)."""
        if name == PLAYLIST_NAME:
            return self.playlist().encode()
        return self._files.get(name)

    async def get_blocking(self, name: str, timeout: float) -> bytes | None:
        """
        Like :meth:`get`, but a part or segment that is about to exist (the preload hint, or anything up to the
        Advance Part Limit ahead) is waited for, as a client's request for a preload hint expects.

        :raises EgressError: ``timeout``, or ``bad_request`` for a name too far ahead.
        """
        data = self.get(name)
        parsed = parse_media_name(name)
        if data is not None or parsed is None or self.ended:
            return data
        msn, part = parsed
        if msn <= self.reload.complete or (part is not None and (msn, part) <= self.reload.newest):
            return None  # it existed and was evicted, or never will
        await self.reload.wait(msn, part, timeout)
        return self.get(name)

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """``(number, start, duration)`` of the complete segments in the playlist window (track timescale)."""
        done = [e for e in self._segments.values() if e.complete]
        return [(e.number, e.start, e.duration) for e in done[-self.window:]]

    def bandwidth(self) -> tuple[int, int]:
        """``(peak, average)`` bits per second over the complete segments kept (0, 0 before the first)."""
        done = [e for e in self._segments.values() if e.complete and e.duration]
        if not done:
            return 0, 0
        scale = self.track.timescale
        peak = max(e.size * 8 * scale / e.duration for e in done)
        average = sum(e.size for e in done) * 8 * scale / sum(e.duration for e in done)
        return math.ceil(peak), math.ceil(average)

    def playlist(self) -> str:
        """The media playlist as it stands."""
        scale = self.track.timescale
        done = [e for e in self._segments.values() if e.complete][-self.window:]
        open_ = [e for e in self._segments.values() if not e.complete]
        ll = self.part_duration is not None
        lines = ["#EXTM3U", "#EXT-X-VERSION:6", f"#EXT-X-TARGETDURATION:{self._max_extinf}"]
        if ll:
            assert self.part_duration is not None
            lines.append(f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={3 * self.part_duration:.3f}")
            lines.append(f"#EXT-X-PART-INF:PART-TARGET={self.part_duration:.3f}")
        first = done[0].number if done else (open_[0].number if open_ else 0)
        lines.append(f"#EXT-X-MEDIA-SEQUENCE:{first}")
        gone = self._evicted_discontinuities + sum(
            e.discontinuity for e in self._segments.values() if e.complete and e.number < first)
        if gone or any(e.discontinuity for e in done + open_):
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{gone}")
        lines += ["#EXT-X-INDEPENDENT-SEGMENTS", f'#EXT-X-MAP:URI="{INIT_NAME}"']
        # Parts are listed for the segments of the last three target durations (rfc8216bis §4.4.4.9).
        part_horizon = (done[-1].start + done[-1].duration if done else 0) - 3 * self._max_extinf * scale
        for entry in done + open_:
            if entry.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date_time(self.wall_clock_origin + entry.start / scale)}")
            if ll and (not entry.complete or entry.start + entry.duration > part_horizon):
                for p in entry.parts:
                    independent = ",INDEPENDENT=YES" if p.independent else ""
                    uri = segment_name(p.segment, p.index)
                    lines.append(f'#EXT-X-PART:DURATION={_seconds(p.duration, scale)},URI="{uri}"{independent}')
            if entry.complete:
                lines += [f"#EXTINF:{_seconds(entry.duration, scale)},", segment_name(entry.number)]
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        elif ll:
            if open_:
                hint = segment_name(open_[-1].number, len(open_[-1].parts))
            else:
                hint = segment_name(done[-1].number + 1 if done else 0, 0)
            lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{hint}"')
        return "\n".join(lines) + "\n"

    # -- files

    def _store(self, name: str, data: bytes) -> None:
        self._files[name] = data
        self.bytes_written += len(data)
        if self.directory is not None:
            self._write(name, data)

    def _evict(self) -> None:
        done = [n for n, e in self._segments.items() if e.complete]
        for number in done[: max(0, len(done) - self.window - self.keep_extra)]:
            entry = self._segments.pop(number)
            self._evicted_discontinuities += entry.discontinuity
            for name in [segment_name(number)] + [segment_name(number, p.index) for p in entry.parts]:
                self._files.pop(name, None)
                if self.directory is not None:
                    try:
                        (self.directory / name).unlink(missing_ok=True)
                    except OSError as exc:
                        self._log.warning("could not delete an old segment", file=name, error=str(exc))

    def _write(self, name: str, data: bytes) -> None:
        """Write atomically (temporary file, then rename) so a web server never serves half a file."""
        assert self.directory is not None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.directory / name)
        except OSError as exc:
            self._log.error("writing an egress file failed", file=name, error=str(exc))
            raise EgressError("io_error", f"cannot write {self.directory / name}: {exc.strerror}") from exc


# -- master playlist and DASH manifest


@dataclass(frozen=True, slots=True)
class Variant:
    """A video rung as the master playlist and the MPD describe it. ``bandwidth`` in bits per second."""

    name: str
    width: int
    height: int
    codec: str
    bandwidth: int
    average_bandwidth: int
    frame_rate: float

    @classmethod
    def of(cls, rendition: Rendition, *, nominal_bitrate: int, frame_rate: float = 30.0) -> Variant:
        """From a live rendition: measured bandwidth once segments exist, ``nominal_bitrate`` before."""
        peak, average = rendition.bandwidth()
        track = rendition.track
        return cls(rendition.name, track.width, track.height, track.codec, peak or nominal_bitrate,
                   average or nominal_bitrate, rendition.frame_rate or frame_rate)


@dataclass(frozen=True, slots=True)
class Audio:
    """The audio rendition (one group, ``audio``)."""

    name: str
    codec: str
    channels: int
    sample_rate: int
    bandwidth: int

    @classmethod
    def of(cls, rendition: Rendition, *, nominal_bitrate: int = 128_000) -> Audio:
        peak, _ = rendition.bandwidth()
        track = rendition.track
        return cls(rendition.name, track.codec, track.channels, track.sample_rate, peak or nominal_bitrate)


def master_playlist(variants: Iterable[Variant], audio: Audio | None = None) -> str:
    """
    The master playlist: one ``EXT-X-STREAM-INF`` per rung, highest first (RFC 8216 §4.3.4.2; BANDWIDTH counts
    the audio too), and an ``EXT-X-MEDIA`` audio rendition that every variant refers to.
    """
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    extra = 0
    if audio is not None:
        extra = audio.bandwidth
        lines.append(f'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="audio",NAME="{audio.name}",DEFAULT=YES,AUTOSELECT=YES,'
                     f'CHANNELS="{audio.channels}",URI="{audio.name}/{PLAYLIST_NAME}"')
    for v in sorted(variants, key=lambda v: -v.bandwidth):
        codecs = v.codec + (f",{audio.codec}" if audio is not None else "")
        attrs = (f"BANDWIDTH={v.bandwidth + extra},AVERAGE-BANDWIDTH={v.average_bandwidth + extra},"
                 f'RESOLUTION={v.width}x{v.height},CODECS="{codecs}",FRAME-RATE={v.frame_rate:.3f}')
        if audio is not None:
            attrs += ',AUDIO="audio"'
        lines += [f"#EXT-X-STREAM-INF:{attrs}", f"{v.name}/{PLAYLIST_NAME}"]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    return f"PT{seconds:.3f}S"


def _timeline(rendition: Rendition) -> tuple[int, str]:
    """``(startNumber, <SegmentTimeline>)`` with runs of equal durations merged (``r``)."""
    segments = rendition.segments
    runs: list[list[int]] = []  # [t, d, r]
    for _, start, duration in segments:
        if runs and runs[-1][1] == duration and runs[-1][0] + runs[-1][1] * (runs[-1][2] + 1) == start:
            runs[-1][2] += 1
        else:
            runs.append([start, duration, 0])
    body = "".join(f'<S t="{t}" d="{d}"' + (f' r="{r}"' if r else "") + "/>" for t, d, r in runs)
    return (segments[0][0] if segments else 0), f"<SegmentTimeline>{body}</SegmentTimeline>"


def dash_manifest(video: Iterable[tuple[Rendition, Variant]], audio: tuple[Rendition, Audio] | None = None, *,
                  now: Callable[[], float] = time.time, min_buffer: float = 2.0, base_url: str | None = None) -> str:
    """
    The DASH MPD of the same renditions: ``dynamic`` while live (``availabilityStartTime`` = media time 0),
    ``static`` once every rendition ended. ``$Number$`` is the HLS media sequence number, so
    ``{name}/seg$Number$.m4s`` is the same file the HLS playlists list; ``base_url`` (a ``BaseURL``, e.g.
    ``/hls/room/``) says where those files are when the MPD is served from elsewhere.
    """
    video = list(video)
    every = [r for r, _ in video] + ([audio[0]] if audio else [])
    if not every:
        raise EgressError("bad_input", "a manifest needs at least one rendition")
    origin = every[0].wall_clock_origin
    ended = all(r.ended for r in every)
    seg = max(r.segment_duration for r in every)
    end = max((s[1] + s[2]) / r.track.timescale for r in every for s in r.segments[-1:]) if any(
        r.segments for r in every) else 0.0
    head = ['<?xml version="1.0" encoding="UTF-8"?>',
            '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" profiles="urn:mpeg:dash:profile:isoff-live:2011,'
            'urn:mpeg:dash:profile:cmaf:2019"']
    if ended:
        head.append(f' type="static" mediaPresentationDuration="{_duration(end)}"')
    else:
        window = max(r.window for r in every) * seg
        head.append(f' type="dynamic" availabilityStartTime={quoteattr(_date_time(origin))}'
                    f" publishTime={quoteattr(_date_time(now()))} minimumUpdatePeriod={quoteattr(_duration(seg))}"
                    f" timeShiftBufferDepth={quoteattr(_duration(window))}"
                    f" suggestedPresentationDelay={quoteattr(_duration(3 * seg))}")
    head.append(f' minBufferTime="{_duration(min_buffer)}">')
    out = ["".join(head)]
    if base_url is not None:
        out.append(f"<BaseURL>{escape(base_url)}</BaseURL>")
    out.append('<Period id="0" start="PT0S">')

    def representation(r: Rendition, attrs: str) -> str:
        start, timeline = _timeline(r)
        return (f'<Representation id="{r.name}" {attrs}>'
                f'<SegmentTemplate timescale="{r.track.timescale}" initialization="{r.name}/{INIT_NAME}"'
                f' media="{r.name}/seg$Number$.m4s" startNumber="{start}">{timeline}</SegmentTemplate>'
                "</Representation>")

    if video:
        out.append('<AdaptationSet id="0" contentType="video" mimeType="video/mp4" segmentAlignment="true"'
                   ' startWithSAP="1">')
        for r, v in sorted(video, key=lambda rv: -rv[1].bandwidth):
            out.append(representation(r, f'codecs="{v.codec}" bandwidth="{v.bandwidth}" width="{v.width}"'
                                          f' height="{v.height}" frameRate="{round(v.frame_rate)}"'))
        out.append("</AdaptationSet>")
    if audio is not None:
        r, a = audio
        out.append('<AdaptationSet id="1" contentType="audio" mimeType="audio/mp4" segmentAlignment="true"'
                   ' startWithSAP="1">')
        out.append(representation(r, f'codecs="{a.codec}" bandwidth="{a.bandwidth}"'
                                     f' audioSamplingRate="{a.sample_rate}"'))
        out.append("</AdaptationSet>")
    out += ["</Period>", "</MPD>"]
    return "\n".join(out) + "\n"
