"""
Egresses of rooms — HLS/DASH streams and recordings — and the manager that starts, follows and ends them.

An :class:`Egress` is a :class:`~chorus.sfu.router.SourceWatcher` of one room's router: the router tells it about
every published source, and it attaches a :class:`~chorus.egress.sink.TrackSink` to the ones it takes (one
participant's first video and audio, every participant's tracks, or all of them for a composite). Sinks only
depacketize on the event loop; encoding (lower rungs, AAC, the composite) happens in the ladder's worker process.

- :class:`HlsEgress` — CMAF segments described by an HLS master playlist and a DASH MPD
  (:class:`~chorus.egress.hls.HlsOutput`), served by the signaling plane's HTTP routes and optionally written to a
  folder. An H.264 publisher is the top rung untouched (the egress asks it for a key frame every segment, and the
  room's publish answers prefer H.264 while such an egress runs); a VP8 publisher is transcoded.
- :class:`RecordEgress` — per-track files without transcoding (:class:`~chorus.egress.recorder.TrackRecorder`), or
  one MP4 of the room composite (:class:`~chorus.egress.recorder.CompositeRecorder`), in the recordings folder.

Lifecycle of an egress: *starting* (its worker starts) → *waiting* (no open room of that name yet, or the room
closed and may reopen within ``room_grace``) ⇄ *active* (attached to the room's router) → *ending* → *ended*
with a ``reason``: ``stopped`` (asked to), ``room_closed`` (the room stayed closed past the grace time),
``failed`` (``error`` says why: ``io_error``, ``worker_failed``, ...), ``shutdown`` (the server is stopping).
Ending always finalizes: playlists get ``EXT-X-ENDLIST``, the MPD turns static, recordings get their index.
A participant who reconnects (same identity) is followed: an HLS stream continues after an
``EXT-X-DISCONTINUITY``, a recording continues in a new file on the same timeline (``chorus_origin``).

The manager tells its owner about ``egress_started`` and ``egress_ended`` through ``emit`` (the signaling plane
turns them into webhooks); it never imports the signaling plane.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chorus.egress.depacketize import AccessUnit
from chorus.egress.errors import EgressError
from chorus.egress.hls import TOP, HlsOutput, HlsSettings
from chorus.egress.ladder import DEFAULT_RUNGS, Composite, EncodedFrame, KeyframeRequester, Ladder, Rung
from chorus.egress.recorder import FORMATS, CompositeRecorder, TrackRecorder
from chorus.egress.recordings import RecordingStore, check_name
from chorus.egress.sink import SETTLE, TrackSink, codec_name
from chorus.sfu.ids import is_safe_name, new_id
from chorus.sfu.logs import PeerLogger
from chorus.sfu.router import Router
from chorus.sfu.source import Source
from chorus.sfu.tasks import Tasks

_log = PeerLogger(logging.getLogger("chorus.egress"))

Kind = Literal["hls", "record"]
#: Maps a participant's peer id to who it is (its identity, else the peer id): what ``participant`` matches.
Identify = Callable[[str], str]
Emit = Callable[[str, dict[str, Any]], None]

CONTAINERS = ("auto", "webm", "mp4", "mkv")
_RUNG_SPEC = re.compile(r"(\d{2,4}):(\d{2,6})")


def parse_rungs(specs: list[str] | tuple[str, ...]) -> tuple[Rung, ...]:
    """``["360:800", "180:250"]`` (height:kbps) → rungs named ``360p``, ``180p``.

    :raises EgressError: ``bad_input``."""
    rungs = []
    for spec in specs:
        m = _RUNG_SPEC.fullmatch(str(spec).strip())
        if m is None or not 16 <= int(m.group(1)) <= 2160 or not 50 <= int(m.group(2)) <= 50_000:
            raise EgressError("bad_input", f"a rung is 'height:kbps' (16-2160, 50-50000), not {spec!r}")
        rungs.append(Rung(f"{int(m.group(1))}p", int(m.group(1)), int(m.group(2)) * 1000))
    if len({r.name for r in rungs}) != len(rungs) or len(rungs) > 6:
        raise EgressError("bad_input", "at most 6 rungs, each height once")
    return tuple(rungs)


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """Server-wide egress settings (from the signaling plane's ``Settings``)."""

    segment: float = 2.0
    part: float = 0.25
    window: int = 6
    rungs: tuple[Rung, ...] = DEFAULT_RUNGS
    top_bitrate: int = 2_500_000
    composite_width: int = 1280
    composite_height: int = 720
    composite_fps: int = 30
    recordings: Path = Path("recordings")
    retention_days: float = 0.0
    output_dir: Path | None = None
    public: bool = False
    max_egresses: int = 8
    worker_nice: int = 10
    room_grace: float = 30.0
    keep_ended: float = 600.0
    settle: float = SETTLE


@dataclass(frozen=True, slots=True)
class EgressRequest:
    """
    What to start (the admin API's JSON body, checked by :meth:`parse`).

    :param participant: one participant's tracks (identity or peer id); ``None``: the whole room.
    :param composite: the room composite (the default for HLS without ``participant``).
    :param public: HLS readable without a token (default: the server's ``egress_public``).
    """

    room: str
    kind: Kind
    participant: str | None = None
    composite: bool = False
    low_latency: bool = False
    segment: float | None = None
    rungs: tuple[Rung, ...] | None = None
    container: str = "auto"
    public: bool | None = None
    audio: Literal["aac", "opus"] = "aac"

    @classmethod
    def parse(cls, data: object) -> EgressRequest:
        """:raises EgressError: ``bad_input`` with what is wrong."""
        if not isinstance(data, dict):
            raise EgressError("bad_input", "the body must be a JSON object")
        known = {"room", "kind", "participant", "composite", "low_latency", "segment", "ladder", "container",
                 "public", "audio"}
        unknown = set(data) - known
        if unknown:
            raise EgressError("bad_input", f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        room = data.get("room")
        if not isinstance(room, str) or not is_safe_name(room):
            raise EgressError("bad_input", "'room' must be a room name (a safe path segment)")
        kind = data.get("kind", "hls")
        if kind not in ("hls", "record"):
            raise EgressError("bad_input", "'kind' must be \"hls\" or \"record\"")
        participant = data.get("participant")
        if participant is not None and (not isinstance(participant, str) or not 0 < len(participant) <= 64):
            raise EgressError("bad_input", "'participant' must be an identity or a peer id")
        flags = {}
        for name in ("composite", "low_latency", "public"):
            value = data.get(name)
            if value is not None and not isinstance(value, bool):
                raise EgressError("bad_input", f"'{name}' must be true or false")
            flags[name] = value
        composite = bool(flags["composite"]) if flags["composite"] is not None else (
            kind == "hls" and participant is None)
        if composite and participant is not None:
            raise EgressError("bad_input", "a composite is of the whole room: no 'participant'")
        if kind == "hls" and participant is None and not composite:
            raise EgressError("bad_input", "HLS of a room is its composite, or one 'participant'")
        segment = data.get("segment")
        if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int | float)
                                    or not 0.5 <= segment <= 10):
            raise EgressError("bad_input", "'segment' must be 0.5-10 seconds")
        ladder = data.get("ladder")
        rungs = None
        if ladder is not None:
            if not isinstance(ladder, list):
                raise EgressError("bad_input", "'ladder' must be a list like [\"360:800\", \"180:250\"]")
            rungs = parse_rungs(ladder)
        container = data.get("container", "auto")
        if container not in CONTAINERS:
            raise EgressError("bad_input", f"'container' must be one of {', '.join(CONTAINERS)}")
        audio = data.get("audio", "aac")
        if audio not in ("aac", "opus") or (audio == "opus" and composite):
            raise EgressError("bad_input", "'audio' is \"aac\", or \"opus\" (passed through) for a participant")
        return cls(room, kind, participant, composite, bool(flags["low_latency"]),
                   float(segment) if segment is not None else None, rungs, container, flags["public"], audio)


