"""RTP → access units: checked against the encoder's own frames, aiortc's depayloader and FFmpeg's decoders."""

from __future__ import annotations

import random

import av
import pytest
from aiortc.codecs import depayload
from aiortc.rtp import RtpPacket
from egress_media import H264_CODEC, OPUS_CODEC, VP8_CODEC, encode_opus, encode_video, packetize

from chorus.egress.depacketize import (
    AccessUnit,
    H264Depacketizer,
    OpusDepacketizer,
    ReorderBuffer,
    Unwrapper,
    Vp8Depacketizer,
    depacketizer_for,
)
from chorus.egress.errors import EgressError
from chorus.egress.h264 import (
    annexb_to_length_prefixed,
    avc_decoder_configuration,
    length_prefixed_to_annexb,
    nal_type,
    parse_avc_decoder_configuration,
    parse_sps,
    split_annexb,
)


def run(depacketizer: H264Depacketizer | Vp8Depacketizer | OpusDepacketizer,
        packets: list[RtpPacket]) -> list[AccessUnit]:
    out: list[AccessUnit] = []
    for p in packets:
        out += depacketizer.push(p)
    return out + depacketizer.flush()


def decode_count(codec: str, units: list[AccessUnit]) -> int:
    ctx = av.CodecContext.create(codec, "r")
    n = 0
    for u in units:
        n += len(ctx.decode(av.Packet(u.data)))
    return n + len(ctx.decode(None))


def test_unwrapper_extends_across_wraps_and_reordering() -> None:
    u = Unwrapper(16)
    assert [u(x) for x in (65534, 65535, 0, 65535, 1, 2)] == [65534, 65535, 65536, 65535, 65537, 65538]
    t = Unwrapper(32)
    values = [(0xFFFFF000 + 3000 * i) & 0xFFFFFFFF for i in range(10)]
    ext = [t(v) for v in values]
    assert ext == [0xFFFFF000 + 3000 * i for i in range(10)]


def test_reorder_buffer_restores_order_and_declares_loss() -> None:
    buf = ReorderBuffer(window=4)
    mk = lambda s: RtpPacket(sequence_number=s & 0xFFFF)  # noqa: E731
    out = []
    for s in [65534, 0, 65535, 1, 1, 3, 4, 5, 6]:  # 2 never comes; 1 is duplicated
        out += [(p.sequence_number, lost) for p, lost in buf.push(mk(s))]
    assert out == [(65534, 0), (65535, 0), (0, 0), (1, 0), (3, 1), (4, 0), (5, 0), (6, 0)]
    assert buf.push(mk(2)) == []  # too late
    with pytest.raises(EgressError) as e:
        ReorderBuffer(0)
    assert e.value.code == "bad_input"


def test_h264_access_units_match_encoder_and_decode() -> None:
    frames = encode_video("libx264", 60, gop=30)
    packets = packetize(H264_CODEC, frames, seq0=65500, ts0=0xFFFFFFFF - 3000 * 20)  # both counters wrap
    assert any(p.payload[0] & 0x1F == 28 for p in packets) and any(p.payload[0] & 0x1F == 24 for p in packets)
    units = run(H264Depacketizer(), packets)
    assert len(units) == len(frames)
    assert [u.keyframe for u in units] == [f.keyframe for f in frames]
    base = units[0].pts
    assert [u.pts - base for u in units] == [f.pts for f in frames]  # 64-bit pts, straight across the wrap
    assert units[25].rtp_timestamp < units[15].rtp_timestamp  # the 32-bit one did wrap
    for u, f in zip(units, frames, strict=True):
        assert split_annexb(u.data) == [n for n in split_annexb(f.data) if nal_type(n) != 9]
    # The same bytes as aiortc's public depayloader (which keeps AUDs).
    by_ts: dict[int, bytes] = {}
    for p in packets:
        by_ts[p.timestamp] = by_ts.get(p.timestamp, b"") + depayload(H264_CODEC, p.payload)
    assert [split_annexb(u.data) for u in units] == [
        [n for n in split_annexb(by_ts[u.rtp_timestamp]) if nal_type(n) != 9] for u in units]
    assert decode_count("h264", units) == 60


def test_h264_parameter_sets_are_put_before_a_bare_idr() -> None:
    frames = encode_video("libx264", 31, gop=30)
    dep = H264Depacketizer()
    # Strip SPS/PPS from the second key frame: the depacketizer must restore them from the first.
    packets = packetize(H264_CODEC, frames)
    stripped = [p for p in packets
                if not (p.timestamp == frames[30].pts and p.payload[0] & 0x1F in (7, 8))]
    units = run(dep, stripped)
    assert units[-1].keyframe
    assert [nal_type(n) for n in split_annexb(units[-1].data)][:2] == [7, 8]
    assert dep.sps is not None and dep.pps is not None
    info = parse_sps(dep.sps)
    assert (info.width, info.height, info.profile_idc) == (320, 180, 66)
    assert info.codec_string.startswith("avc1.42")


@pytest.mark.parametrize("size", [(320, 180), (640, 360), (1280, 720), (176, 100)])
def test_sps_size_and_avcc_round_trip(size: tuple[int, int]) -> None:
    frames = encode_video("libx264", 1, width=size[0], height=size[1])
    nals = split_annexb(frames[0].data)
    sps = next(n for n in nals if nal_type(n) == 7)
    pps = next(n for n in nals if nal_type(n) == 8)
    assert (parse_sps(sps).width, parse_sps(sps).height) == size
    record = avc_decoder_configuration(sps, pps)
    assert parse_avc_decoder_configuration(record) == ([sps], [pps])
    sample = annexb_to_length_prefixed(frames[0].data)
    assert split_annexb(length_prefixed_to_annexb(sample)) == nals
    with pytest.raises(EgressError):
        parse_sps(pps)


