"""The CMAF writer: box structure walked by hand, then FFmpeg (through PyAV) demuxes and decodes what it wrote."""

from __future__ import annotations

import fractions
import io
import struct

import av
import numpy as np
import pytest
from egress_media import encode_opus, encode_video

from chorus.egress.errors import EgressError
from chorus.egress.fmp4 import Fragmenter, Part, Sample, Segment, Track, aac_audio_specific_config, init_segment
from chorus.egress.h264 import annexb_to_length_prefixed, nal_type, split_annexb


def boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """Top-level boxes as (type, payload); asserts the sizes tile the data exactly."""
    out, i = [], 0
    while i < len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        assert size >= 8 and i + size <= len(data), (kind, size)
        out.append((kind, data[i + 8:i + size]))
        i += size
    assert i == len(data)
    return out


def h264_track() -> tuple[Track, list[Sample]]:
    frames = encode_video("libx264", 90, gop=30)
    nals = split_annexb(frames[0].data)
    sps = next(n for n in nals if nal_type(n) == 7)
    pps = next(n for n in nals if nal_type(n) == 8)
    samples = [Sample(annexb_to_length_prefixed(f.data), f.pts, f.keyframe) for f in frames]
    return Track.h264(sps, pps), samples


def cut(fragmenter: Fragmenter, samples: list[Sample], boundaries: dict[int, bool] | None = None
        ) -> tuple[list[Part], list[Segment]]:
    events: list[Part | Segment] = []
    for i, s in enumerate(samples):
        events += fragmenter.push(s, boundary=(boundaries or {}).get(i))
    events += fragmenter.finish()
    return [e for e in events if isinstance(e, Part)], [e for e in events if isinstance(e, Segment)]


def segment_bytes(parts: list[Part], number: int) -> bytes:
    return b"".join(p.data for p in parts if p.segment == number)


def test_init_segment_structure() -> None:
    track, _ = h264_track()
    init = init_segment(track)
    top = boxes(init)
    assert [k for k, _ in top] == [b"ftyp", b"moov"]
    moov = boxes(top[1][1])
    assert [k for k, _ in moov] == [b"mvhd", b"trak", b"mvex"]
    assert track.codec.startswith("avc1.42") and (track.width, track.height) == (320, 180)
    assert b"avcC" in init and b"vmhd" in init and b"trex" in init


def test_h264_segments_and_parts_decode_with_exact_timestamps(tmp_path: object) -> None:
    track, samples = h264_track()
    parts, segments = cut(Fragmenter(track, segment_duration=1.0, part_duration=0.2), samples)
    # 3 s at 30 fps with a key frame every second: three 1 s segments of five 0.2 s parts.
    assert [(s.number, s.start, s.duration, s.parts) for s in segments] == [
        (0, 0, 90000, 5), (1, 90000, 90000, 5), (2, 180000, 90000, 5)]
    assert all(p.duration == 18000 and p.samples == 6 for p in parts)
    assert [p.independent for p in parts[:5]] == [True, False, False, False, False]
    seg0 = boxes(segment_bytes(parts, 0))
    assert [k for k, _ in seg0] == [b"styp"] + [b"moof", b"mdat"] * 5
    init = init_segment(track)
    pts: list[int] = []
    for number in range(3):
        # Each segment alone after the init segment, as a player fetches it.
        with av.open(io.BytesIO(init + segment_bytes(parts, number)), format="mp4") as container:
            stream = container.streams.video[0]
            assert stream.time_base == fractions.Fraction(1, 90000)
            assert stream.codec_context.width == 320
            frames = list(container.decode(stream))
            assert len(frames) == 30
            pts += [int(f.pts) for f in frames]
    assert pts == [s.dts for s in samples]
    # And one part on its own (an LL-HLS client may start at an independent part).
    part = next(p for p in parts if p.segment == 1 and p.index == 0)
    with av.open(io.BytesIO(init + part.data), format="mp4") as container:
        assert [int(f.pts) for f in container.decode(video=0)] == [s.dts for s in samples[30:36]]