def _safe_key(key: str) -> str:
    """A participant key as a file-name part."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", key)[:40]
    return cleaned if cleaned and cleaned[0] != "-" else f"p{cleaned}"


def _extension(codec: str, container: str) -> str:
    if container != "auto":
        suffix = f".{container}"
        return suffix if codec in FORMATS[suffix][1] else ".mkv"
    return ".mp4" if codec == "h264" else ".webm"


@dataclass(slots=True)
class _Selected:
    sink: TrackSink
    keyframes: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Recording:
    sink: TrackSink
    recorder: TrackRecorder
    files: list[Path] = field(default_factory=list)


class Egress:
    """The state every egress shares (see the module docstring). Subclasses say what sinks feed."""

    kind: Kind = "hls"

    def __init__(self, egress_id: str, request: EgressRequest, config: EgressConfig, *,
                 on_failed: Callable[[Egress, EgressError], None], log: PeerLogger) -> None:
        self.id = egress_id
        self.request = request
        self.room = request.room
        self.config = config
        self.state = "starting"
        self.reason: str | None = None
        self.error: EgressError | None = None
        #: Problems that did not end the egress (a track that could not be taken), newest last.
        self.warnings: list[dict[str, str]] = []
        self.started_at = time.time()
        self.ended_at: float | None = None
        #: Unix time of media time 0; a little before the start, so the first units are never before it.
        self.origin = self.started_at - 1.0
        self.router: Router | None = None
        self._identify: Identify = lambda peer_id: peer_id
        self._on_failed = on_failed
        self.log = log.bind(room=request.room, egress=egress_id, kind=self.kind)
        self._tasks = Tasks(f"egress {egress_id}")
        self._started = asyncio.Event()
        #: Set once the egress has ended (its output finalized).
        self.done = asyncio.Event()
        self._stopping = False

    # -- lifecycle

    async def start(self) -> None:
        """Start what runs without a room (the worker). Ends with the state *waiting*."""
        try:
            await self._start()
        finally:
            self._started.set()
        if not self._stopping:
            self.state = "waiting"

    async def _start(self) -> None:
        pass

    def attach(self, router: Router, identify: Identify) -> None:
        """Follow ``router``'s sources (the room opened)."""
        if self._stopping or self.router is router:
            return
        self.router, self._identify = router, identify
        self.state = "active"
        self.log.info("egress attached to the room")
        router.watch(self)

    def detach(self) -> None:
        """Stop following the room (it closed): close every sink, finalize per-track files. Idempotent."""
        router, self.router = self.router, None
        if router is not None:
            router.unwatch(self)
            self._detach_sinks()
            if not self._stopping:
                self.state = "waiting"

    def _detach_sinks(self) -> None:
        pass

    async def stop(self, reason: str, error: EgressError | None = None) -> None:
        """End the egress and finalize its output. Idempotent; waits for a start in progress first."""
        if self._stopping:
            return
        self._stopping = True
        self.state = "ending"
        self.reason = reason
        if error is not None and self.error is None:
            self.error = error
        await self._started.wait()  # a start always ends (its worker is ready, or failed, within its timeout)
        self.detach()
        try:
            await self._finish()
        except EgressError as exc:
            self.error = self.error or exc
            self.log.error("egress could not finish cleanly", code=exc.code, reason=exc.reason)
        await self._tasks.close()
        self.state = "ended"
        self.ended_at = time.time()
        self.done.set()
        self.log.info("egress ended", reason=reason, error=self.error.code if self.error else None,
                       bytes=self.bytes_written)

    async def _finish(self) -> None:
        pass

    def fail(self, error: EgressError) -> None:
        """Something this egress needs broke (disk, worker): end it with reason ``failed``."""
        if self._stopping or self.error is not None:
            return
        self.error = error
        self.log.error("egress failed", code=error.code, reason=error.reason)
        self._on_failed(self, error)

    def warn(self, code: str, reason: str) -> None:
        self.log.warning("egress warning", code=code, reason=reason)
        self.warnings = [*self.warnings[-9:], {"code": code, "reason": reason}]

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    # -- sources (SourceWatcher)

    def wants(self, source: Source) -> bool:
        """Whether ``source`` belongs to what this egress takes."""
        participant = self.request.participant
        return participant is None or participant in (source.peer_id, self._identify(source.peer_id))

    def source_added(self, source: Source) -> None:
        if self._stopping or source.kind not in ("audio", "video"):
            return
        try:
            self._take(source)
        except EgressError as exc:
            self.warn(exc.code, f"track {source.id} of {source.peer_id}: {exc.reason}")

    def source_removed(self, source: Source) -> None:
        """Its sinks learn it themselves (``source_closed``)."""

    def _take(self, source: Source) -> None:
        raise NotImplementedError

    def sink_for(self, source: Source, on_unit: Callable[[AccessUnit], None],
              on_closed: Callable[[TrackSink], None]) -> TrackSink:
        sink = TrackSink(self.id, source, origin=self.origin, on_unit=on_unit, on_closed=on_closed,
                         settle=self.config.settle, log=self.log)
        sink.attach()
        self.log.info("track taken", source=source.id, peer=source.peer_id, kind=source.kind, codec=sink.codec)
        return sink

    # -- description

    @property
    def bytes_written(self) -> int:
        return 0

    def files(self) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        request = self.request
        return {
            "id": self.id, "room": self.room, "kind": self.kind, "state": self.state, "reason": self.reason,
            "error": {"code": self.error.code, "reason": self.error.reason} if self.error else None,
            "warnings": list(self.warnings), "participant": request.participant, "composite": request.composite,
            "started_at": self.started_at, "ended_at": self.ended_at, "bytes": self.bytes_written,
            "files": self.files(),
        }


