"""
The bitrate ladder: lower-quality H.264 rungs (and AAC audio) made in a worker process.

The top rung of an H.264 source is the publisher's own stream, passed through untouched (the caller feeds it to
its :class:`~chorus.egress.fmp4.Fragmenter` directly); only the lower rungs are encoded. A VP8 source cannot go
into HLS, so it is decoded once and *every* rung, the top one at the source size included, is encoded. A room
composite (:class:`Composite`) decodes every participant's video and audio, lays the pictures out in the MCU's
grid and mixes the sound as an MCU room does (the very functions of :mod:`chorus.sfu.mixer`), then encodes every
rung from the composite picture.

Where the work happens: a child process (``python -P -m chorus.egress.ladder``) started with
``asyncio.create_subprocess_exec`` receives encoded access units on its stdin and writes encoded rungs to its
stdout. The event loop only copies bytes into a non-blocking pipe (asyncio's transport buffers them), so the
forwarding loop never decodes or encodes; a worker that falls behind makes :meth:`Ladder.push_video` drop input
up to the next key frame instead of growing a backlog. A crash of the worker is reported, never inherited. The
worker lowers its own scheduling priority (``nice``) so that, on a busy machine, forwarding wins the CPU.

Key frames are aligned across rungs: every rung gets an IDR at exactly the pts where the source has a key
frame (H.264 source) or where the caller marks a segment boundary (``force_keyframe``; a VP8 source's key
frames are only needed to decode). The caller asks the publisher for a key frame once per segment length
(:class:`KeyframeRequester` is that hook), so source key frames, rung IDRs and segment cuts share their pts. A
composite puts an IDR on every rung at each multiple of its segment length.

Audio: Opus packets are decoded and re-encoded as AAC-LC (FFmpeg's native ``aac``, its ``fast`` coder; mono for a
mono stream, as a call's microphone is, stereo otherwise), because Safari and MPEG-TS players need AAC; output
pts stay on the 48 kHz input clock, so A/V sync is the source's.

Wire format (big-endian): parent → worker ``>IQBB`` (payload length, pts, flags, source index) + payload;
worker → parent ``>IQBB`` (length, pts, rung index or 254 = audio or 255 = stats JSON, key frame flag) + payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import math
import os
import select
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Literal

from chorus.egress.errors import EgressError
from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

_log = PeerLogger(logging.getLogger("chorus.egress.ladder"))

_IN = struct.Struct(">IQBB")
_OUT = struct.Struct(">IQBB")
_KEY = 0x01  # input: force an IDR on every rung at this pts (source key frame or segment boundary)
_AUDIO = 0x02  # input: an Opus packet
_END = 0x04  # input: flush and exit
_VP8 = 0x08  # input: the video frame is VP8 (else H.264)
_GONE = 0x10  # input: composite source ``index`` ended
_TOP = 0x20  # input: encode the rungs at the source size too (an H.264 frame whose top rung is not passed through)
AUDIO_INDEX = 254
STATS_INDEX = 255
VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000
AAC_BITRATE = 96_000
#: Opus packets are handed to the worker at most this late (seconds), in batches (see :meth:`Ladder.push_audio`).
AUDIO_BATCH = 0.06


def aac_bitrate(channels: int) -> int:
    """The AAC bit rate for a stream of ``channels``: 96 kbit/s stereo, 64 kbit/s mono."""
    return AAC_BITRATE if channels == 2 else 64_000


def opus_channels(packet: bytes) -> int:
    """1 or 2: the stereo flag of an Opus packet's TOC byte (RFC 6716 §3.1). A call's microphone is mono."""
    return 2 if packet and packet[0] & 0x04 else 1

Codec = Literal["h264", "vp8"]


@dataclass(frozen=True, slots=True)
class Rung:
    """
    One encoded quality. ``height`` ``None`` means the source's size (the top rung of a VP8 source, or of a
    composite); the width follows the source's aspect ratio, rounded to an even number. Lower rungs keep their
    configured size whatever the source's current size, so the ladder does not change shape when a WebRTC
    publisher adapts its resolution.
    """

    name: str
    height: int | None
    bitrate: int

    def size(self, source_width: int, source_height: int) -> tuple[int, int]:
        if self.height is None:
            return source_width & ~1, source_height & ~1
        width = round(source_width * self.height / source_height / 2) * 2
        return max(2, width), max(2, self.height & ~1)


#: The default lower rungs (issue 13): 360p and 180p.
DEFAULT_RUNGS = (Rung("360p", 360, 800_000), Rung("180p", 180, 250_000))


@dataclass(frozen=True, slots=True)
class Composite:
    """
    A room composite made in the worker: ``width`` x ``height`` at ``fps``, an IDR every ``segment`` seconds.

    :param origin: Unix time of pts 0 of the inputs (the egress timeline); the worker emits the picture of time
        ``t`` at wall time ``origin + t + delay``, so inputs that arrive up to ``delay`` late still make it.
    """

    width: int
    height: int
    fps: int
    segment: float
    origin: float
    delay: float = 0.25


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """
    An encoded output: an H.264 Annex B access unit of rung ``rung`` (SPS/PPS repeated before each IDR), or an
    AAC-LC raw frame (``rung`` is ``"audio"``). ``pts`` is on the input's clock (90 kHz video, 48 kHz audio).
    """

    rung: str
    data: bytes
    pts: int
    keyframe: bool


@dataclass(slots=True)
class LadderStats:
    """CPU seconds the worker spent per stage (``decode``, each rung, ``audio``) and media seconds fed in."""

    cpu: dict[str, float] = field(default_factory=dict)
    video_seconds: float = 0.0
    frames_in: int = 0
    frames_dropped: int = 0

    def percent_of_core(self, stage: str) -> float:
        """CPU of ``stage`` as a percentage of one core while the input plays in real time."""
        return 100.0 * self.cpu.get(stage, 0.0) / self.video_seconds if self.video_seconds else 0.0


class Ladder:
    """
    Encodes the rungs of one video source (or of a room composite) and its audio as AAC, in a worker process.

    Lifecycle: *new* → *running* (:meth:`start`) → *closed* (:meth:`close`: input ended, the worker flushed its
    encoders, every output delivered, the process reaped). If the worker dies, ``error`` is set
    (``worker_failed``), input is refused and ``on_error`` is called once.

    :param source: the publisher's codec, ``"h264"`` (top rung passes through) or ``"vp8"``; each
        :meth:`push_video` may name another (a publisher who reconnected with another codec).
    :param rungs: encoded rungs (for VP8 put a ``Rung("720p", None, ...)`` first to get a top rung); empty when
        only audio is needed (an H.264 source passed through without lower rungs).
    :param composite: make a room composite of every source instead (``source_index`` of each input).
    :param on_frame: called on the event loop for each encoded output, in order per rung.
    :param on_keyframe_needed: called with a source index whose input was dropped (backlog): it needs a key frame.
    :param max_backlog: bytes queued towards the worker before input is dropped (up to the next key frame).
    :param nice: added to the worker's scheduling niceness (0: as the server).
    """

    def __init__(self, *, source: Codec = "h264", on_frame: Callable[[EncodedFrame], None],
                 rungs: tuple[Rung, ...] = DEFAULT_RUNGS, frame_rate: float = 30.0, audio: bool = True,
                 composite: Composite | None = None, on_error: Callable[[EgressError], None] | None = None,
                 on_keyframe_needed: Callable[[int], None] | None = None, max_backlog: int = 4 << 20,
                 nice: int = 0, log: PeerLogger | None = None) -> None:
        if source not in ("h264", "vp8"):
            raise EgressError("unsupported_codec", f"the ladder decodes h264 or vp8, not {source}")
        if len({r.name for r in rungs}) != len(rungs) or len(rungs) >= AUDIO_INDEX:
            raise EgressError("bad_input", "rungs need distinct names")
        if not rungs and not audio:
            raise EgressError("bad_input", "a ladder without rungs must at least encode the audio")
        if composite is not None and (not rungs or rungs[0].height is not None):
            raise EgressError("bad_input", "a composite's first rung is the composite itself (height None)")
        self.source = source
        self.rungs = rungs
        self.frame_rate = float(composite.fps) if composite is not None else frame_rate
        self.audio = audio
        self.composite = composite
        self.nice = nice
        self.stats = LadderStats()
        self.error: EgressError | None = None
        self._on_frame = on_frame
        self._on_error = on_error
        self._on_keyframe_needed = on_keyframe_needed
        self._max_backlog = max_backlog
        self._log = (log or _log).bind(source=source if composite is None else "composite",
                                       rungs=",".join(r.name for r in rungs))
        self._tasks = Tasks("egress ladder")
        self._process: asyncio.subprocess.Process | None = None
        self._skipping: set[int] = set()  # source indexes dropping input until their next key frame
        self._started_sources: set[int] = set()
        self._closing = False
        self._done = asyncio.Event()
        self._audio_batch = bytearray()
        self._audio_flush: asyncio.TimerHandle | None = None
        self._ready = asyncio.Event()  # set at the worker's first report, or when it ended
        self._reported = False

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self.error is None and not self._closing

    async def start(self) -> None:
        """Start the worker process. :raises EgressError: ``invalid_state`` if started before."""
        if self._process is not None or self._closing:
            raise EgressError("invalid_state", "ladder already started")
        config = {"source": self.source, "frame_rate": self.frame_rate, "nice": self.nice,
                  "rungs": [[r.name, r.height, r.bitrate] for r in self.rungs],
                  "composite": asdict(self.composite) if self.composite is not None else None}
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "chorus.egress.ladder", json.dumps(config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._tasks.spawn(self._read(), name="egress ladder: read worker output")
        self._log.info("ladder worker started", pid=self._process.pid)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the worker has loaded its codecs and reads input (its first report).

        :raises EgressError: ``worker_failed`` if it died or did not get ready within ``timeout``."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            pass
        if not self._reported:
            raise self.error or EgressError("worker_failed", "the ladder worker did not start")

    def _backlog_full(self, keyframe: bool, index: int) -> bool:
        """Whether to drop this input (worker behind): from when the backlog is full until ``index``'s next key
        frame arrives with the backlog back under half."""
        assert self._process is not None and self._process.stdin is not None
        size = self._process.stdin.transport.get_write_buffer_size()
        if size > self._max_backlog and index not in self._skipping:
            if not self._skipping:
                self._log.warning("ladder worker behind: dropping input until the next key frame")
            self._skipping.add(index)
            if self._on_keyframe_needed is not None:
                self._on_keyframe_needed(index)
        if index in self._skipping:
            if not (keyframe and size <= self._max_backlog // 2):
                return True
            self._skipping.discard(index)
        return False

    def push_video(self, data: bytes, pts: int, *, keyframe: bool, force_keyframe: bool = False,
                   codec: Codec | None = None, source_index: int = 0, encode_top: bool | None = None) -> bool:
        """
        Queue one source access unit (H.264 Annex B or a VP8 frame) with its 90 kHz pts.

        :param keyframe: the source frame is a key frame (an H.264 IDR: every rung gets an IDR here too).
        :param force_keyframe: make every rung an IDR here anyway (a segment boundary of a VP8 source).
        :param codec: the frame's codec, when not the ladder's ``source``.
        :param source_index: which participant, in a composite.
        :param encode_top: encode the rungs at the source size (default: unless the frame is H.264, whose top rung
            passes through); with it, IDRs go where ``force_keyframe`` says, as for VP8.
        :returns: ``False`` if it was dropped (worker behind, failed or closed).
        """
        if not self.running:
            return False
        if self._backlog_full(keyframe, source_index):
            self.stats.frames_dropped += 1
            return False
        codec = codec or self.source
        first = source_index not in self._started_sources
        self._started_sources.add(source_index)
        top = codec != "h264" if encode_top is None else encode_top
        force = (force_keyframe or first if top else keyframe) and self.composite is None
        self._write(data, pts, (_KEY if force else 0) | (_VP8 if codec == "vp8" else 0) | (_TOP if top else 0),
                    source_index)
        self.stats.frames_in += 1
        return True

    def push_audio(self, data: bytes, pts: int, source_index: int = 0) -> bool:
        """
        Queue one Opus packet with its 48 kHz pts. Audio is handed to the worker in batches of up to
        :data:`AUDIO_BATCH` seconds (or with the next video frame): a third of the wake-ups for both processes, for
        at most that much delay. :returns: ``False`` if dropped.
        """
        if not self.running or not self.audio:
            return False
        self._audio_batch += _IN.pack(len(data), max(0, pts), _AUDIO, source_index) + data
        if self._audio_flush is None:
            self._audio_flush = asyncio.get_running_loop().call_later(AUDIO_BATCH, self._flush_audio)
        return True

    def _flush_audio(self) -> None:
        if self._audio_flush is not None:
            self._audio_flush.cancel()
            self._audio_flush = None
        if self._audio_batch and self.running:
            batch, self._audio_batch = bytes(self._audio_batch), bytearray()
            self._send(batch)

    def source_ended(self, source_index: int) -> None:
        """A composite's participant (video or audio of ``source_index``) ended: its tile and voice go."""
        if self.running:
            self._started_sources.discard(source_index)
            self._skipping.discard(source_index)
            self._write(b"", 0, _GONE, source_index)

    def _write(self, data: bytes, pts: int, flags: int, index: int) -> None:
        self._flush_audio()  # in order
        self._send(_IN.pack(len(data), max(0, pts), flags, index) + data)

    def _send(self, message: bytes) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(message)
        except (ConnectionError, RuntimeError) as exc:
            self._fail(f"cannot write to the ladder worker: {exc}")

    async def close(self, timeout: float = 10.0) -> None:
        """
        End the input, let the worker flush its encoders, deliver the last outputs, reap the process.
        Idempotent. A worker that does not finish within ``timeout`` is killed.
        """
        process = self._process
        self._flush_audio()
        if process is None or self._closing:
            self._closing = True
            await self._tasks.close()
            return
        self._closing = True
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            if self.error is None and process.stdin is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    process.stdin.write(_IN.pack(0, 0, _END, 0))
                    await asyncio.wait_for(process.stdin.drain(), timeout)
                    process.stdin.close()
            left = max(0.1, deadline - asyncio.get_running_loop().time())
            await asyncio.wait_for(self._done.wait(), left)
            await asyncio.wait_for(process.wait(), max(0.1, deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            # Behind by more than ``timeout`` (a backlog on a busy machine): what it still holds is lost.
            self._log.warning("ladder worker did not finish: killing it", pid=process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await self._tasks.close()
        self._log.info("ladder worker ended", returncode=process.returncode,
                       cpu={k: round(v, 3) for k, v in self.stats.cpu.items()})

    async def _read(self) -> None:
        """Deliver the worker's outputs: read what is there (a burst of outputs in one go), parse every complete
        message."""
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        names = [r.name for r in self.rungs]
        buffer = bytearray()
        try:
            while chunk := await stdout.read(1 << 18):
                buffer += chunk
                offset = 0
                while len(buffer) - offset >= _OUT.size:
                    length, pts, index, key = _OUT.unpack_from(buffer, offset)
                    end = offset + _OUT.size + length
                    if end > len(buffer):
                        break
                    payload = bytes(buffer[offset + _OUT.size:end])
                    offset = end
                    self._reported = True
                    self._ready.set()
                    if index == STATS_INDEX:
                        report = json.loads(payload)
                        self.stats.cpu = report["cpu"]
                        self.stats.video_seconds = report["video_seconds"]
                    elif index == AUDIO_INDEX:
                        self._on_frame(EncodedFrame("audio", payload, pts, True))
                    elif index < len(names):
                        self._on_frame(EncodedFrame(names[index], payload, pts, bool(key)))
                del buffer[:offset]
        finally:
            self._done.set()
            self._ready.set()
        code = await self._process.wait()
        if code != 0 or not self._closing:
            self._fail(f"ladder worker exited with {code}")

    def _fail(self, reason: str) -> None:
        if self.error is not None:
            return
        self.error = EgressError("worker_failed", reason)
        self._log.error("ladder worker failed", reason=reason)
        if self._on_error is not None:
            self._on_error(self.error)


class KeyframeRequester:
    """
    The hook that keeps source key frames on the segment grid: calls ``request`` (the producer's
    ``request_keyframe``, which sends a PLI) every ``interval`` seconds, run as a task of its owner.
    """

    def __init__(self, request: Callable[[], None], interval: float) -> None:
        self.request = request
        self.interval = interval
        self.requests = 0

    async def run(self) -> None:
        while True:
            self.request()
            self.requests += 1
            await asyncio.sleep(self.interval)


# -- the worker process


class _Rungs:
    """The rungs' H.264 encoders, made at the first picture's size; IDRs only where forced."""

    def __init__(self, av: Any, rungs: list[Rung], frame_rate: float, emit: Callable[[int, int, bool, bytes], None],
                 clock: Callable[[str, float], float]) -> None:
        self.av = av
        self.rungs = rungs
        self.frame_rate = frame_rate
        self.emit = emit
        self.clock = clock
        self.encoders: list[Any] = []

    def encode(self, frame: Any, pts: int, force: bool, t: float, top: bool = True) -> None:
        """Encode ``frame`` on every rung; ``top`` false skips the rungs at the source size (``height`` None: an
        H.264 source's top rung passes through)."""
        av = self.av
        if not self.encoders:
            for rung in self.rungs:
                width, height = rung.size(frame.width, frame.height)
                enc = av.CodecContext.create("libx264", "w")
                enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
                enc.time_base = fractions.Fraction(1, VIDEO_CLOCK)
                enc.framerate = fractions.Fraction(round(self.frame_rate * 1000), 1000)
                enc.bit_rate = rung.bitrate
                enc.thread_count = 1
                # IDRs only where forced (aligned on the source); the long GOP is a safety net.
                enc.gop_size = max(1, math.ceil(self.frame_rate * 10))
                enc.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
                               "forced-idr": "1", "bf": "0", "sc_threshold": "0",
                               "rc-lookahead": "0", "vbv-maxrate": str(rung.bitrate // 1000 * 3 // 2),
                               "vbv-bufsize": str(rung.bitrate // 1000)}
                self.encoders.append(enc)
        for index, enc in enumerate(self.encoders):
            if not top and self.rungs[index].height is None:
                continue
            if (frame.width, frame.height, frame.format.name) == (enc.width, enc.height, "yuv420p"):
                scaled = frame
            else:
                scaled = frame.reformat(width=enc.width, height=enc.height, format="yuv420p")
            scaled.pts = pts
            scaled.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            scaled.pict_type = av.video.frame.PictureType.I if force else av.video.frame.PictureType.NONE
            for p in enc.encode(scaled):
                self.emit(index, int(p.pts), bool(p.is_keyframe), bytes(p))
            t = self.clock(self.rungs[index].name, t)

    def flush(self) -> None:
        for index, enc in enumerate(self.encoders):
            for p in enc.encode(None):
                self.emit(index, int(p.pts), bool(p.is_keyframe), bytes(p))


class _Aac:
    """Decoded PCM (any layout) → AAC-LC 48 kHz with ``channels`` (1 or 2), 1024-sample frames on the input's
    clock."""

    def __init__(self, av: Any, emit: Callable[[int, int, bool, bytes], None], channels: int = 2) -> None:
        self.av = av
        self.emit = emit
        layout = "stereo" if channels == 2 else "mono"
        self.encoder = av.CodecContext.create("aac", "w")
        self.encoder.sample_rate = AUDIO_CLOCK
        self.encoder.layout = layout
        self.encoder.format = "fltp"
        self.encoder.bit_rate = aac_bitrate(channels)
        self.encoder.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        # FFmpeg's default "twoloop" coder costs ~6x the "fast" one (measured: 7 % vs 1.2 % of a core for a
        # stereo 96 kbit/s stream here), for a difference speech and a call's sound do not need.
        self.encoder.options = {"aac_coder": "fast"}
        self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=AUDIO_CLOCK)
        self.fifo = av.AudioFifo()
        self.fifo_pts = 0
        self.next: int | None = None

    def write(self, frame: Any, pts: int) -> None:
        """``frame`` starts at ``pts`` (48 kHz). A gap (DTX, loss) restarts the FIFO, dropping < 1024 samples."""
        frame.pts = None
        for out in self.resampler.resample(frame):
            if self.next is None or pts != self.next:
                self.fifo = self.av.AudioFifo()
                self.fifo_pts = pts
            out.pts = None
            self.fifo.write(out)
            pts += out.samples
            self.next = pts
        self.drain(False)

    def drain(self, final: bool) -> None:
        while self.fifo.samples >= 1024 or (final and self.fifo.samples):
            frame = self.fifo.read(1024) if self.fifo.samples >= 1024 else self.fifo.read()
            frame.pts = self.fifo_pts
            frame.time_base = fractions.Fraction(1, AUDIO_CLOCK)
            self.fifo_pts += frame.samples
            for p in self.encoder.encode(frame):
                self.emit(AUDIO_INDEX, int(p.pts), True, bytes(p))
        if final:
            for p in self.encoder.encode(None):
                self.emit(AUDIO_INDEX, int(p.pts), True, bytes(p))


class _Worker:
    """Decode once, scale and encode per rung; Opus → AAC. Runs in the child process, blocking I/O."""

    def __init__(self, config: dict[str, Any], out: BinaryIO) -> None:
        import av  # noqa: PLC0415 (the parent never needs FFmpeg codecs for this)

        self.av = av
        self.out = out
        self.frame_rate = float(config["frame_rate"])
        self.cpu: dict[str, float] = {}
        self.rungs = _Rungs(av, [Rung(n, h, b) for n, h, b in config["rungs"]], self.frame_rate, self._emit,
                            self._clock)
        self.decoder: Any = None
        self.decoder_codec = ""
        self.audio_decoder: Any = None
        self.aac: _Aac | None = None
        self.forced: set[int] = set()
        self.top = False  # the last frame's rungs at the source size were encoded too
        self.first_pts: int | None = None
        self.last_pts = 0

    def _clock(self, stage: str, since: float) -> float:
        now = time.process_time()
        self.cpu[stage] = self.cpu.get(stage, 0.0) + now - since
        return now

    def _emit(self, index: int, pts: int, key: bool, data: bytes) -> None:
        self.out.write(_OUT.pack(len(data), max(0, pts), index, int(key)) + data)

    def media_seconds(self) -> float:
        if self.first_pts is None:
            return 0.0
        return (self.last_pts - self.first_pts) / VIDEO_CLOCK + 1 / self.frame_rate

    def stats(self) -> None:
        self._emit(STATS_INDEX, 0, False, json.dumps({"cpu": self.cpu, "video_seconds": self.media_seconds()}).encode())
        self.out.flush()

    def _decode_video(self, codec: str, data: bytes, pts: int) -> list[Any]:
        av = self.av
        if self.decoder is None or self.decoder_codec != codec:
            self.decoder = av.CodecContext.create(codec, "r")
            self.decoder.thread_count = 1  # no frame-threading delay: one frame in, one frame out
            self.decoder_codec = codec
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        try:
            return list(self.decoder.decode(packet))
        except av.error.FFmpegError:
            return []

    def video(self, data: bytes, pts: int, force: bool, codec: str, index: int = 0, top: bool = False) -> None:
        t = time.process_time()
        if force:
            self.forced.add(pts)
        frames = self._decode_video(codec, data, pts)
        t = self._clock("decode", t)
        if self.first_pts is None:
            self.first_pts = pts
        self.last_pts = max(self.last_pts, pts)
        for frame in frames:
            frame_pts = int(frame.pts)
            force_here = frame_pts in self.forced
            self.forced.discard(frame_pts)
            self.rungs.encode(frame, frame_pts, force_here, t, top=top)
            self.top = top
            t = time.process_time()

    def _decode_audio(self, decoder: Any, data: bytes, pts: int) -> list[Any]:
        av = self.av
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        try:
            return list(decoder.decode(packet))
        except av.error.FFmpegError:
            return []

    def audio(self, data: bytes, pts: int, index: int = 0) -> None:
        t = time.process_time()
        if self.audio_decoder is None:
            # As many channels as the stream's first packet says (the parent reads the same packet).
            channels = opus_channels(data)
            self.audio_decoder = self.av.CodecContext.create("libopus", "r")
            self.audio_decoder.sample_rate = AUDIO_CLOCK
            self.audio_decoder.layout = "stereo" if channels == 2 else "mono"
            self.aac = _Aac(self.av, self._emit, channels)
        assert self.aac is not None
        for frame in self._decode_audio(self.audio_decoder, data, pts):
            samples = frame.samples
            self.aac.write(frame, pts)
            pts += samples
        self._clock("audio", t)

    def finish(self) -> None:
        t = time.process_time()
        if self.decoder is not None:
            try:
                for frame in self.decoder.decode(None):
                    self.rungs.encode(frame, int(frame.pts), False, t, top=self.top)
            except self.av.error.FFmpegError:
                pass
        self.rungs.flush()
        if self.aac is not None:
            self.aac.drain(True)


class _CompositeSource:
    """One participant in the composite worker: its video decoder and recent pictures, its audio decoder."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.decoder: Any = None
        self.codec = ""
        self.frames: deque[tuple[int, Any]] = deque(maxlen=30)  # (pts, decoded picture)
        self.audio_decoder: Any = None
        self.resampler: Any = None
        self.generation = 0


class _CompositeWorker(_Worker):
    """
    The room composite: a grid of the latest picture of each participant (as of the output time) and the sum of
    everyone's audio, both on the egress timeline, emitted ``delay`` after real time so late inputs are in.
    """

    def __init__(self, config: dict[str, Any], out: BinaryIO) -> None:
        super().__init__(config, out)
        from chorus.sfu.mixer import Canvas  # noqa: PLC0415 (only the worker needs numpy and the mixer)

        c = config["composite"]
        self.layout = Composite(**c)
        self.canvas = Canvas(self.layout.width, self.layout.height)
        self.sources: dict[int, _CompositeSource] = {}
        self.tiles: dict[int, tuple[int, tuple[int, int], Any]] = {}  # index → (generation, size, planes)
        self.tick = 0
        self.segment_ticks = round(self.layout.segment * VIDEO_CLOCK)
        self.last_segment = -1
        # Audio: 20 ms chunks of each source on the timeline, mixed once the chunk is due.
        self.chunks: dict[int, dict[int, Any]] = {}
        self.next_chunk: int | None = None
        self.mix = _Aac(self.av, self._emit)
        # Start at the present: the timeline's past is not made up.
        self.tick = max(0, math.ceil(self._now(VIDEO_CLOCK) * self.layout.fps / VIDEO_CLOCK))

    def _now(self, clock: int) -> float:
        """Timeline position (in ``clock`` ticks) that is due now."""
        return (time.time() - self.layout.origin - self.layout.delay) * clock

    def _source(self, index: int) -> _CompositeSource:
        source = self.sources.get(index)
        if source is None:
            source = self.sources[index] = _CompositeSource(index)
        return source

    def gone(self, index: int) -> None:
        self.sources.pop(index, None)
        self.tiles.pop(index, None)

    def video(self, data: bytes, pts: int, force: bool, codec: str, index: int = 0, top: bool = True) -> None:
        t = time.process_time()
        source = self._source(index)
        if source.decoder is None or source.codec != codec:
            source.decoder = self.av.CodecContext.create(codec, "r")
            source.decoder.thread_count = 1
            source.codec = codec
        packet = self.av.Packet(data)
        packet.pts = packet.dts = pts
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        try:
            for frame in source.decoder.decode(packet):
                source.frames.append((int(frame.pts), frame))
        except self.av.error.FFmpegError:
            pass
        self._clock("decode", t)

    def audio(self, data: bytes, pts: int, index: int = 0) -> None:
        import numpy as np  # noqa: PLC0415

        from chorus.sfu.mixer import FRAME_SAMPLES, to_mono_s16  # noqa: PLC0415

        t = time.process_time()
        source = self._source(index)
        if source.audio_decoder is None:
            source.audio_decoder = self.av.CodecContext.create("libopus", "r")
            source.audio_decoder.sample_rate = AUDIO_CLOCK
            source.resampler = self.av.AudioResampler(format="s16", layout="mono", rate=AUDIO_CLOCK)
        for decoded in self._decode_audio(source.audio_decoder, data, pts):
            for frame in source.resampler.resample(decoded):
                samples = to_mono_s16(frame).astype(np.int32)
                position = pts
                pts += len(samples)
                first = self.next_chunk if self.next_chunk is not None else 0
                while len(samples):
                    chunk, offset = divmod(position, FRAME_SAMPLES)
                    take = min(len(samples), FRAME_SAMPLES - offset)
                    if chunk >= first:
                        own = self.chunks.setdefault(chunk, {}).setdefault(
                            index, np.zeros(FRAME_SAMPLES, np.int32))
                        own[offset:offset + take] += samples[:take]
                    samples = samples[take:]
                    position += take
        self._clock("audio", t)

    def due(self) -> float:
        """Seconds until the next video tick is due."""
        pts = self.tick * VIDEO_CLOCK / self.layout.fps
        return max(0.0, (pts - self._now(VIDEO_CLOCK)) / VIDEO_CLOCK)

    def run_due(self) -> None:
        """Emit every video tick and audio chunk whose time has come."""
        while self.tick * VIDEO_CLOCK / self.layout.fps <= self._now(VIDEO_CLOCK):
            self._compose(round(self.tick * VIDEO_CLOCK / self.layout.fps))
            self.tick += 1
        self._mix_due()

    def _compose(self, pts: int) -> None:
        from chorus.sfu.mixer import fit, grid, yuv_planes  # noqa: PLC0415

        t = time.process_time()
        if self.first_pts is None:
            self.first_pts = pts
        self.last_pts = pts
        canvas = self.canvas
        canvas.clear()
        ordered = sorted((s for s in self.sources.values() if s.frames), key=lambda s: s.order)
        for rect, source in zip(grid(len(ordered), canvas.width, canvas.height), ordered, strict=True):
            # The newest picture captured by this output time (older ones are dropped as they age).
            while len(source.frames) > 1 and source.frames[1][0] <= pts:
                source.frames.popleft()
                source.generation += 1
            frame = source.frames[0][1]
            size = fit(frame.width, frame.height, rect.width, rect.height)
            tile = self.tiles.get(source.order)
            if tile is None or tile[0] != source.generation or tile[1] != size:
                scaled = frame.reformat(width=size[0], height=size[1], format="yuv420p")
                tile = self.tiles[source.order] = (source.generation, size, yuv_planes(scaled))
            x = rect.x + ((rect.width - size[0]) // 2 & ~1)
            y = rect.y + ((rect.height - size[1]) // 2 & ~1)
            canvas.paste(x, y, tile[2])
        segment = pts // self.segment_ticks
        force = segment != self.last_segment
        self.last_segment = segment
        t = self._clock("compose", t)
        self.rungs.encode(canvas.frame(), pts, force, t)

    def _mix_due(self) -> None:
        import numpy as np  # noqa: PLC0415

        from chorus.sfu.mixer import FRAME_SAMPLES, mix_minus_one  # noqa: PLC0415

        t = time.process_time()
        due = int(self._now(AUDIO_CLOCK)) // FRAME_SAMPLES
        if self.next_chunk is None:
            self.next_chunk = max(0, due)
        while self.next_chunk < due:
            contributions = self.chunks.pop(self.next_chunk, {})
            # Everyone's sum, as an MCU room mixes for a listener who does not speak.
            mono = mix_minus_one({str(i): c for i, c in contributions.items()}, ["room"])["room"]
            frame = self.av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16",
                                                    layout="stereo")
            frame.sample_rate = AUDIO_CLOCK
            self.mix.write(frame, self.next_chunk * FRAME_SAMPLES)
            self.next_chunk += 1
        for stale in [c for c in self.chunks if c < self.next_chunk]:
            del self.chunks[stale]
        self._clock("audio", t)

    def finish(self) -> None:
        self.rungs.flush()
        self.mix.drain(True)


def _messages(fd: int, timeout: Callable[[], float | None], idle: Callable[[], None]) -> Any:
    """Input messages ``(pts, flags, index, payload)`` from ``fd``; ``None`` whenever ``timeout()`` passes idle.
    ``idle`` is called before each wait for more input (the worker flushes its output then: one write for all the
    outputs of a burst of input)."""
    buffer = bytearray()
    while True:
        idle()
        wait = timeout()
        if wait is not None:
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                yield None
                continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= _IN.size:
            length, pts, flags, index = _IN.unpack_from(buffer)
            if len(buffer) < _IN.size + length:
                break
            payload = bytes(buffer[_IN.size:_IN.size + length])
            del buffer[:_IN.size + length]
            yield pts, flags, index, payload


def worker_main(argv: list[str]) -> int:
    """The worker process: read input messages from stdin until the end message, write outputs to stdout."""
    config = json.loads(argv[0])
    # A parent that stopped reading (it killed a worker that fell behind) ends the worker quietly, as a pipe
    # ends a Unix filter, rather than with a BrokenPipeError traceback in the server's log.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if config.get("nice"):
        os.nice(int(config["nice"]))
    stdout = sys.stdout.buffer
    composite = config.get("composite") is not None
    worker: _Worker = _CompositeWorker(config, stdout) if composite else _Worker(config, stdout)
    worker.stats()  # the first report says the worker is ready
    last_stats = time.monotonic()
    timeout: Callable[[], float | None] = (
        (lambda: min(0.02, worker.due()) if isinstance(worker, _CompositeWorker) else None)
        if composite else (lambda: None))
    for message in _messages(sys.stdin.fileno(), timeout, stdout.flush):
        if message is not None:
            pts, flags, index, data = message
            if flags & _END:
                break
            if flags & _GONE:
                if isinstance(worker, _CompositeWorker):
                    worker.gone(index)
            elif flags & _AUDIO:
                worker.audio(data, pts, index)
            else:
                codec = "vp8" if flags & _VP8 else "h264"
                worker.video(data, pts, bool(flags & _KEY), codec, index, bool(flags & _TOP))
        if isinstance(worker, _CompositeWorker):
            worker.run_due()
        if time.monotonic() - last_stats > 1.0:
            worker.stats()
            last_stats = time.monotonic()
    worker.finish()
    worker.stats()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
