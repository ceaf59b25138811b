"""The ladder's worker process: aligned IDRs across rungs, right sizes, AAC out, failure and backpressure."""

from __future__ import annotations

import asyncio
import os
import signal

import av
import pytest
from egress_media import encode_opus, encode_video

from chorus.egress.errors import EgressError
from chorus.egress.ladder import EncodedFrame, KeyframeRequester, Ladder, Rung


def decode_sizes(frames: list[EncodedFrame]) -> list[tuple[int, int]]:
    ctx = av.CodecContext.create("h264", "r")
    out = []
    for f in frames:
        out += [(d.width, d.height) for d in ctx.decode(av.Packet(f.data))]
    return out + [(d.width, d.height) for d in ctx.decode(None)]


async def run_ladder(ladder: Ladder, video: list[tuple[bytes, int, bool, bool]], audio: list[tuple[bytes, int]]
                     ) -> None:
    await ladder.start()
    ai = 0
    for data, pts, key, force in video:
        ladder.push_video(data, pts, keyframe=key, force_keyframe=force)
        while ai < len(audio) and audio[ai][1] * 90000 // 48000 <= pts:
            ladder.push_audio(*audio[ai])
            ai += 1
        await asyncio.sleep(0)
    await ladder.close(timeout=60)


async def test_h264_source_lower_rungs_aligned_and_aac(capsys: pytest.CaptureFixture[str]) -> None:
    source = encode_video("libx264", 90, width=1280, height=720, gop=30)
    opus = encode_opus(3.0)
    out: list[EncodedFrame] = []
    ladder = Ladder(source="h264", on_frame=out.append, max_backlog=64 << 20)
    await run_ladder(ladder, [(f.data, 1_000_000 + f.pts, f.keyframe, False) for f in source],
                     [(e.data, 500_000 + e.pts) for e in opus])
    assert ladder.error is None
    by_rung = {name: [f for f in out if f.rung == name] for name in ("360p", "180p")}
    source_keys = [1_000_000 + f.pts for f in source if f.keyframe]
    assert source_keys == [1_000_000, 1_090_000, 1_180_000]
    for name, size in (("360p", (640, 360)), ("180p", (320, 180))):
        frames = by_rung[name]
        assert [f.pts for f in frames] == [1_000_000 + f.pts for f in source]
        # IDRs exactly where the source has its key frames, and nowhere else.
        assert [f.pts for f in frames if f.keyframe] == source_keys
        assert decode_sizes(frames) == [size] * 90
    aac = [f for f in out if f.rung == "audio"]
    ctx = av.CodecContext.create("aac", "r")
    ctx.extradata = bytes([0x11, 0x90])  # AAC-LC, 48 kHz, stereo
    samples = sum(fr.samples for f in aac for fr in ctx.decode(av.Packet(f.data)))
    assert abs(samples - len(opus) * 960) <= 2048
    assert aac[0].pts <= 500_000 and aac[-1].pts >= 500_000 + opus[-1].pts - 2048
    stats = ladder.stats
    assert stats.video_seconds == pytest.approx(3.0, abs=0.05)
    with capsys.disabled():
        print("\nladder CPU, 720p30 H.264 source (% of one core):",
              {k: round(stats.percent_of_core(k), 1) for k in stats.cpu})
    assert 0 < stats.percent_of_core("360p") < 100 and 0 < stats.percent_of_core("180p") < 100


async def test_vp8_source_every_rung_encoded_with_forced_idrs() -> None:
    source = encode_video("libvpx", 60, width=640, height=360, gop=60)
    out: list[EncodedFrame] = []
    ladder = Ladder(source="vp8", on_frame=out.append, audio=False, max_backlog=64 << 20,
                    rungs=(Rung("360p", None, 800_000), Rung("180p", 180, 250_000)))
    # Segment boundaries every second (every 30 frames) — not where the VP8 source has key frames.
    await run_ladder(ladder, [(f.data, f.pts, f.keyframe, i % 30 == 0) for i, f in enumerate(source)], [])
    for name, size in (("360p", (640, 360)), ("180p", (320, 180))):
        frames = [f for f in out if f.rung == name]
        assert len(frames) == 60
        assert [f.pts for f in frames if f.keyframe] == [0, 90000]
        assert decode_sizes(frames) == [size] * 60


async def test_worker_crash_is_reported_and_input_refused() -> None:
    errors: list[EgressError] = []
    ladder = Ladder(source="h264", on_frame=lambda f: None, on_error=errors.append)
    await ladder.start()
    assert ladder.pid is not None
    os.kill(ladder.pid, signal.SIGKILL)
    for _ in range(100):
        if errors:
            break
        await asyncio.sleep(0.02)
    assert [e.code for e in errors] == ["worker_failed"]
    assert not ladder.push_video(b"\x00\x00\x00\x01\x65", 0, keyframe=True)
    await ladder.close()
    with pytest.raises(EgressError) as e:
        Ladder(source="av1", on_frame=lambda f: None)  # type: ignore[arg-type]
    assert e.value.code == "unsupported_codec"


async def test_backlog_drops_until_a_keyframe_and_output_stays_decodable() -> None:
    source = encode_video("libx264", 90, width=1280, height=720, gop=30)
    out: list[EncodedFrame] = []
    ladder = Ladder(source="h264", on_frame=out.append, audio=False, max_backlog=1,
                    rungs=(Rung("90p", 90, 100_000),))
    await ladder.start()
    for f in source:  # no awaiting: the pipe fills and the backlog grows
        ladder.push_video(f.data, f.pts, keyframe=f.keyframe)
    await ladder.close(timeout=60)
    assert ladder.stats.frames_dropped > 0
    assert len(out) == ladder.stats.frames_in and out[0].keyframe
    assert len(decode_sizes(out)) == len(out)


async def test_keyframe_requester_calls_the_hook_each_interval() -> None:
    calls: list[float] = []
    requester = KeyframeRequester(lambda: calls.append(asyncio.get_running_loop().time()), 0.05)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(requester.run())
        await asyncio.sleep(0.23)
        task.cancel()
    assert 4 <= len(calls) <= 6 and requester.requests == len(calls)