class _Composer:
    """A composite's inputs: every participant of the room, one index (grid tile, voice) per participant."""

    def __init__(self, egress: Egress, ladder: Ladder) -> None:
        self.egress = egress
        self.ladder = ladder
        self.indexes: dict[str, int] = {}  # participant key → index
        self.sinks: dict[str, tuple[int, TrackSink]] = {}  # source id → (index, sink)

    def take(self, source: Source, identify: Identify) -> None:
        key = identify(source.peer_id)
        index = self.indexes.setdefault(key, len(self.indexes) % 250)
        codec = codec_name(source.codec.mimeType)
        if source.kind == "video":
            def on_unit(unit: AccessUnit) -> None:
                self.ladder.push_video(unit.data, unit.pts, keyframe=unit.keyframe, codec="vp8" if codec == "vp8"
                                       else "h264", source_index=index)
        else:
            def on_unit(unit: AccessUnit) -> None:
                self.ladder.push_audio(unit.data, unit.pts, source_index=index)
        sink = self.egress.sink_for(source, on_unit, self.closed)
        self.sinks[source.id] = (index, sink)

    def closed(self, sink: TrackSink) -> None:
        entry = self.sinks.pop(sink.source.id, None)
        if entry is None:
            return
        index = entry[0]
        if sink.kind == "video" or not any(i == index for i, _ in self.sinks.values()):
            self.ladder.source_ended(index)

    def keyframe_needed(self, index: int) -> None:
        for i, sink in self.sinks.values():
            if i == index and sink.kind == "video":
                sink.source.request_keyframe()

    def close(self) -> None:
        for _, sink in list(self.sinks.values()):
            sink.close()
        self.sinks.clear()


