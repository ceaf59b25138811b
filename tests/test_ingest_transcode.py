"""
ingest/transcode.py: AAC → Opus in a thread and H.264 re-encode in a child process, both off the event loop.

The tests print the CPU cost per stream (percent of one core per second of media) and the event loop's worst
lag while the work runs; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import av
import numpy as np
import pytest
from ingest_util import decodable_frames

from chorus.ingest import h264
from chorus.ingest.errors import TranscodeError
from chorus.ingest.media import AudioConfig, AudioFrame, MediaItem, VideoAccessUnit, VideoConfig
from chorus.ingest.transcode import OPUS_FRAME, AacToOpus, H264Reencoder, OpusPacket, ReencodeSettings


@asynccontextmanager
async def loop_lag() -> AsyncIterator[list[float]]:
    """Measures how late a 5 ms ticker wakes up while the body runs: [worst lag in seconds]."""
    worst = [0.0]
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        while True:
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            worst[0] = max(worst[0], loop.time() - due)

    async with asyncio.TaskGroup() as group:
        ticker = group.create_task(tick())
        try:
            yield worst
        finally:
            ticker.cancel()


def aac_clip(seconds: float, frequency: float = 440.0) -> tuple[AudioConfig, list[AudioFrame]]:
    """AAC LC 48 kHz stereo frames of a sine, made with PyAV's AAC encoder."""
    encoder = av.CodecContext.create("aac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "fltp"
    encoder.bit_rate = 96000
    encoder.time_base = fractions.Fraction(1, 48000)
    packets: list[av.Packet] = []
    total = int(seconds * 48000)
    for start in range(0, total, 1024):
        t = (np.arange(1024) + start) / 48000
        tone = (0.4 * np.sin(2 * math.pi * frequency * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = 48000, start
        packets += encoder.encode(frame)
    packets += encoder.encode(None)
    config = AudioConfig(bytes(encoder.extradata or b""), 2, 48000, 2)
    return config, [AudioFrame(round((p.pts or 0) / 48), bytes(p)) for p in packets]


def h264_clip(frames: int, width: int = 640, height: int = 360) -> tuple[VideoConfig, list[VideoAccessUnit]]:
    """A libx264 High-profile clip with B-frames (what OBS sends by default), as media objects."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = fractions.Fraction(1, 30)
    encoder.framerate = fractions.Fraction(30)
    encoder.options = {"preset": "veryfast", "bf": "2", "threads": "1", "x264-params": "keyint=60"}
    y = np.add.outer(np.arange(height), np.arange(width))
    packets: list[av.Packet] = []
    for i in range(frames):
        yuv = np.concatenate([(y + i * 4) % 256, np.full((height // 2, width), 128, np.uint8)])
        frame = av.VideoFrame.from_ndarray(yuv.astype(np.uint8), format="yuv420p")
        frame.pts = i
        packets += encoder.encode(frame)
    packets += encoder.encode(None)
    units = [VideoAccessUnit(round(p.pts * 1000 / 30), round(p.dts * 1000 / 30), p.is_keyframe,
                             h264.split_annexb(bytes(p))) for p in packets]
    first = units[0].nalus
    config = h264.video_config([n for n in first if h264.nal_type(n) == h264.NAL_SPS],
                               [n for n in first if h264.nal_type(n) == h264.NAL_PPS])
    return config, units


async def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_aac_to_opus_in_a_thread_keeps_the_loop_responsive() -> None:
    seconds = 10.0
    config, frames = aac_clip(seconds)
    packets: list[OpusPacket] = []
    transcoder = AacToOpus(packets.append, max_queue=1000)
    try:
        async with loop_lag() as lag:
            transcoder.push(config)
            for frame in frames:  # the whole clip at once: the worker runs flat out
                transcoder.push(frame)
            await wait_for(lambda: len(packets) >= seconds / 0.02 - 5, timeout=30)
    finally:
        await transcoder.close()
    assert transcoder.dropped == 0
    steps = {b.timestamp - a.timestamp for a, b in zip(packets, packets[1:], strict=False)}
    assert steps == {OPUS_FRAME} and packets[0].timestamp == frames[0].pts_ms * 48
    # decode the Opus again: 48 kHz stereo, a 440 Hz tone
    decoder = av.CodecContext.create("libopus", "r")
    samples = []
    for packet in packets:
        for frame in decoder.decode(av.Packet(packet.data)):
            assert frame.sample_rate == 48000 and frame.layout.nb_channels == 2
            samples.append(frame.to_ndarray().reshape(-1, 2)[:, 0] if frame.format.is_packed
                           else frame.to_ndarray()[0])
    signal = np.concatenate(samples)[48000:]
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    assert abs(np.argmax(spectrum) * 48000 / len(signal) - 440) < 5
    cpu = transcoder.cpu_seconds / seconds * 100
    print(f"\nAAC→Opus: {cpu:.2f} % of one core per stream; worst loop lag while flat out {lag[0] * 1000:.1f} ms")
    assert cpu < 20
    assert lag[0] < 0.05


async def test_h264_reencode_removes_bframes_and_obeys_keyframe_requests() -> None:
    config, units = h264_clip(90)
    assert config.may_reorder and any(u.composition_offset_ms for u in units)
    out: list[MediaItem] = []
    errors: list[TranscodeError] = []
    first_cpu: list[float] = []

    def on_item(item: MediaItem) -> None:
        if not first_cpu:  # the worker's start-up (imports, encoder set-up) is not a per-second cost
            first_cpu.append(reencoder.cpu_seconds())
        out.append(item)

    reencoder = H264Reencoder(on_item, on_error=errors.append, max_queue=200)
    await reencoder.start()
    try:
        async with loop_lag() as lag:
            reencoder.push(config)
            for i, unit in enumerate(units):
                if i == 45:
                    reencoder.request_keyframe()
                reencoder.push(unit)
            # output trails input by the decoder's reordering depth until close flushes it
            await wait_for(lambda: sum(isinstance(i, VideoAccessUnit) for i in out) >= 88, timeout=60)
        cpu = reencoder.cpu_seconds()
    finally:
        await reencoder.close()
    assert not errors and reencoder.dropped == 0
    configs = [i for i in out if isinstance(i, VideoConfig)]
    video = [i for i in out if isinstance(i, VideoAccessUnit)]
    assert isinstance(out[0], VideoConfig) and len(configs) == 1
    assert h264.webrtc_profile(configs[0].profile_level_id) == "constrained-baseline"
    assert not configs[0].may_reorder and (configs[0].width, configs[0].height) == (640, 360)
    assert all(u.pts_ms == u.dts_ms for u in video)
    assert [u.pts_ms for u in video] == sorted(u.pts_ms for u in units)  # presentation order, every picture
    keyframes = [i for i, u in enumerate(video) if u.keyframe]
    # requested before input 45 (decoding order); output is in presentation order, a few pictures apart
    assert keyframes[0] == 0 and any(40 <= k <= 50 for k in keyframes), keyframes
    assert decodable_frames(configs[0], video) == 90
    media_seconds = (video[-3].pts_ms - video[0].pts_ms) / 1000  # what was encoded when ``cpu`` was read
    print(f"\nH.264 640x360/30 re-encode: {(cpu - first_cpu[0]) / media_seconds * 100:.1f} % of one core per "
          f"stream (worker process, veryfast, flat out); worst loop lag {lag[0] * 1000:.1f} ms")
    assert lag[0] < 0.05


async def test_reencoder_death_is_reported() -> None:
    config, units = h264_clip(10, 160, 96)
    errors: list[TranscodeError] = []
    reencoder = H264Reencoder(lambda item: None, on_error=errors.append,
                              settings=ReencodeSettings(bitrate=200_000))
    await reencoder.start()
    try:
        reencoder.push(config)
        reencoder.push(units[0])
        assert reencoder.pid is not None
        await asyncio.sleep(0.3)
        os.kill(reencoder.pid, signal.SIGKILL)
        await wait_for(lambda: bool(errors), timeout=5)
    finally:
        await reencoder.close()
    assert errors[0].code == "transcode_failed" and "exited" in errors[0].reason


@pytest.mark.parametrize("bad", [b"", b"\x00\x00\x01\x65garbage" * 10])
async def test_reencoder_skips_undecodable_input(bad: bytes) -> None:
    config, units = h264_clip(30, 160, 96)
    out: list[MediaItem] = []
    errors: list[TranscodeError] = []
    reencoder = H264Reencoder(out.append, on_error=errors.append)
    await reencoder.start()
    try:
        reencoder.push(config)
        reencoder.push(VideoAccessUnit(0, 0, False, h264.split_annexb(bad) or [b"\x41\x00"]))
        for unit in units:
            reencoder.push(unit)
        await wait_for(lambda: sum(isinstance(i, VideoAccessUnit) for i in out) >= 28, timeout=30)
    finally:
        await reencoder.close()
    assert not errors and sum(isinstance(i, VideoAccessUnit) for i in out) == 30
