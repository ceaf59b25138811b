"""
Server-side mixing for MCU rooms: decoded publisher frames in, streams encoded by the server out.

* :class:`AudioMixer` — every 20 ms it takes 20 ms from each publisher's jitter queue and, for each
  subscriber, sums everyone but that subscriber (N-1), clips to 16 bits and encodes Opus.
* :class:`VideoCompositor` — at a fixed frame rate it scales the latest frame of each publisher into a grid
  and encodes the composite **once** (VP8); the same RTP packets go to every subscriber.

Both outputs are :class:`MixedStream` objects: :class:`~.source.Source` objects like a published track, so each
subscriber connection reuses the SFU's consumer machinery: SSRC/sequence/timestamp rewriting, the NACK cache,
PLI/FIR handling and honest sender reports.

Decoding, mixing and encoding run in the event loop's default executor (a worker thread), one step at a time
per mixer, so the event loop keeps forwarding while the codecs work.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from . import aiortc_adapter as adapter
from .logs import PeerLogger
from .rtp import vp8_is_keyframe_start
from .source import Source
from .tasks import Tasks

logger = logging.getLogger("chorus.sfu.mixer")

#: The pseudo-participant that MCU streams are announced as (``a=msid``, ``offer.consumers[].peer_id``).
MCU_PEER_ID = "mcu"

SAMPLE_RATE = 48000
#: Samples in one mix tick (20 ms at 48 kHz).
FRAME_SAMPLES = 960
PTIME = FRAME_SAMPLES / SAMPLE_RATE
#: A source starts contributing (and restarts after running dry) once this much audio is queued (40 ms).
JITTER_TARGET = 2 * FRAME_SAMPLES
#: A source with more than this queued (120 ms: it arrived in a burst, or its clock runs fast) has its oldest
#: audio dropped back down to :data:`JITTER_TARGET`, so it cannot build up delay.
JITTER_MAX = 6 * FRAME_SAMPLES
#: Opus bit rate of each mix.
AUDIO_BITRATE = 64_000
#: At most one forced keyframe per this many seconds, however many subscribers ask.
KEYFRAME_INTERVAL = 0.5
#: An unchanged composite is not re-encoded, but is sent again at least this often.
IDLE_REFRESH = 1.0
#: A clock that fell more than this many ticks behind skips the missed ticks instead of bursting.
MAX_LATE_TICKS = 5

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=SAMPLE_RATE, channels=2, payloadType=111)
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)


# --- outputs -----------------------------------------------------------------------------------------------


class _Readable(Protocol):
    async def run(self) -> None: ...


S = TypeVar("S", bound=_Readable)


class StreamStats:
    """Counters of one mixed stream."""

    __slots__ = ("frames", "keyframes", "packets", "bytes")

    def __init__(self) -> None:
        self.frames = 0
        self.keyframes = 0
        self.packets = 0
        self.bytes = 0


class MixedStream(Source):
    """
    A stream encoded by the server, sent to its subscribers through Consumers like a forwarded Producer.

    Packets are numbered once here; each Consumer rewrites SSRC, payload type, sequence number and timestamp
    for its own connection, and holds video back until a keyframe start.
    """

    def __init__(self, stream_id: str, kind: str, codec: RTCRtpCodecParameters) -> None:
        super().__init__(stream_id, MCU_PEER_ID, kind, codec)
        self.stats = StreamStats()
        self._seq = random.randint(0, 0xFFFF)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id}, subscribers={self.sink_count})"

    async def send(self, payloads: list[bytes], timestamp: int, keyframe: bool) -> None:
        """Packetize one encoded frame (``payloads``: RTP payloads in order) and send it to every subscriber."""
        if not payloads:
            return
        last = len(payloads) - 1
        packets = []
        for i, payload in enumerate(payloads):
            packets.append(RtpPacket(
                payload_type=self.codec.payloadType or 0,  # the Consumer sets the negotiated one
                marker=int(self.kind == "video" and i == last),  # video: the last packet of a frame
                sequence_number=self._seq,
                timestamp=timestamp & 0xFFFFFFFF,
                payload=payload,
            ))
            self._seq = (self._seq + 1) & 0xFFFF
        self.stats.frames += 1
        self.stats.keyframes += int(keyframe and self.kind == "video")
        self.stats.packets += len(packets)
        self.stats.bytes += sum(len(p) for p in payloads)
        for i, packet in enumerate(packets):
            # Only the first packet of a keyframe starts a decodable picture.
            await self.forward(packet, keyframe and i == 0)


class _Clock:
    """Calls ``tick(n)`` every ``period`` seconds on an absolute schedule (no drift). When it falls more
    than :data:`MAX_LATE_TICKS` behind (a stalled loop), it skips the missed ticks."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.skipped = 0

    async def run(self, tick: Callable[[int], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while True:
            n += 1
            late = loop.time() - (start + n * self.period)
            if late < 0:
                await asyncio.sleep(-late)
            elif late > MAX_LATE_TICKS * self.period:
                missed = int(late / self.period)
                n += missed
                self.skipped += missed
            try:
                await tick(n)
            except Exception:  # one bad tick must not stop the room's media
                logger.error("mixer tick failed", exc_info=True)


# --- audio ---------------------------------------------------------------------------------------------------


def to_mono_s16(frame: av.AudioFrame) -> np.ndarray:
    """The samples of a decoded 48 kHz audio frame as mono int16 (channels averaged)."""
    if frame.format.name not in ("s16", "s16p"):
        raise ValueError(f"expected s16 audio, got {frame.format.name}")
    data: np.ndarray = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if channels == 1:
        return data.reshape(-1).astype(np.int16, copy=False)
    # Packed: one row of interleaved samples; planar: one row per channel.
    per_channel = data.reshape(-1, channels) if not frame.format.is_planar else data.T
    mono: np.ndarray = (per_channel.astype(np.int32).sum(axis=1) // channels).astype(np.int16)
    return mono


def mix_minus_one(contributions: dict[str, np.ndarray], listeners: Iterable[str]) -> dict[str, np.ndarray]:
    """
    For each listener, the sum of every contribution but its own, clipped to int16.

    :param contributions: participant id → that participant's audio for this tick (int32, summed over its
        sources). Summing in int32 and subtracting one's own part before clipping removes it exactly.
    """
    total = np.zeros(FRAME_SAMPLES, np.int32)
    for samples in contributions.values():
        total += samples
    everyone = np.clip(total, -32768, 32767).astype(np.int16)
    mixes = {}
    for listener in listeners:
        own = contributions.get(listener)
        mixes[listener] = everyone if own is None else np.clip(total - own, -32768, 32767).astype(np.int16)
    return mixes


class SourceReaders(Generic[S]):
    """The sources of a mixer by source id, each drained by its own reader task."""

    def __init__(self, kind: str) -> None:
        self.sources: dict[str, S] = {}
        self._kind = kind
        self._tasks = Tasks(f"mcu {kind} sources")
        self._readers: dict[str, asyncio.Task[None]] = {}

    def add(self, source_id: str, source: S) -> None:
        self.sources[source_id] = source
        self._readers[source_id] = self._tasks.spawn(source.run(), name=f"mcu {self._kind} source {source_id}")

    def remove(self, source_id: str) -> None:
        self.sources.pop(source_id, None)
        task = self._readers.pop(source_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        """Stop every reader and wait for them."""
        self._readers.clear()
        await self._tasks.close()


class AudioSource:
    """
    One publisher's decoded audio. A reader task appends to a short jitter queue; the mixer clock takes
    20 ms per tick. The queue is primed to :data:`JITTER_TARGET` before the source is heard, re-primed after
    it runs dry (a late source is simply left out of that tick: the mix never waits), and trimmed when it
    grows past :data:`JITTER_MAX`.
    """

    def __init__(self, producer: Source, track: MediaStreamTrack) -> None:
        self.producer = producer
        self.track = track
        self.underruns = 0
        self.dropped_samples = 0
        self._queue = np.zeros(0, np.int16)
        self._primed = False
        self._resampler: av.AudioResampler | None = None

    def push(self, frame: av.AudioFrame) -> None:
        frames = [frame]
        if frame.sample_rate != SAMPLE_RATE or frame.format.name not in ("s16", "s16p"):
            if self._resampler is None:
                self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            frames = self._resampler.resample(frame)
        queue = np.concatenate([self._queue, *(to_mono_s16(f) for f in frames)])
        if len(queue) > JITTER_MAX:
            drop = len(queue) - JITTER_TARGET
            self.dropped_samples += drop
            queue = queue[drop:]
        self._queue = queue

    def take(self) -> np.ndarray | None:
        """The next 20 ms, or ``None`` when this source has nothing to contribute to this tick."""
        if self.producer.paused:
            self._queue = self._queue[:0]
            self._primed = False
            return None
        if not self._primed:
            if len(self._queue) < JITTER_TARGET:
                return None
            self._primed = True
        if len(self._queue) < FRAME_SAMPLES:
            self._primed = False
            self.underruns += 1
            return None
        chunk, self._queue = self._queue[:FRAME_SAMPLES], self._queue[FRAME_SAMPLES:]
        return chunk

    async def run(self) -> None:
        """Read decoded frames until the track ends."""
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            try:
                self.push(cast(av.AudioFrame, frame))
            except Exception:  # a strange frame must not stop the source
                logger.warning("audio source %s: bad frame", self.producer.id, exc_info=True)


class AudioOutput(MixedStream):
    """One subscriber's N-1 mix: its own Opus encoder, its own RTP stream."""

    def __init__(self, listener: str) -> None:
        super().__init__("mcu-audio", "audio", OPUS)
        self.listener = listener
        self.encoder = adapter.opus_encoder(AUDIO_BITRATE)

    def encode(self, samples: np.ndarray, pts: int) -> list[bytes]:
        """Encode 20 ms of mono int16 (sent as two equal channels, so levels are kept)."""
        frame = av.AudioFrame.from_ndarray(np.repeat(samples, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = pts
        frame.time_base = AUDIO_TIME_BASE
        payloads, _ = self.encoder.encode(frame)
        return payloads


class AudioMixerStats:
    __slots__ = ("ticks", "encodes", "skipped_ticks")

    def __init__(self) -> None:
        self.ticks = 0
        self.encodes = 0
        self.skipped_ticks = 0


class AudioMixer:
    """
    The audio of an MCU room: every participant hears the sum of everyone but themselves.

    Lifecycle: *idle* → :meth:`start` (the 20 ms clock runs) → :meth:`close` (the clock and every source
    reader stop). Sources (publishers' tracks) and outputs (subscribers) come and go at any time; a change
    is heard from the next tick.
    """

    def __init__(self, *, log: PeerLogger) -> None:
        self._readers: SourceReaders[AudioSource] = SourceReaders("audio")
        self.sources = self._readers.sources
        self.outputs: dict[str, AudioOutput] = {}
        self.stats = AudioMixerStats()
        self._log = log
        self._clock = _Clock(PTIME)
        self._tasks = Tasks("mcu audio clock")

    def add_source(self, producer: Source, track: MediaStreamTrack) -> None:
        self._readers.add(producer.id, AudioSource(producer, track))

    def remove_source(self, producer_id: str) -> None:
        self._readers.remove(producer_id)

    def add_output(self, listener: str) -> AudioOutput:
        """The mix that participant ``listener`` hears (everyone's sources but its own)."""
        output = self.outputs[listener] = AudioOutput(listener)
        return output

    def remove_output(self, listener: str) -> None:
        output = self.outputs.pop(listener, None)
        if output is not None:
            output.close()

    def start(self) -> None:
        if not len(self._tasks) and not self._tasks.closed:
            self._tasks.spawn(self._clock.run(self._tick), name="mcu audio clock")

    async def close(self) -> None:
        await self._tasks.close()
        await self._readers.close()
        for output in self.outputs.values():
            output.close()

    async def _tick(self, n: int) -> None:
        self.stats.ticks += 1
        self.stats.skipped_ticks = self._clock.skipped
        contributions: dict[str, np.ndarray] = {}
        for source in self.sources.values():
            chunk = source.take()  # every source is drained every tick, heard or not
            if chunk is not None:
                own = contributions.setdefault(source.producer.peer_id, np.zeros(FRAME_SAMPLES, np.int32))
                own += chunk
        outputs = [o for o in self.outputs.values() if o.sink_count]
        if not outputs:
            return
        pts = n * FRAME_SAMPLES
        loop = asyncio.get_running_loop()
        try:
            encoded = await loop.run_in_executor(None, self._mix_and_encode, contributions, outputs, pts)
        except Exception:
            self._log.error("audio mix failed", exc_info=True)
            return
        for output, payloads in encoded:
            await output.send(payloads, pts, keyframe=True)

    def _mix_and_encode(
        self, contributions: dict[str, np.ndarray], outputs: list[AudioOutput], pts: int
    ) -> list[tuple[AudioOutput, list[bytes]]]:
        mixes = mix_minus_one(contributions, (o.listener for o in outputs))
        self.stats.encodes += len(outputs)
        return [(o, o.encode(mixes[o.listener], pts)) for o in outputs]


# --- video ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int


def grid(count: int, width: int, height: int) -> list[Rect]:
    """
    Tiles for ``count`` sources on a ``width`` x ``height`` canvas, row by row: 1 → full, 2 → side by side,
    3-4 → 2x2, 5-9 → 3x3, 10-16 → 4x4, and so on. Square grids give every tile the canvas's aspect ratio.
    Sizes and positions are even, as 4:2:0 chroma needs.
    """
    if count <= 0:
        return []
    columns = math.ceil(math.sqrt(count))
    rows = columns if count > 2 else 1
    tile_w = width // columns & ~1
    tile_h = height // rows & ~1
    return [Rect((i % columns) * tile_w, (i // columns) * tile_h, tile_w, tile_h) for i in range(count)]


#: Composite layouts: equal tiles, or the active speaker large above a strip of the others.
LAYOUTS = ("grid", "speaker")


def speaker_layout(count: int, width: int, height: int) -> list[Rect]:
    """
    Tiles for ``count`` sources with the first (the active speaker) large: it takes the canvas above a strip a
    quarter of the height, where the others sit side by side (centred, at most a third of the width each).
    Sizes and positions are even.
    """
    if count <= 1:
        return grid(count, width, height)
    strip = height // 4 & ~1
    others = count - 1
    tile_w = width // max(others, 3) & ~1
    left = (width - tile_w * others) // 2 & ~1
    return [Rect(0, 0, width, height - strip)] + [
        Rect(left + i * tile_w, height - strip, tile_w, strip) for i in range(others)
    ]


def fit(src_width: int, src_height: int, box_width: int, box_height: int) -> tuple[int, int]:
    """The largest even size with the source's aspect ratio that fits in the box (letterboxed)."""
    scale = min(box_width / src_width, box_height / src_height)
    return max(2, int(src_width * scale) & ~1), max(2, int(src_height * scale) & ~1)


def yuv_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Y, U and V planes of an even-sized yuv420p frame as 2-D arrays."""
    w, h = frame.width, frame.height
    flat = frame.to_ndarray().reshape(-1)
    y = flat[: w * h].reshape(h, w)
    u = flat[w * h : w * h * 5 // 4].reshape(h // 2, w // 2)
    v = flat[w * h * 5 // 4 : w * h * 3 // 2].reshape(h // 2, w // 2)
    return y, u, v


class Canvas:
    """A yuv420p picture that tiles are pasted into, reused from frame to frame."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._buffer = np.empty(width * height * 3 // 2, np.uint8)
        luma = width * height
        self.y = self._buffer[:luma].reshape(height, width)
        self.u = self._buffer[luma : luma * 5 // 4].reshape(height // 2, width // 2)
        self.v = self._buffer[luma * 5 // 4 :].reshape(height // 2, width // 2)

    def clear(self) -> None:
        self.y.fill(16)  # video-range black
        self.u.fill(128)
        self.v.fill(128)

    def paste(self, x: int, y: int, planes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        py, pu, pv = planes
        h, w = py.shape
        self.y[y : y + h, x : x + w] = py
        self.u[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2] = pu
        self.v[y // 2 : (y + h) // 2, x // 2 : (x + w) // 2] = pv

    def frame(self) -> av.VideoFrame:
        return av.VideoFrame.from_ndarray(self._buffer.reshape(self.height * 3 // 2, self.width), format="yuv420p")


class VideoSource:
    """One publisher's decoded video: a reader task keeps only the latest frame."""

    def __init__(self, producer: Source, track: MediaStreamTrack, order: tuple[int, int]) -> None:
        self.producer = producer
        self.track = track
        #: Tiles are sorted by this: (the peer's join sequence, the producer's sequence).
        self.order = order
        self.latest: av.VideoFrame | None = None
        #: Incremented with each new frame, so an unchanged tile is not scaled again.
        self.generation = 0

    async def run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            self.latest = cast(av.VideoFrame, frame)
            self.generation += 1


@dataclass
class _Tile:
    generation: int
    size: tuple[int, int]
    planes: tuple[np.ndarray, np.ndarray, np.ndarray]


class VideoCompositor(MixedStream):
    """
    The video of an MCU room: one grid composite of every published video, encoded once per tick and sent,
    packet for packet, to every subscriber.

    Each tick (``fps`` per second) takes the latest frame of each source, in join order (in the ``speaker``
    layout the active speaker's first, shown large, see :func:`speaker_layout`); a tile is
    rescaled only when its source has a new frame or the layout changed, and an unchanged composite is not
    re-encoded (but is re-sent at least every :data:`IDLE_REFRESH` s). A keyframe request from any
    subscriber makes a following composite a keyframe (at most one per :data:`KEYFRAME_INTERVAL`).

    Lifecycle: *idle* → :meth:`start` (the frame clock runs) → :meth:`close`.
    """

    def __init__(self, width: int, height: int, fps: int, *, log: PeerLogger, layout: str = "grid") -> None:
        super().__init__("mcu-video", "video", VP8)
        self.width = width
        self.height = height
        self.fps = fps
        self.layout = layout
        #: The peer shown large in the ``speaker`` layout (the last active speaker).
        self.speaker: str | None = None
        self._readers: SourceReaders[VideoSource] = SourceReaders("video")
        self.sources = self._readers.sources
        self.ticks = 0
        self._log = log
        self._clock = _Clock(1 / fps)
        self._tasks = Tasks("mcu video clock")
        self._start = 0.0
        # Used only inside _compose_and_encode, one call at a time, in the executor.
        self._encoder = Vp8Encoder()
        self._canvas = Canvas(width, height)
        self._tiles: dict[str, _Tile] = {}
        self._keyframe_wanted = False
        self._last_keyframe = -math.inf
        self._last_encode = -math.inf
        self._last_signature: tuple[Any, ...] | None = None

    def add_source(self, producer: Source, track: MediaStreamTrack, order: tuple[int, int]) -> None:
        self._readers.add(producer.id, VideoSource(producer, track, order))

    def remove_source(self, producer_id: str) -> None:
        self._readers.remove(producer_id)

    def request_keyframe(self, layer: int | None = None) -> None:
        self._keyframe_wanted = True

    def set_speaker(self, peer_id: str | None) -> None:
        """Show ``peer_id``'s video large (``speaker`` layout; from the next composite)."""
        self.speaker = peer_id

    def start(self) -> None:
        if not len(self._tasks) and not self._tasks.closed:
            self._start = asyncio.get_running_loop().time()
            self._tasks.spawn(self._clock.run(self._tick), name="mcu video clock")

    async def aclose(self) -> None:
        """Close the stream (subscribers' consumers end) and stop the clock and every source reader."""
        self.close()
        await self._tasks.close()
        await self._readers.close()

    @property
    def skipped_ticks(self) -> int:
        return self._clock.skipped

    async def _tick(self, n: int) -> None:
        self.ticks += 1
        if not self.sink_count:
            return
        now = asyncio.get_running_loop().time()
        sources = sorted(self.sources.values(), key=lambda s: s.order)
        if self.layout == "speaker" and self.speaker is not None:
            sources.sort(key=lambda s: s.producer.peer_id != self.speaker)  # stable: the speaker's first
        tiles = [(s.producer.id, None if s.producer.paused else s.latest, s.generation) for s in sources]
        signature = tuple((i, g if f is not None else -1) for i, f, g in tiles)
        force = self._keyframe_wanted and now - self._last_keyframe >= KEYFRAME_INTERVAL
        if signature == self._last_signature and not force and now - self._last_encode < IDLE_REFRESH:
            return
        if force:
            self._keyframe_wanted = False
        pts = int((now - self._start) * 90000)
        loop = asyncio.get_running_loop()
        try:
            payloads = await loop.run_in_executor(None, self._compose_and_encode, tiles, pts, force)
        except Exception:
            self._log.error("video composite failed", exc_info=True)
            return
        self._last_signature = signature
        self._last_encode = now
        keyframe = bool(payloads) and vp8_is_keyframe_start(payloads[0])
        if keyframe:
            self._last_keyframe = now
        await self.send(payloads, pts, keyframe)

    def compose(self, tiles: list[tuple[str, av.VideoFrame | None, int]]) -> av.VideoFrame:
        """The grid picture of ``tiles`` (id, latest frame or None for a black tile, generation)."""
        canvas = self._canvas
        canvas.clear()
        rects = (speaker_layout if self.layout == "speaker" else grid)(len(tiles), self.width, self.height)
        for rect, (source_id, frame, generation) in zip(rects, tiles, strict=True):
            if frame is None:
                continue
            size = fit(frame.width, frame.height, rect.width, rect.height)
            tile = self._tiles.get(source_id)
            if tile is None or tile.generation != generation or tile.size != size:
                scaled = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                tile = self._tiles[source_id] = _Tile(generation, size, yuv_planes(scaled))
            x = rect.x + ((rect.width - size[0]) // 2 & ~1)
            y = rect.y + ((rect.height - size[1]) // 2 & ~1)
            canvas.paste(x, y, tile.planes)
        for gone in self._tiles.keys() - {t[0] for t in tiles}:
            del self._tiles[gone]
        return canvas.frame()

    def _compose_and_encode(
        self, tiles: list[tuple[str, av.VideoFrame | None, int]], pts: int, keyframe: bool
    ) -> list[bytes]:
        frame = self.compose(tiles)
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        payloads, _ = self._encoder.encode(frame, keyframe)
        return payloads