class HlsEgress(Egress):
    """HLS (and DASH) of one participant or of the room composite (see the module docstring)."""

    kind: Kind = "hls"

    def __init__(self, egress_id: str, request: EgressRequest, config: EgressConfig, *,
                 on_failed: Callable[[Egress, EgressError], None], log: PeerLogger) -> None:
        super().__init__(egress_id, request, config, on_failed=on_failed, log=log)
        self.public = config.public if request.public is None else request.public
        segment = request.segment or config.segment
        part = min(config.part, segment / 2) if request.low_latency else None
        rungs = request.rungs if request.rungs is not None else config.rungs
        directory = config.output_dir / request.room / egress_id if config.output_dir is not None else None
        self.settings = HlsSettings(segment=segment, part=part, window=config.window, rungs=rungs,
                                    top_bitrate=config.top_bitrate,
                                    frame_rate=float(config.composite_fps) if request.composite else 30.0,
                                    directory=directory, base_url=f"/hls/{request.room}/{egress_id}/",
                                    audio=request.audio)
        composite = Composite(config.composite_width, config.composite_height, config.composite_fps, segment,
                              self.origin) if request.composite else None
        self.ladder = Ladder(rungs=(Rung(TOP, None, config.top_bitrate), *rungs), composite=composite,
                             on_frame=self._encoded, on_error=self.fail, on_keyframe_needed=self._keyframe_needed,
                             nice=config.worker_nice, log=self.log)
        self.output = HlsOutput(self.settings, origin=self.origin, ladder=self.ladder,
                                mode="composite" if request.composite else None, on_error=self.fail, log=self.log)
        self._composer = _Composer(self, self.ladder) if request.composite else None
        self._selected: dict[str, _Selected] = {}  # kind → the participant's track taken

    @property
    def passes_h264_through(self) -> bool:
        """Whether publishers should be offered H.264 first (a participant's stream, passed through)."""
        return not self.request.composite

    async def _start(self) -> None:
        await self.ladder.start()
        await self.ladder.wait_ready()

    def _encoded(self, frame: EncodedFrame) -> None:
        self.output.encoded(frame)

    def _keyframe_needed(self, index: int) -> None:
        if self._composer is not None:
            self._composer.keyframe_needed(index)
        elif "video" in self._selected:
            self._selected["video"].sink.source.request_keyframe()

    def _take(self, source: Source) -> None:
        if self._composer is not None:
            self._composer.take(source, self._identify)
            return
        if not self.wants(source):
            return
        if source.kind in self._selected:
            self.warn("ignored", f"{source.peer_id} publishes a second {source.kind} track ({source.id}); "
                      "the first one is streamed")
            return
        codec = codec_name(source.codec.mimeType)
        if source.kind == "video":
            def on_unit(unit: AccessUnit) -> None:
                self.output.video_unit(unit, codec)
        else:
            def on_unit(unit: AccessUnit) -> None:
                self.output.audio_unit(unit)
        selected = self._selected[source.kind] = _Selected(self.sink_for(source, on_unit, self._sink_closed))
        if source.kind == "video" and codec == "h264":
            # Source key frames on the segment grid: the cuts of the passed-through top rung.
            requester = KeyframeRequester(source.request_keyframe, self.settings.segment)
            selected.keyframes = self._tasks.spawn(requester.run(), name=f"egress {self.id} key frames")

    def _sink_closed(self, sink: TrackSink) -> None:
        selected = self._selected.get(sink.kind)
        if selected is not None and selected.sink is sink:
            del self._selected[sink.kind]
            if selected.keyframes is not None:
                selected.keyframes.cancel()

    def _detach_sinks(self) -> None:
        if self._composer is not None:
            self._composer.close()
        for selected in list(self._selected.values()):
            selected.sink.close()
            if selected.keyframes is not None:
                selected.keyframes.cancel()
        self._selected.clear()

    async def _finish(self) -> None:
        await self.ladder.close()
        self.output.end()
        if self.output.error is not None and self.error is None:
            self.error = self.output.error

    @property
    def bytes_written(self) -> int:
        return self.output.bytes_written

    def files(self) -> list[str]:
        if self.settings.directory is None:
            return []
        return [str(self.settings.directory / "index.m3u8"), str(self.settings.directory / "index.mpd")]

    def describe(self) -> dict[str, Any]:
        base = f"/hls/{self.room}/{self.id}"
        return {**super().describe(), "public": self.public, "low_latency": self.settings.part is not None,
                "audio": self.settings.audio,
                "segment": self.settings.segment, "mode": self.output.mode,
                "urls": {"hls": f"{base}/index.m3u8", "dash": f"/dash/{self.room}/{self.id}/index.mpd",
                         "live": f"/live?room={self.room}&egress={self.id}"},
                "renditions": self.output.describe(),
                "worker": {"pid": self.ladder.pid, "cpu_percent": {
                    k: round(self.ladder.stats.percent_of_core(k), 2) for k in self.ladder.stats.cpu},
                    "frames_dropped": self.ladder.stats.frames_dropped}}