def test_forced_boundaries_and_keyframe_rule() -> None:
    track, samples = h264_track()
    # No automatic cut: only where told (used to align rungs).
    fragmenter = Fragmenter(track, segment_duration=10.0)
    parts, segments = cut(fragmenter, samples, {60: True})
    assert [(s.start, s.duration) for s in segments] == [(0, 180000), (180000, 90000)]
    assert len(parts) == 2
    with pytest.raises(EgressError) as e:
        Fragmenter(track).push(samples[1], boundary=True)
    assert e.value.code == "bad_input"
    finished = Fragmenter(track)
    finished.finish()
    with pytest.raises(EgressError) as e:
        finished.push(samples[0])
    assert e.value.code == "invalid_state"


def test_video_waits_for_a_keyframe_and_drops_non_increasing_dts() -> None:
    track, samples = h264_track()
    fragmenter = Fragmenter(track, segment_duration=1.0)
    parts, segments = cut(fragmenter, samples[5:40] + [samples[39]])
    assert fragmenter.dropped == 26  # 25 before the key frame at 30, one repeated
    assert segments[0].start == samples[30].dts and segments[0].duration == 10 * 3000


def aac_samples(seconds: float) -> tuple[Track, list[Sample]]:
    ctx = av.CodecContext.create("aac", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = 48000, "stereo", "fltp", 96000
    ctx.time_base = fractions.Fraction(1, 48000)
    samples: list[Sample] = []
    for i in range(int(seconds * 48000 / 1024)):
        t = (np.arange(1024) + i * 1024) / 48000
        tone = (np.sin(2 * np.pi * 440 * t) * 0.3).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.vstack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = 48000, i * 1024
        for p in ctx.encode(frame):
            samples.append(Sample(bytes(p), int(p.pts) + 1024, True))  # shift the priming frame to start at 0
    assert bytes(ctx.extradata or b"")[:2] == aac_audio_specific_config(48000, 2)  # + an SBR sync extension
    return Track.aac(48000, 2, config=bytes(ctx.extradata or b""), track_id=2), samples


@pytest.mark.parametrize("codec", ["aac", "opus"])
def test_audio_segments_decode_and_cut_on_the_grid(codec: str) -> None:
    if codec == "aac":
        track, samples = aac_samples(3.0)
        frame = 1024
    else:
        track = Track.opus(2, track_id=2)
        samples = [Sample(e.data, e.pts, True) for e in encode_opus(3.0)]
        frame = 960
    parts, segments = cut(Fragmenter(track, segment_duration=1.0, part_duration=0.25), samples)
    # Cuts at the first frame at or after each whole second: no drift from one segment to the next.
    for s in segments[1:]:
        assert s.start % 48000 < frame and s.start // 48000 == s.number
    assert all(p.duration <= 12000 for p in parts)
    init = init_segment(track)
    decoded = 0
    for s in segments:
        with av.open(io.BytesIO(init + segment_bytes(parts, s.number)), format="mp4") as container:
            stream = container.streams.audio[0]
            assert stream.codec_context.name == codec and stream.codec_context.sample_rate == 48000
            packets = [p for p in container.demux(stream) if p.size]
            assert [int(p.pts) for p in packets] == [x.dts for x in samples if s.start <= x.dts < s.start + s.duration]
            for p in packets:
                decoded += sum(f.samples for f in stream.codec_context.decode(p))
    assert decoded >= (len(samples) - 2) * frame


def test_track_argument_errors() -> None:
    with pytest.raises(EgressError):
        Track.opus(6)
    with pytest.raises(EgressError):
        aac_audio_specific_config(12345, 2)
    track, _ = h264_track()
    with pytest.raises(EgressError):
        Fragmenter(track, segment_duration=1.0, part_duration=2.0)
