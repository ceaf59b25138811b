"""ingest/h264.py: framing, SPS parsing and RFC 6184 packetization, checked against libx264 output and PyAV."""

from __future__ import annotations

import fractions
import random
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.ingest import h264
from chorus.ingest.errors import ProtocolError
from chorus.ingest.media import VideoAccessUnit


def encode(width: int, height: int, frames: int, options: dict[str, str], profile: str | None = None
           ) -> list[av.Packet]:
    """Annex B packets of a small libx264 encode of moving noise (so that B-frames and big slices happen)."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = fractions.Fraction(1, 30)
    codec.framerate = fractions.Fraction(30)
    if profile:
        codec.profile = profile
    codec.options = {"preset": "ultrafast", "threads": "1", **options}
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (height * 3 // 2, width), dtype=np.uint8)
    packets: list[av.Packet] = []
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.roll(base, i * 3, axis=1), format="yuv420p")
        frame.pts = i
        packets += codec.encode(frame)
    packets += codec.encode(None)
    return packets


def access_units(packets: list[av.Packet]) -> list[VideoAccessUnit]:
    return [VideoAccessUnit(int(p.pts * 1000 / 30), int(p.dts * 1000 / 30), p.is_keyframe,
                            h264.split_annexb(bytes(p))) for p in packets]


def decode_annexb(data: list[bytes]) -> int:
    decoder = av.CodecContext.create("h264", "r")
    frames = 0
    for chunk in data:
        frames += len(decoder.decode(av.Packet(chunk)))
    frames += len(decoder.decode(None))
    return frames


def test_sps_of_baseline_without_bframes() -> None:
    packets = encode(320, 240, 3, {"bf": "0"}, profile="baseline")
    sps = next(n for n in h264.split_annexb(bytes(packets[0])) if h264.nal_type(n) == h264.NAL_SPS)
    info = h264.parse_sps(sps)
    assert (info.width, info.height) == (320, 240)
    assert info.profile_idc == 66 and info.profile_level_id.startswith("42")
    assert h264.webrtc_profile(info.profile_level_id) == "constrained-baseline"
    assert not info.may_reorder


def test_sps_of_high_with_bframes_and_cropping() -> None:
    packets = encode(322, 242, 3, {"bf": "2"})
    sps = next(n for n in h264.split_annexb(bytes(packets[0])) if h264.nal_type(n) == h264.NAL_SPS)
    info = h264.parse_sps(sps)
    assert (info.width, info.height) == (322, 242)  # coded 336x256, cropped (§7.4.2.1.1)
    # ultrafast leaves out the High tools (8x8 transform, CABAC), so x264 signals Main
    assert info.profile_idc in (77, 100) and h264.webrtc_profile(info.profile_level_id) in ("main", "high")
    assert info.max_num_reorder_frames is not None and info.max_num_reorder_frames > 0
    assert info.may_reorder


def test_sps_of_high_without_bframes() -> None:
    packets = encode(160, 120, 3, {"bf": "0"})
    sps = next(n for n in h264.split_annexb(bytes(packets[0])) if h264.nal_type(n) == h264.NAL_SPS)
    assert not h264.parse_sps(sps).may_reorder


def test_webrtc_profiles() -> None:
    assert h264.webrtc_profile("42e01f") == "constrained-baseline"
    assert h264.webrtc_profile("42001f") == "baseline"
    assert h264.webrtc_profile("4d401f") == "main"
    assert h264.webrtc_profile("640c1f") == "constrained-high"
    assert h264.webrtc_profile("6e0028") is None  # High 10
    assert h264.webrtc_profile("zz") is None


def test_annexb_and_avcc_framing_round_trip() -> None:
    nalus = [b"\x67\x42\x00\x1f", b"\x68\xce\x3c\x80", b"\x65" + bytes(range(1, 256)) * 2, b"\x06\x05\x00\x80"]
    assert h264.split_annexb(h264.join_annexb(nalus)) == nalus
    assert h264.split_annexb(b"\x00\x00\x01" + nalus[0] + b"\x00\x00\x00\x01" + nalus[1]) == nalus[:2]
    for size in (1, 2, 4):
        short = [n[:200] for n in nalus]
        assert h264.split_avcc(h264.join_avcc(short, size), size) == short
    with pytest.raises(ProtocolError):
        h264.split_avcc(b"\x00\x00\x01\x00abc")


def test_avcc_record_from_a_real_mp4(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30, options={"preset": "ultrafast", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((180, 160), i * 40, np.uint8), format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with av.open(str(path)) as container:
        record = bytes(container.streams.video[0].codec_context.extradata or b"")
        sample = bytes(next(container.demux(video=0)))
    parsed = h264.parse_avcc(record)
    assert parsed.nal_length_size == 4 and len(parsed.sps) == 1 and len(parsed.pps) == 1
    config = h264.video_config(parsed.sps, parsed.pps, parsed.nal_length_size)
    assert (config.width, config.height) == (160, 120)
    assert config.profile_level_id == f"{parsed.profile:02x}{parsed.compatibility:02x}{parsed.level:02x}"
    assert any(h264.nal_type(n) == h264.NAL_IDR for n in h264.split_avcc(sample, parsed.nal_length_size))


@pytest.mark.parametrize("max_payload", [1200, 300])
def test_packetize_depacketize_round_trip_decodes(max_payload: int) -> None:
    packets = encode(320, 240, 40, {"bf": "2", "x264-params": "keyint=15:min-keyint=15", "aud": "1"})
    units = access_units(packets)
    first = h264.split_annexb(bytes(packets[0]))
    sps = [n for n in first if h264.nal_type(n) == h264.NAL_SPS]
    pps = [n for n in first if h264.nal_type(n) == h264.NAL_PPS]
    packetizer = h264.H264Packetizer(max_payload)
    packetizer.config = h264.video_config(sps, pps)
    rebuilt: list[bytes] = []
    fu_a = stap_a = 0
    for unit in units:
        # libx264 writes SPS/PPS only once; strip them so that the packetizer must insert them before IDRs.
        unit = VideoAccessUnit(unit.pts_ms, unit.dts_ms, unit.keyframe,
                               [n for n in unit.nalus if h264.nal_type(n) not in (h264.NAL_SPS, h264.NAL_PPS)])
        rtp = packetizer.packetize(unit)
        assert all(len(payload) <= max_payload for payload, _ in rtp)
        assert [marker for _, marker in rtp] == [False] * (len(rtp) - 1) + [True]
        fu_a += sum(p[0] & 0x1F == h264.NAL_FU_A for p, _ in rtp)
        stap_a += sum(p[0] & 0x1F == h264.NAL_STAP_A for p, _ in rtp)
        nalus = h264.depacketize(p for p, _ in rtp)
        expected = [n for n in unit.nalus if h264.nal_type(n) != h264.NAL_AUD]
        if unit.keyframe:
            assert nalus[:2] == [*sps, *pps] and stap_a
            nalus = nalus[2:]
        assert nalus == expected
        rebuilt.append(h264.join_annexb(h264.depacketize(p for p, _ in rtp)))
    keyframes = sum(u.keyframe for u in units)
    assert keyframes >= 3 and stap_a == keyframes and fu_a > 0
    assert decode_annexb(rebuilt) == 40
    # Decoding can also start at the second keyframe: the parameter sets travel with it.
    second = [i for i, u in enumerate(units) if u.keyframe][1]
    assert decode_annexb(rebuilt[second:]) == 40 - second


def test_rtp_timestamp_is_90khz_and_wraps() -> None:
    assert h264.rtp_timestamp(1000) == 90_000
    assert h264.rtp_timestamp((1 << 32) // 90 + 1) < 1000


def test_depacketize_refuses_broken_fragments() -> None:
    with pytest.raises(ProtocolError):
        h264.depacketize([bytes([0x7C, 0x05]) + b"x"])  # FU-A continuation without start
    with pytest.raises(ProtocolError):
        h264.depacketize([bytes([0x7C, 0x85]) + b"x"])  # start without end
    with pytest.raises(ProtocolError):
        h264.depacketize([bytes([0x78, 0x00, 0x09]) + b"abc"])  # STAP-A size past the end


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parsers_raise_only_protocol_errors_on_garbage(data: bytes) -> None:
    for parse in (lambda d: h264.parse_sps(b"\x67" + d), h264.parse_avcc, lambda d: h264.depacketize([d]),
                  h264.split_avcc):
        try:
            parse(data)
        except ProtocolError:
            pass


def test_sps_truncated_everywhere_raises_protocol_error() -> None:
    packets = encode(160, 120, 1, {"bf": "2"})
    sps = next(n for n in h264.split_annexb(bytes(packets[0])) if h264.nal_type(n) == h264.NAL_SPS)
    for cut in range(1, 6):
        with pytest.raises(ProtocolError):
            h264.parse_sps(sps[:cut])
    rng = random.Random(3)
    for _ in range(200):
        mutated = bytearray(sps)
        mutated[rng.randrange(1, len(sps))] = rng.randrange(256)
        try:
            h264.parse_sps(bytes(mutated))
        except ProtocolError:
            pass


def test_needs_reencode() -> None:
    baseline = h264.video_config(*_params(encode(160, 120, 1, {"bf": "0"}, profile="baseline")))
    with_b = h264.video_config(*_params(encode(160, 120, 1, {"bf": "2"})))
    assert not h264.needs_reencode(baseline)
    assert h264.needs_reencode(with_b)
    assert h264.needs_reencode(baseline, VideoAccessUnit(66, 33, False, [b"\x41"]))  # reordering seen at run time
    assert not h264.needs_reencode(baseline, VideoAccessUnit(33, 33, False, [b"\x41"]))
    assert h264.needs_reencode(baseline, accepted=frozenset({"high"}))


def _params(packets: list[av.Packet]) -> tuple[list[bytes], list[bytes]]:
    nalus = h264.split_annexb(bytes(packets[0]))
    return ([n for n in nalus if h264.nal_type(n) == h264.NAL_SPS],
            [n for n in nalus if h264.nal_type(n) == h264.NAL_PPS])