class RecordEgress(Egress):
    """Recording: per-track files without transcoding, or the room composite as one MP4."""

    kind: Kind = "record"

    def __init__(self, egress_id: str, request: EgressRequest, config: EgressConfig, *, store: RecordingStore,
                 on_failed: Callable[[Egress, EgressError], None], log: PeerLogger) -> None:
        super().__init__(egress_id, request, config, on_failed=on_failed, log=log)
        self.store = store
        self.folder = store.folder_for(request.room, egress_id, self.started_at)
        self._tracks: dict[str, _Recording] = {}  # source id → its sink and file
        self._paths: list[Path] = []
        self._counts: dict[tuple[str, str], int] = {}
        self.ladder: Ladder | None = None
        self._composite: CompositeRecorder | None = None
        self._composer: _Composer | None = None
        if request.composite:
            segment = request.segment or config.segment
            layout = Composite(config.composite_width, config.composite_height, config.composite_fps, segment,
                               self.origin)
            self.ladder = Ladder(rungs=(Rung(TOP, None, config.top_bitrate),), composite=layout,
                                 on_frame=self._encoded, on_error=self.fail, nice=config.worker_nice, log=self.log)
            self._composer = _Composer(self, self.ladder)
            self._composite = CompositeRecorder(self.folder / "composite.mp4", origin=self.origin,
                                                fragment_seconds=0.5, log=self.log)
            self._paths.append(self._composite.path)

    async def _start(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EgressError("io_error", f"cannot create {self.folder}: {exc.strerror}") from exc
        if self.ladder is not None:
            await self.ladder.start()
            await self.ladder.wait_ready()

    def _encoded(self, frame: EncodedFrame) -> None:
        if self._composite is None or self._composite.closed or self.error is not None:
            return
        try:
            if frame.rung == "audio":
                self._composite.write_audio(frame.data, frame.pts)
            else:
                self._composite.write_video(frame.data, frame.pts, frame.keyframe)
        except EgressError as exc:
            self.fail(exc)

    def _take(self, source: Source) -> None:
        if self._composer is not None:
            self._composer.take(source, self._identify)
            return
        if not self.wants(source):
            return
        codec = codec_name(source.codec.mimeType)
        key = _safe_key(self._identify(source.peer_id))
        n = self._counts[(key, source.kind)] = self._counts.get((key, source.kind), 0) + 1
        path = self.folder / f"{key}-{source.kind}-{n}{_extension(codec, self.request.container)}"
        recorder = TrackRecorder(path, codec, origin=self.origin, fragment_seconds=0.5,  # type: ignore[arg-type]
                                 clock_rate=source.codec.clockRate, log=self.log)

        def on_unit(unit: AccessUnit) -> None:
            if recorder.closed or self.error is not None:
                return
            try:
                recorder.write(unit)
            except EgressError as exc:
                self.fail(exc)

        self._paths.append(path)
        self._tracks[source.id] = _Recording(self.sink_for(source, on_unit, self._sink_closed), recorder)

    def _sink_closed(self, sink: TrackSink) -> None:
        track = self._tracks.pop(sink.source.id, None)
        if track is not None:
            self._close_recorder(track.recorder)

    def _close_recorder(self, recorder: TrackRecorder) -> None:
        try:
            recorder.close()
        except EgressError as exc:
            self.fail(exc)

    def _detach_sinks(self) -> None:
        if self._composer is not None:
            self._composer.close()
        for track in list(self._tracks.values()):
            track.sink.close()
            self._close_recorder(track.recorder)
        self._tracks.clear()

    async def _finish(self) -> None:
        if self.ladder is not None:
            await self.ladder.close()
        if self._composite is not None:
            self._composite.close()

    @property
    def bytes_written(self) -> int:
        total = 0
        for path in self._paths:
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def files(self) -> list[str]:
        return [str(p) for p in self._paths if p.exists()]

    def describe(self) -> dict[str, Any]:
        root = self.store.root
        urls = []
        for path in self._paths:
            if path.exists():
                rel = path.relative_to(root) if path.is_relative_to(root) else path
                urls.append(f"/recordings/{rel.as_posix()}")
        return {**super().describe(), "folder": self.folder.name, "recordings": urls}


class EgressManager:
    """
    Every egress of this server (see the module docstring): started, stopped, listed; attached to rooms as they
    open and close; ended ones kept ``keep_ended`` seconds so their files stay served and listed.

    The owner calls :meth:`room_opened` and :meth:`room_closed` as rooms come and go, runs :meth:`run` as a
    background task (retention, forgetting old egresses) and awaits :meth:`close` on shutdown.
    """

    def __init__(self, config: EgressConfig, *, emit: Emit = lambda event, data: None,
                 log: PeerLogger | None = None) -> None:
        self.config = config
        self.store = RecordingStore(config.recordings, retention_days=config.retention_days)
        self.egresses: dict[str, Egress] = {}
        self.closed = False
        #: The node drains: no new egresses; rooms that close will not reopen here.
        self.draining = False
        #: Totals over every egress ever (metrics): started, ended by reason, failures by code.
        self.totals: dict[str, int] = {}
        self._emit = emit
        self._log = log or _log
        self._rooms: dict[str, tuple[Router, Identify]] = {}
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._tasks = Tasks("egress manager")
        self._forgotten_bytes = 0

    # -- rooms

    def room_opened(self, room_id: str, router: Router, identify: Identify) -> None:
        """A room opened: egresses waiting for it attach."""
        self._rooms[room_id] = (router, identify)
        timer = self._grace.pop(room_id, None)
        if timer is not None:
            timer.cancel()
        for egress in self.egresses.values():
            if egress.room == room_id and egress.state == "waiting":
                egress.attach(router, identify)
        self._update_preference(room_id)

    def room_closed(self, room_id: str) -> None:
        """A room closed: its egresses detach and wait ``room_grace`` seconds for it to open again."""
        if self._rooms.pop(room_id, None) is None:
            return
        attached = [e for e in self.egresses.values() if e.room == room_id and not e.ended]
        for egress in attached:
            egress.detach()
        if attached and self.draining:  # it will not reopen on this node
            self._grace_over(room_id)
        elif attached and not self.closed:
            loop = asyncio.get_running_loop()
            self._grace[room_id] = loop.call_later(self.config.room_grace, self._grace_over, room_id)

    def _grace_over(self, room_id: str) -> None:
        self._grace.pop(room_id, None)
        for egress in list(self.egresses.values()):
            if egress.room == room_id and egress.state == "waiting":
                self._spawn_stop(egress, "room_closed")

    def _update_preference(self, room_id: str) -> None:
        room = self._rooms.get(room_id)
        if room is None:
            return
        passes = any(isinstance(e, HlsEgress) and e.passes_h264_through and e.router is room[0]
                     for e in self.egresses.values())
        room[0].preferred_video_codec = "video/H264" if passes else None

    # -- egresses

    async def start(self, request: EgressRequest) -> Egress:
        """
        Start an egress; it attaches at once if the room is open, else when it opens.

        :raises EgressError: ``invalid_state`` (closing, or stopped while starting), ``limit_exceeded``,
            ``io_error``/``worker_failed`` (it could not start).
        """
        if self.closed or self.draining:
            raise EgressError("unavailable", "this server is shutting down and takes no new egress")
        running = [e for e in self.egresses.values() if not e.ended]
        if len(running) >= self.config.max_egresses:
            raise EgressError("limit_exceeded", f"at most {self.config.max_egresses} egresses run at once")
        egress_id = new_id("eg")
        log = self._log
        egress: Egress
        if request.kind == "hls":
            egress = HlsEgress(egress_id, request, self.config, on_failed=self._failed, log=log)
        else:
            egress = RecordEgress(egress_id, request, self.config, store=self.store, on_failed=self._failed,
                                  log=log)
        self.egresses[egress_id] = egress
        self._count("started")
        try:
            await egress.start()
        except (EgressError, OSError) as exc:
            error = exc if isinstance(exc, EgressError) else EgressError("worker_failed", str(exc))
            await egress.stop("failed", error)
            self._ended(egress)
            raise error from None
        if egress.state != "waiting":  # stopped while starting
            raise EgressError("invalid_state", f"egress {egress_id} was stopped while it started")
        room = self._rooms.get(request.room)
        if room is not None:
            egress.attach(*room)
            self._update_preference(request.room)
        egress.log.info("egress started", participant=request.participant, composite=request.composite)
        self._emit("egress_started", {"room": egress.room, "egress": egress.describe()})
        return egress

    async def stop(self, egress_id: str, reason: str = "stopped", error: EgressError | None = None) -> Egress:
        """End an egress (finalized when this returns). Idempotent for an ended one.

        :raises EgressError: ``not_found``."""
        egress = self.get(egress_id)
        if egress.state in ("ending", "ended"):
            await egress.done.wait()
            return egress
        await egress.stop(reason, error)
        self._update_preference(egress.room)
        self._ended(egress)
        return egress

    def _ended(self, egress: Egress) -> None:
        self._count(f"ended_{egress.reason}")
        if egress.error is not None:
            self._count(f"error_{egress.error.code}")
        self._emit("egress_ended", {
            "room": egress.room, "egress": egress.describe(), "reason": egress.reason,
            "error": {"code": egress.error.code, "reason": egress.error.reason} if egress.error else None,
            "files": egress.files()})

    def _failed(self, egress: Egress, error: EgressError) -> None:
        self._spawn_stop(egress, "failed", error)

    def _spawn_stop(self, egress: Egress, reason: str, error: EgressError | None = None) -> None:
        if not self._tasks.closed:
            self._tasks.spawn(self.stop(egress.id, reason, error), name=f"stop egress {egress.id}")

    def _count(self, key: str) -> None:
        self.totals[key] = self.totals.get(key, 0) + 1

    def get(self, egress_id: str) -> Egress:
        """:raises EgressError: ``not_found``."""
        egress = self.egresses.get(egress_id) if isinstance(egress_id, str) else None
        if egress is None:
            raise EgressError("not_found", f"no egress {egress_id!r}")
        return egress

    def find(self, room: str | None = None) -> list[Egress]:
        return [e for e in self.egresses.values() if room is None or e.room == room]

    def hls(self, room: str, egress_id: str | None = None) -> HlsEgress | None:
        """The HLS egress ``egress_id`` of ``room``, or the room's default one: the newest that is not ended,
        else the newest ended one still kept."""
        candidates = [e for e in self.egresses.values() if isinstance(e, HlsEgress) and e.room == room]
        if egress_id is not None:
            return next((e for e in candidates if e.id == egress_id), None)
        live = [e for e in candidates if not e.ended]
        chosen = live or candidates
        return chosen[-1] if chosen else None

    def busy_folders(self) -> set[Path]:
        return {e.folder for e in self.egresses.values() if isinstance(e, RecordEgress) and not e.ended}

    @property
    def bytes_written(self) -> int:
        """Bytes written by every egress so far (forgotten ones included)."""
        return self._forgotten_bytes + sum(e.bytes_written for e in self.egresses.values())

    # -- background and shutdown

    async def run(self, interval: float = 60.0) -> None:
        """Forget egresses ended more than ``keep_ended`` ago; apply the recordings' retention (hourly)."""
        last_sweep = -math.inf
        while True:
            now = time.time()
            for egress in list(self.egresses.values()):
                if egress.ended and egress.ended_at is not None and now - egress.ended_at > self.config.keep_ended:
                    self._forgotten_bytes += egress.bytes_written
                    del self.egresses[egress.id]
            if now - last_sweep >= 3600:
                last_sweep = now
                await asyncio.to_thread(self.store.sweep, now, busy=self.busy_folders())
            await asyncio.sleep(interval)

    def drain(self) -> None:
        """The node drains: refuse new egresses; an egress ends as its room closes (no waiting for it to reopen
        here), one that waits for a room now ends at once (reason ``shutdown``)."""
        if self.draining:
            return
        self.draining = True
        for egress in list(self.egresses.values()):
            if egress.state == "waiting":
                self._spawn_stop(egress, "shutdown")

    async def wait_ended(self, deadline: float) -> None:
        """Return when every egress has ended, or at ``deadline`` (Unix time)."""
        while any(not e.ended for e in self.egresses.values()) and time.time() < deadline:
            await asyncio.sleep(0.1)

    async def close(self, reason: str = "shutdown") -> None:
        """End every egress (playlists get ``EXT-X-ENDLIST``, files are finalized). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()
        await asyncio.gather(*(self.stop(e.id, reason) for e in list(self.egresses.values()) if not e.ended),
                             return_exceptions=True)
        await self._tasks.close()

    def describe(self, room: str | None = None) -> list[dict[str, Any]]:
        return [e.describe() for e in self.find(room)]


__all__ = ["EgressConfig", "EgressManager", "EgressRequest", "HlsEgress", "RecordEgress", "check_name",
           "parse_rungs"]
