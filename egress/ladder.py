"""
The bitrate ladder: lower-quality H.264 rungs (and AAC audio) made in a worker process.

The top rung of an H.264 source is the publisher's own stream, passed through untouched (the caller feeds it to
its :class:`~chorus.egress.fmp4.Fragmenter` directly); only the lower rungs are encoded. A VP8 source cannot go
into HLS, so it is decoded once and *every* rung, the top one at the source size included, is encoded.

Where the work happens: a child process (``python -P -m chorus.egress.ladder``) started with
``asyncio.create_subprocess_exec`` receives encoded access units on its stdin and writes encoded rungs to its
stdout. The event loop only copies bytes into a non-blocking pipe (asyncio's transport buffers them), so the
forwarding loop never decodes or encodes; a worker that falls behind makes :meth:`Ladder.push_video` drop input
up to the next key frame instead of growing a backlog. A crash of the worker is reported, never inherited.

Key frames are aligned across rungs: every rung gets an IDR at exactly the pts where the source has a key
frame (H.264 source) or where the caller marks a segment boundary (``force_keyframe``; a VP8 source's key
frames are only needed to decode). The caller asks the publisher for a key frame once per segment length
(:class:`KeyframeRequester` is that hook), so source key frames, rung IDRs and segment cuts share their pts.

Audio: Opus packets are decoded and re-encoded as AAC-LC (FFmpeg's native ``aac``), because Safari and MPEG-TS
players need AAC; output pts stay on the 48 kHz RTP clock, so A/V sync is the source's.

Wire format (big-endian): parent → worker ``>IQB`` (payload length, pts, flags) + payload; worker → parent
``>IQBB`` (length, pts, rung index or 254 = audio or 255 = stats JSON, key frame flag) + payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import math
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from chorus.egress.errors import EgressError
from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

_log = PeerLogger(logging.getLogger("chorus.egress.ladder"))

_IN = struct.Struct(">IQB")
_OUT = struct.Struct(">IQBB")
_KEY = 0x01  # input: force an IDR on every rung at this pts (source key frame or segment boundary)
_AUDIO = 0x02  # input: an Opus packet
_END = 0x04  # input: flush and exit
AUDIO_INDEX = 254
STATS_INDEX = 255
VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000


@dataclass(frozen=True, slots=True)
class Rung:
    """
    One encoded quality. ``height`` ``None`` means the source's size (the top rung of a VP8 source); the width
    follows the source's aspect ratio, rounded to an even number.
    """

    name: str
    height: int | None
    bitrate: int

    def size(self, source_width: int, source_height: int) -> tuple[int, int]:
        if self.height is None or self.height >= source_height:
            return source_width & ~1, source_height & ~1
        width = round(source_width * self.height / source_height / 2) * 2
        return max(2, width), self.height & ~1


#: The default lower rungs (issue 13): 360p and 180p.
DEFAULT_RUNGS = (Rung("360p", 360, 800_000), Rung("180p", 180, 250_000))


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
    Encodes the lower rungs of one video source (and its audio as AAC) in a worker process.

    Lifecycle: *new* → *running* (:meth:`start`) → *closed* (:meth:`close`: input ended, the worker flushed its
    encoders, every output delivered, the process reaped). If the worker dies, ``error`` is set
    (``worker_failed``), input is refused and ``on_error`` is called once.

    :param source: the publisher's codec, ``"h264"`` (top rung passes through) or ``"vp8"``.
    :param rungs: encoded rungs (for VP8 put a ``Rung("720p", None, ...)`` first to get a top rung).
    :param on_frame: called on the event loop for each encoded output, in order per rung.
    :param max_backlog: bytes queued towards the worker before input is dropped (up to the next key frame).
    """

    def __init__(self, *, source: Literal["h264", "vp8"], on_frame: Callable[[EncodedFrame], None],
                 rungs: tuple[Rung, ...] = DEFAULT_RUNGS, frame_rate: float = 30.0, audio: bool = True,
                 on_error: Callable[[EgressError], None] | None = None, max_backlog: int = 4 << 20,
                 log: PeerLogger | None = None) -> None:
        if source not in ("h264", "vp8"):
            raise EgressError("unsupported_codec", f"the ladder decodes h264 or vp8, not {source}")
        if not rungs or len({r.name for r in rungs}) != len(rungs) or len(rungs) >= AUDIO_INDEX:
            raise EgressError("bad_input", "rungs need distinct names")
        self.source = source
        self.rungs = rungs
        self.frame_rate = frame_rate
        self.audio = audio
        self.stats = LadderStats()
        self.error: EgressError | None = None
        self._on_frame = on_frame
        self._on_error = on_error
        self._max_backlog = max_backlog
        self._log = (log or _log).bind(source=source, rungs=",".join(r.name for r in rungs))
        self._tasks = Tasks("egress ladder")
        self._process: asyncio.subprocess.Process | None = None
        self._skipping = False
        self._closing = False
        self._done = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self.error is None and not self._closing

    async def start(self) -> None:
        """Start the worker process. :raises EgressError: ``invalid_state`` if started before."""
        if self._process is not None:
            raise EgressError("invalid_state", "ladder already started")
        config = {"source": self.source, "frame_rate": self.frame_rate,
                  "rungs": [[r.name, r.height, r.bitrate] for r in self.rungs]}
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "chorus.egress.ladder", json.dumps(config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._tasks.spawn(self._read(), name="egress ladder: read worker output")
        self._log.info("ladder worker started", pid=self._process.pid)

    def push_video(self, data: bytes, pts: int, *, keyframe: bool, force_keyframe: bool = False) -> bool:
        """
        Queue one source access unit (H.264 Annex B or a VP8 frame) with its 90 kHz pts.

        :param keyframe: the source frame is a key frame (an H.264 IDR: every rung gets an IDR here too).
        :param force_keyframe: make every rung an IDR here anyway (a segment boundary of a VP8 source).
        :returns: ``False`` if it was dropped (worker behind, failed or closed).
        """
        if not self.running:
            return False
        assert self._process is not None and self._process.stdin is not None
        transport = self._process.stdin.transport
        if transport.get_write_buffer_size() > self._max_backlog:
            if not self._skipping:
                self._log.warning("ladder worker behind: dropping input until the next key frame")
            self._skipping = True
        if self._skipping and not (keyframe and transport.get_write_buffer_size() <= self._max_backlog // 2):
            self.stats.frames_dropped += 1
            return False
        self._skipping = False
        force = keyframe if self.source == "h264" else force_keyframe or self.stats.frames_in == 0
        self._write(data, pts, _KEY if force else 0)
        self.stats.frames_in += 1
        return True

    def push_audio(self, data: bytes, pts: int) -> bool:
        """Queue one Opus packet with its 48 kHz pts. :returns: ``False`` if dropped."""
        if not self.running or not self.audio:
            return False
        self._write(data, pts, _AUDIO)
        return True

    def _write(self, data: bytes, pts: int, flags: int) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(_IN.pack(len(data), max(0, pts), flags) + data)
        except (ConnectionError, RuntimeError) as exc:
            self._fail(f"cannot write to the ladder worker: {exc}")

    async def close(self, timeout: float = 10.0) -> None:
        """
        End the input, let the worker flush its encoders, deliver the last outputs, reap the process.
        Idempotent. A worker that does not finish within ``timeout`` is killed.
        """
        process = self._process
        if process is None or self._closing:
            await self._tasks.close()
            return
        self._closing = True
        if self.error is None and process.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                process.stdin.write(_IN.pack(0, 0, _END))
                await process.stdin.drain()
                process.stdin.close()
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            self._log.warning("ladder worker did not finish: killing it", pid=process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await self._tasks.close()
        self._log.info("ladder worker ended", returncode=process.returncode,
                       cpu={k: round(v, 3) for k, v in self.stats.cpu.items()})

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        names = [r.name for r in self.rungs]
        try:
            while True:
                try:
                    header = await stdout.readexactly(_OUT.size)
                except asyncio.IncompleteReadError:
                    break
                length, pts, index, key = _OUT.unpack(header)
                payload = await stdout.readexactly(length)
                if index == STATS_INDEX:
                    report = json.loads(payload)
                    self.stats.cpu = report["cpu"]
                    self.stats.video_seconds = report["video_seconds"]
                elif index == AUDIO_INDEX:
                    self._on_frame(EncodedFrame("audio", payload, pts, True))
                elif index < len(names):
                    self._on_frame(EncodedFrame(names[index], payload, pts, bool(key)))
        except asyncio.IncompleteReadError:
            pass
        finally:
            self._done.set()
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


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _Worker:
    """Decode once, scale and encode per rung; Opus → AAC. Runs in the child process, blocking I/O."""

    def __init__(self, config: dict[str, Any], out: BinaryIO) -> None:
        import av  # noqa: PLC0415 (the parent never needs FFmpeg codecs for this)

        self.av = av
        self.out = out
        self.rungs = [Rung(n, h, b) for n, h, b in config["rungs"]]
        self.frame_rate = float(config["frame_rate"])
        self.decoder = av.CodecContext.create(config["source"], "r")
        self.decoder.thread_count = 1  # no frame-threading delay: one frame in, one frame out
        self.encoders: list[Any] = []
        self.audio_decoder: Any = None
        self.audio_encoder: Any = None
        self.fifo: Any = None
        self.resampler: Any = None
        self.audio_next: int | None = None
        self.fifo_pts = 0
        self.forced: set[int] = set()
        self.cpu: dict[str, float] = {}
        self.first_pts: int | None = None
        self.last_pts = 0

    def _clock(self, stage: str, since: float) -> float:
        now = time.process_time()
        self.cpu[stage] = self.cpu.get(stage, 0.0) + now - since
        return now

    def _emit(self, index: int, pts: int, key: bool, data: bytes) -> None:
        self.out.write(_OUT.pack(len(data), max(0, pts), index, int(key)) + data)

    def stats(self) -> None:
        seconds = (self.last_pts - self.first_pts) / VIDEO_CLOCK + 1 / self.frame_rate if self.first_pts is not None \
            else 0.0
        self._emit(STATS_INDEX, 0, False, json.dumps({"cpu": self.cpu, "video_seconds": seconds}).encode())
        self.out.flush()

    def video(self, data: bytes, pts: int, force: bool) -> None:
        av = self.av
        t = time.process_time()
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        if force:
            self.forced.add(pts)
        try:
            frames = self.decoder.decode(packet)
        except av.error.FFmpegError:
            frames = []
        t = self._clock("decode", t)
        if self.first_pts is None:
            self.first_pts = pts
        self.last_pts = max(self.last_pts, pts)
        for frame in frames:
            self._encode(frame, t)
            t = time.process_time()

    def _encode(self, frame: Any, t: float) -> None:
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
        pts = int(frame.pts)
        force = pts in self.forced
        self.forced.discard(pts)
        for index, enc in enumerate(self.encoders):
            scaled = frame.reformat(width=enc.width, height=enc.height, format="yuv420p")
            scaled.pts = pts
            scaled.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            scaled.pict_type = av.video.frame.PictureType.I if force else av.video.frame.PictureType.NONE
            for p in enc.encode(scaled):
                self._emit(index, int(p.pts), bool(p.is_keyframe), bytes(p))
            t = self._clock(self.rungs[index].name, t)

    def audio(self, data: bytes, pts: int) -> None:
        av = self.av
        t = time.process_time()
        if self.audio_decoder is None:
            self.audio_decoder = av.CodecContext.create("libopus", "r")
            self.audio_decoder.sample_rate = AUDIO_CLOCK
            self.audio_encoder = av.CodecContext.create("aac", "w")
            self.audio_encoder.sample_rate = AUDIO_CLOCK
            self.audio_encoder.layout = "stereo"
            self.audio_encoder.format = "fltp"
            self.audio_encoder.bit_rate = 96_000
            self.audio_encoder.time_base = fractions.Fraction(1, AUDIO_CLOCK)
            self.resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_CLOCK)
            self.fifo = av.AudioFifo()
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        try:
            decoded = self.audio_decoder.decode(packet)
        except av.error.FFmpegError:
            decoded = []
        for frame in decoded:
            frame.pts = None
            for out in self.resampler.resample(frame):
                # The RTP clock, not the decoder's sample count: a gap (DTX, loss) stays a gap in time. A gap
                # restarts the FIFO (dropping under 1024 samples, < 22 ms).
                if self.audio_next is None or pts != self.audio_next:
                    self.fifo = av.AudioFifo()
                    self.fifo_pts = pts
                out.pts = None
                self.fifo.write(out)
                pts += out.samples
                self.audio_next = pts
        self._drain_audio(False)
        self._clock("audio", t)

    def _drain_audio(self, final: bool) -> None:
        while self.fifo is not None and (self.fifo.samples >= 1024 or (final and self.fifo.samples)):
            frame = self.fifo.read(1024) if self.fifo.samples >= 1024 else self.fifo.read()
            frame.pts = self.fifo_pts
            frame.time_base = fractions.Fraction(1, AUDIO_CLOCK)
            self.fifo_pts += frame.samples
            for p in self.audio_encoder.encode(frame):
                self._emit(AUDIO_INDEX, int(p.pts), True, bytes(p))
        if final and self.audio_encoder is not None:
            for p in self.audio_encoder.encode(None):
                self._emit(AUDIO_INDEX, int(p.pts), True, bytes(p))

    def finish(self) -> None:
        t = time.process_time()
        try:
            for frame in self.decoder.decode(None):
                self._encode(frame, t)
        except self.av.error.FFmpegError:
            pass
        for index, enc in enumerate(self.encoders):
            for p in enc.encode(None):
                self._emit(index, int(p.pts), bool(p.is_keyframe), bytes(p))
        self._drain_audio(True)


def worker_main(argv: list[str]) -> int:
    """The worker process: read input messages from stdin until the end message, write outputs to stdout."""
    config = json.loads(argv[0])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    worker = _Worker(config, stdout)
    frames = 0
    while True:
        header = _read_exactly(stdin, _IN.size)
        if header is None:
            break
        length, pts, flags = _IN.unpack(header)
        data = _read_exactly(stdin, length) if length else b""
        if data is None:
            break
        if flags & _END:
            break
        if flags & _AUDIO:
            worker.audio(data, pts)
        else:
            worker.video(data, pts, bool(flags & _KEY))
            frames += 1
            if frames % 30 == 0:
                worker.stats()
        stdout.flush()
    worker.finish()
    worker.stats()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
