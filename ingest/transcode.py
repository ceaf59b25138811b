"""
Transcoding for ingest, always off the forwarding event loop.

- :class:`AacToOpus` — AAC → Opus (48 kHz stereo, 20 ms frames, libopus; browsers take no AAC over WebRTC).
  Runs in one worker **thread** per stream: it is cheap (about 1 % of a core per stream, see the report in
  ``tests/test_ingest_transcode.py``) and PyAV releases the GIL inside FFmpeg's decode/resample/encode, so the
  loop's latency stays in the low milliseconds while a thread transcodes flat out.
- :class:`H264Reencoder` — H.264 → H.264 constrained baseline without B-frames (libx264, ``tune=zerolatency``,
  keyframe on request), for streams with B-frames or a profile a browser cannot take. Runs in a **child
  process** per stream: at 640x360/30 it costs several times the audio path, and even with the GIL released
  most of the time a thread would compete with the loop for the process's share of the 2 cores and would take
  the server down with it if FFmpeg crashed; a process can be niced, measured (``/proc``) and killed.

Both are fed from the loop (non-blocking ``push``; a bounded queue drops input when the worker falls behind —
for video, until the next keyframe) and deliver results to a callback on the loop.

Worker protocol (parent ⇄ ``python -m chorus.ingest.reencode_worker``): frames of ``!BBqqI`` (kind, flags, pts_ms,
dts_ms, length) + payload on stdin/stdout. Parent → child: kind 1 = an access unit as Annex B (flags bit 0:
force a keyframe), kind 2 = end. Child → parent: kind 1 = an encoded access unit as Annex B (flags bit 0:
keyframe), kind 3 = a fatal error (UTF-8 text). The encoder settings travel as JSON in argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import av
import av.audio.resampler

from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

from .errors import TranscodeError
from .h264 import NAL_PPS, NAL_SPS, join_annexb, nal_type, split_annexb, video_config
from .media import AudioConfig, AudioFrame, MediaItem, VideoAccessUnit, VideoConfig
from .wire import (
    WIRE_FLAG_KEY,
    WIRE_HEADER,
    WIRE_KIND_END,
    WIRE_KIND_ERROR,
    WIRE_KIND_UNIT,
    WIRE_MAX_UNIT,
    ReencodeSettings,
)

logger = logging.getLogger("chorus.ingest.transcode")

OPUS_RATE = 48_000
OPUS_FRAME = 960  # 20 ms


@dataclass(frozen=True, slots=True)
class OpusPacket:
    """
    One 20 ms Opus packet.

    :param timestamp: in 48 kHz samples on the stream's clock (``pts_ms * 48`` of the AAC it came from), usable
        as an RTP timestamp (RFC 7587 §4.1) modulo 2**32.
    """

    timestamp: int
    duration: int
    data: bytes


class AacToOpus:
    """
    AAC → Opus in a worker thread.

    :param on_packet: called on the event loop with each Opus packet, in order.
    :param on_error: called on the event loop once if the worker fails (it then stops).

    Lifecycle: *running* (created, on the event loop: the thread starts) → *closed* (:meth:`close`: queued input
    is dropped, the thread joined). ``push`` after ``close`` is ignored.
    """

    def __init__(self, on_packet: Callable[[OpusPacket], None], *, bitrate: int = 64_000,
                 on_error: Callable[[TranscodeError], None] | None = None, name: str = "aac→opus",
                 max_queue: int = 100) -> None:
        self.on_packet = on_packet
        self.on_error = on_error
        self.bitrate = bitrate
        self.log = PeerLogger(logger, transcoder=name)
        self.dropped = 0
        self.cpu_seconds = 0.0  # CPU time of the worker thread
        self._loop = asyncio.get_running_loop()
        self._queue: queue.Queue[AudioConfig | AudioFrame | None] = queue.Queue(max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"transcode {name}", daemon=True)
        self._thread.start()

    def push(self, item: AudioConfig | AudioFrame) -> None:
        """Queue a config or a frame (from the loop; never blocks). Frames before any config are dropped."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped % 50 == 1:
                self.log.warning("aac→opus falling behind: input dropped", dropped=self.dropped)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        start = time.thread_time()
        try:
            self._work()
        except Exception as e:
            error = TranscodeError(f"AAC→Opus failed: {e!r}")
            self.log.error("aac→opus failed", exc_info=True)
            if self.on_error is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.on_error, error)
        finally:
            self.cpu_seconds = time.thread_time() - start

    def _work(self) -> None:
        decoder: Any = None
        encoder = av.CodecContext.create("libopus", "w")
        encoder.sample_rate = OPUS_RATE
        encoder.layout = "stereo"
        encoder.format = "s16"
        encoder.bit_rate = self.bitrate
        encoder.time_base = Fraction(1, OPUS_RATE)
        encoder.options = {"application": "audio", "frame_duration": "20"}
        resampler = av.audio.resampler.AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE,
                                                      frame_size=OPUS_FRAME)
        next_pts: int | None = None
        opus_ts = 0
        began = time.thread_time()
        while (item := self._queue.get()) is not None:
            if isinstance(item, AudioConfig):
                decoder = av.CodecContext.create("aac", "r")
                decoder.extradata = item.asc
                continue
            if decoder is None:
                continue
            packet = av.Packet(item.aac)
            packet.pts = packet.dts = item.pts_ms
            packet.time_base = Fraction(1, 1000)
            out: list[OpusPacket] = []
            for frame in decoder.decode(packet):
                if next_pts is None:
                    next_pts = opus_ts = item.pts_ms * (OPUS_RATE // 1000)
                frame.pts = None
                for chunk in resampler.resample(frame):
                    chunk.pts = next_pts
                    chunk.time_base = Fraction(1, OPUS_RATE)
                    next_pts += chunk.samples
                    for encoded in encoder.encode(chunk):
                        # libopus reports pts minus its pre-skip; Chorus numbers packets from the first input
                        out.append(OpusPacket(opus_ts, OPUS_FRAME, bytes(encoded)))
                        opus_ts += OPUS_FRAME
            if out and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._deliver, out)
            self.cpu_seconds = time.thread_time() - began

    def _deliver(self, packets: list[OpusPacket]) -> None:
        for packet in packets:
            self.on_packet(packet)


