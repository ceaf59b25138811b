"""Test media: tracks with known content, and helpers that measure what was received."""

from __future__ import annotations

import asyncio
import fractions
import math
import time

import av
import numpy as np
from aiortc import AudioStreamTrack, MediaStreamTrack, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

AUDIO_RATE = 48000
AUDIO_PTIME = 0.020


class SineTrack(AudioStreamTrack):
    """A continuous sine tone, 48 kHz mono, 20 ms frames, paced in real time."""

    def __init__(self, frequency: float, amplitude: float = 0.5) -> None:
        super().__init__()
        self.frequency = frequency
        self.amplitude = amplitude
        self._samples = int(AUDIO_RATE * AUDIO_PTIME)
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.time()
        wait = self._start + self._pts / AUDIO_RATE - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(self._samples) + self._pts) / AUDIO_RATE
        samples = (self.amplitude * 32767 * np.sin(2 * math.pi * self.frequency * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._pts += self._samples
        return frame


class ColorTrack(VideoStreamTrack):
    """Small video frames of one colour with a moving bar (so encoders produce real inter frames)."""

    def __init__(self, color: tuple[int, int, int] = (200, 30, 30), width: int = 320, height: int = 240) -> None:
        super().__init__()
        self.color = color
        self.width = width
        self.height = height
        self._n = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = np.empty((self.height, self.width, 3), dtype=np.uint8)
        image[:] = self.color
        x = (self._n * 4) % self.width
        image[:, x : x + 8] = 255
        self._n += 1
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = pts
        frame.time_base = time_base
        return frame


def encode_vp8_clip(frames: int = 90, width: int = 320, height: int = 240, fps: int = 30) -> list[bytes]:
    """Encode a short test clip with libvpx once; returns each frame's VP8 bitstream."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuv420p"
    codec.time_base = fractions.Fraction(1, fps)
    codec.framerate = fractions.Fraction(fps, 1)
    codec.bit_rate = 300_000
    codec.gop_size = fps  # a keyframe every second
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    out: list[bytes] = []
    for i in range(frames):
        image = np.zeros((height, width, 3), dtype=np.uint8)
        image[:, :, 1] = 120
        image[:, (i * 5) % width : (i * 5) % width + 16] = 255
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out += [bytes(p) for p in codec.encode(frame)]
    out += [bytes(p) for p in codec.encode(None)]
    return out


class EncodedVideoTrack(MediaStreamTrack):
    """Sends pre-encoded VP8 frames (aiortc packetizes them without encoding), looping the clip with
    monotonically increasing timestamps."""

    kind = "video"

    def __init__(self, frames: list[bytes], fps: int = 30) -> None:
        super().__init__()
        self.frames = frames
        self.fps = fps
        self.sent: list[bytes] = []
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        wait = self._start + self._n / self.fps - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        data = self.frames[self._n % len(self.frames)]
        packet = av.Packet(data)
        packet.pts = self._n
        packet.time_base = fractions.Fraction(1, self.fps)
        self._n += 1
        self.sent.append(data)
        return packet


async def count_frames(track: MediaStreamTrack, seconds: float) -> int:
    """Decode frames from ``track`` for ``seconds``; returns how many arrived."""
    n = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(track.recv(), left)
        except (TimeoutError, MediaStreamError):
            break
        n += 1
    return n


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """The frequency (Hz) of the strongest FFT bin of a mono signal."""
    window = np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(samples * window))
    spectrum[0] = 0
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def collect_audio(track: MediaStreamTrack, seconds: float, skip: float = 0.5) -> tuple[np.ndarray, int]:
    """Decode ``seconds`` of audio (after skipping ``skip`` s of start-up); returns mono samples and rate."""
    chunks: list[np.ndarray] = []
    rate = AUDIO_RATE
    got = 0.0
    skipped = 0.0
    while got < seconds:
        frame = await asyncio.wait_for(track.recv(), 5)
        rate = frame.sample_rate
        data = frame.to_ndarray().astype(np.float64)
        channels = len(frame.layout.channels)
        mono = data.reshape(-1, channels).mean(axis=1) if data.shape[0] == 1 else data.mean(axis=0)
        duration = frame.samples / rate
        if skipped < skip:
            skipped += duration
            continue
        chunks.append(mono)
        got += duration
    return np.concatenate(chunks), rate