def test_h264_reordering_within_the_window_changes_nothing() -> None:
    frames = encode_video("libx264", 60, gop=30)
    packets = packetize(H264_CODEC, frames)
    rng = random.Random(7)
    shuffled = packets[:]
    for i in range(1, len(shuffled) - 4, 3):  # the first packet defines where the stream starts
        j = i + rng.randint(0, 3)
        shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    assert shuffled != packets
    assert [u.data for u in run(H264Depacketizer(), shuffled)] == [u.data for u in run(H264Depacketizer(), packets)]


def test_h264_loss_drops_until_the_next_keyframe_and_asks_once() -> None:
    frames = encode_video("libx264", 60, gop=30)
    packets = packetize(H264_CODEC, frames)
    asked: list[int] = []
    dep = H264Depacketizer(on_keyframe_needed=lambda: asked.append(1), reorder_window=4)
    lost_ts = frames[10].pts
    victim = next(i for i, p in enumerate(packets) if p.timestamp == lost_ts)
    units = run(dep, packets[:victim] + packets[victim + 1:])
    assert [u.pts for u in units] == [f.pts for f in frames[:10]] + [f.pts for f in frames[30:]]
    assert asked == [1]
    # Frame 10 itself counts as dropped when some of its packets did arrive.
    partial = sum(p.timestamp == lost_ts for p in packets) > 1
    assert dep.lost == 1 and dep.dropped == 19 + partial and dep.frames == 40
    assert decode_count("h264", units) == 40


def test_h264_start_mid_stream_waits_for_a_keyframe() -> None:
    frames = encode_video("libx264", 60, gop=30)
    packets = packetize(H264_CODEC, frames)
    first = next(i for i, p in enumerate(packets) if p.timestamp == frames[5].pts) + 1  # mid-picture
    asked: list[int] = []
    units = run(H264Depacketizer(on_keyframe_needed=lambda: asked.append(1)), packets[first:])
    assert units[0].pts == frames[30].pts and units[0].keyframe and len(units) == 30
    assert asked == [1]


def test_h264_lost_fu_a_end_drops_that_picture() -> None:
    frames = encode_video("libx264", 30, gop=30)
    packets = packetize(H264_CODEC, frames)
    key = [p for p in packets if p.timestamp == frames[0].pts]
    assert len(key) > 2 and key[-1].payload[0] & 0x1F == 28
    # The end fragment of the key frame is lost and nothing else: the seq gap is seen, the picture is dropped.
    units = run(H264Depacketizer(reorder_window=2), packets[: len(key) - 1] + packets[len(key):])
    assert units == []


def test_malformed_h264_payloads_are_dropped_not_raised() -> None:
    dep = H264Depacketizer()
    bad = [b"", b"\x18\x00", b"\x18\x00\x05\x65", b"\x1c", b"\x1c\x45\x00", b"\x19abc", b"\x1a\x00"]
    out: list[AccessUnit] = []
    for i, payload in enumerate(bad):
        out += dep.push(RtpPacket(sequence_number=i, timestamp=i * 3000, marker=1, payload=payload))
    assert out == [] and dep.dropped == len(bad)


def test_vp8_frames_match_encoder_and_decode() -> None:
    frames = encode_video("libvpx", 60, gop=30)
    packets = packetize(VP8_CODEC, frames, seq0=65530)
    assert len(packets) > len(frames)
    units = run(Vp8Depacketizer(), packets)
    assert [u.data for u in units] == [f.data for f in frames]
    assert [u.keyframe for u in units] == [f.keyframe for f in frames]
    assert units[0].keyframe and units[30].keyframe and not units[1].keyframe
    assert decode_count("vp8", units) == 60


def test_vp8_loss_waits_for_keyframe() -> None:
    frames = encode_video("libvpx", 60, gop=30)
    packets = packetize(VP8_CODEC, frames)
    victim = next(i for i, p in enumerate(packets) if p.timestamp == frames[3].pts)
    asked: list[int] = []
    units = run(Vp8Depacketizer(on_keyframe_needed=lambda: asked.append(1)), packets[:victim] + packets[victim + 1:])
    assert [u.pts for u in units] == [f.pts for f in frames[:3]] + [f.pts for f in frames[30:]]
    assert asked == [1]


def test_opus_one_packet_one_frame_and_loss_costs_one_frame() -> None:
    frames = encode_opus(1.0)
    packets = packetize(OPUS_CODEC, frames, ts0=0xFFFFFFFF - 960 * 10)
    units = run(OpusDepacketizer(), packets[:20] + packets[21:])
    assert len(units) == len(frames) - 1
    assert all(u.keyframe for u in units)
    assert [u.data for u in units] == [f.data for f in frames[:20] + frames[21:]]
    assert units[30].pts - units[0].pts == frames[31].pts - frames[0].pts


def test_factory_refuses_other_codecs() -> None:
    assert isinstance(depacketizer_for("video/H264"), H264Depacketizer)
    assert isinstance(depacketizer_for("audio/opus"), OpusDepacketizer)
    with pytest.raises(EgressError) as e:
        depacketizer_for("video/AV1")
    assert e.value.code == "unsupported_codec"