# --- video: a child process ---------------------------------------------------------------------------------------

class H264Reencoder:
    """
    Re-encodes one H.264 stream in a child process.

    :param on_item: called on the loop with a :class:`VideoConfig` (when the output's parameter sets change) and
        then each :class:`VideoAccessUnit` (``pts_ms == dts_ms``: no reordering). Output trails input by the
        decoder's reordering depth (2 pictures for x264's default B-frames); :meth:`close` flushes it.
    :param on_error: called on the loop once if the worker dies or fails.
    :param max_queue: input units held while the worker starts (it takes a moment to import PyAV).
    :param max_backlog: once output flows, input units held at most (``None``: ``max_queue``); beyond, input is
        dropped until the next keyframe, which bounds the latency a starved worker adds.

    Lifecycle: *new* → *running* (:meth:`start`) → *closed* (:meth:`close`: the worker is asked to end, then
    killed if it does not within 2 s). Idempotent close.
    """

    def __init__(self, on_item: Callable[[MediaItem], None], *, settings: ReencodeSettings | None = None,
                 on_error: Callable[[TranscodeError], None] | None = None, name: str = "h264 re-encode",
                 max_queue: int = 60, max_backlog: int | None = None) -> None:
        self.on_item = on_item
        self.on_error = on_error
        self.settings = settings or ReencodeSettings()
        self.name = name
        self.log = PeerLogger(logger, transcoder=name)
        self.dropped = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(max_queue)
        self._max_backlog = max_backlog
        self._tasks = Tasks(f"transcode {name}")
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._config: VideoConfig | None = None
        self._input_config: VideoConfig | None = None
        self._force_keyframe = False
        self._skipping = False
        self._failed = False
        self._stderr_tail = b""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the worker process has used so far; 0 once it has exited."""
        if self._process is None or self._process.returncode is not None:
            return 0.0
        try:
            with open(f"/proc/{self._process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "chorus.ingest.reencode_worker", json.dumps(asdict(self.settings)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._tasks.spawn(self._write(), name=f"{self.name} writer")
        self._reader = self._tasks.spawn(self._read(), name=f"{self.name} reader")
        self._tasks.spawn(self._read_stderr(), name=f"{self.name} stderr")
        self.log.info("re-encoder started", pid=self._process.pid, **asdict(self.settings))

    def request_keyframe(self) -> None:
        """The next output picture will be an IDR (e.g. a subscriber sent a PLI)."""
        self._force_keyframe = True

    def push(self, item: VideoConfig | VideoAccessUnit) -> None:
        """Queue input (from the loop; never blocks). When the worker falls behind, input is dropped until the
        next keyframe (a decoder cannot skip a reference picture)."""
        if isinstance(item, VideoConfig):
            self._input_config = item
            return
        if self._failed or self._tasks.closed or self._input_config is None:
            return
        if self._skipping and not item.keyframe:
            self.dropped += 1
            return
        nalus = item.nalus
        if item.keyframe and not any(nal_type(n) == NAL_SPS for n in nalus):
            nalus = [*self._input_config.sps, *self._input_config.pps, *nalus]
        flags = WIRE_FLAG_KEY if self._force_keyframe else 0
        data = join_annexb(nalus)
        try:
            if self._max_backlog is not None and self._config is not None and \
                    self._queue.qsize() >= self._max_backlog:
                raise asyncio.QueueFull
            self._queue.put_nowait(WIRE_HEADER.pack(WIRE_KIND_UNIT, flags, item.pts_ms, item.dts_ms, len(data)) + data)
            self._skipping = False
            self._force_keyframe = False
        except asyncio.QueueFull:
            self.dropped += 1
            self._skipping = True
            self._force_keyframe = True  # the picture after the gap should be decodable on its own
            self.log.warning("re-encoder falling behind: input dropped until the next keyframe", dropped=self.dropped)

    async def close(self) -> None:
        process = self._process
        if process is not None and process.returncode is None and not self._tasks.closed:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(WIRE_HEADER.pack(WIRE_KIND_END, 0, 0, 0, 0))
            try:
                async with asyncio.timeout(2):
                    await process.wait()
                    if self._reader is not None:  # the last pictures (decoder delay) are still in the pipe
                        await asyncio.wait({self._reader})
            except TimeoutError:
                process.kill()
        await self._tasks.close()
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def _write(self) -> None:
        assert self._process is not None and self._process.stdin is not None
        stdin = self._process.stdin
        try:
            while (data := await self._queue.get()) is not None:
                stdin.write(data)
                await stdin.drain()
                if data[0] == WIRE_KIND_END:
                    break
        except (ConnectionError, BrokenPipeError):
            pass  # the reader reports the death
        finally:
            with contextlib.suppress(Exception):
                stdin.close()

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        try:
            while True:
                try:
                    header = await stdout.readexactly(WIRE_HEADER.size)
                except asyncio.IncompleteReadError:
                    break
                kind, flags, pts, _dts, length = WIRE_HEADER.unpack(header)
                if length > WIRE_MAX_UNIT:
                    raise TranscodeError("worker sent an oversized unit")
                payload = await stdout.readexactly(length)
                if kind == WIRE_KIND_ERROR:
                    raise TranscodeError(payload.decode(errors="replace"))
                if kind == WIRE_KIND_UNIT:
                    self._emit(pts, bool(flags & WIRE_FLAG_KEY), payload)
            code = await self._process.wait()
            if code != 0 and not self._tasks.closed:
                tail = self._stderr_tail.decode(errors="replace").strip().splitlines()[-3:]
                raise TranscodeError(f"worker exited with {code}: {' | '.join(tail)}")
        except TranscodeError as e:
            self._fail(e)

    async def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        while chunk := await self._process.stderr.read(4096):
            self._stderr_tail = (self._stderr_tail + chunk)[-4096:]

    def _fail(self, error: TranscodeError) -> None:
        if self._failed:
            return
        self._failed = True
        self.log.error("re-encoder failed", detail=error.reason)
        if self.on_error is not None:
            self.on_error(error)

    def _emit(self, pts: int, keyframe: bool, annexb: bytes) -> None:
        nalus = split_annexb(annexb)
        sps = [n for n in nalus if nal_type(n) == NAL_SPS]
        pps = [n for n in nalus if nal_type(n) == NAL_PPS]
        if sps and pps:
            config = video_config(sps, pps)
            if config != self._config:
                self._config = config
                self.on_item(config)
        if self._config is not None:
            self.on_item(VideoAccessUnit(pts, pts, keyframe, nalus))
