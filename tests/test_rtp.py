"""The forwarding path's byte-level helpers, checked against aiortc's own code."""

from __future__ import annotations

import random

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from chorus.sfu.rtp import RtpWriter, h264_is_keyframe_start, vp8_is_keyframe_start

URIS = {
    "mid": "urn:ietf:params:rtp-hdrext:sdes:mid",
    "abs": "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "audio": "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
}


def aiortc_map(ids: dict[str, int]) -> HeaderExtensionsMap:
    ext_map = HeaderExtensionsMap()
    ext_map.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=i, uri=URIS[name]) for name, i in ids.items()]))
    return ext_map


@pytest.mark.parametrize("ids", [{}, {"mid": 1}, {"mid": 1, "abs": 3}, {"mid": 1, "audio": 2},
                                 {"mid": 9, "abs": 14, "audio": 4}, {"abs": 2}])
def test_writer_matches_aiortc_serialize(ids: dict[str, int]) -> None:
    rng = random.Random(str(ids))
    ext_map = aiortc_map(ids)
    for _ in range(300):
        mid = rng.choice(["0", "1", "12", "abc", "x" * 16])
        writer = RtpWriter(rng.choice([96, 97, 111, 127]), rng.getrandbits(32), mid=mid, mid_id=ids.get("mid"),
                           abs_send_time_id=ids.get("abs"), audio_level_id=ids.get("audio"))
        packet = RtpPacket(marker=rng.randint(0, 1), payload=rng.randbytes(rng.randint(0, 1200)))
        packet.padding_size = rng.choice([0, 0, 0, 1, 7, 255])
        if rng.random() < 0.5:
            packet.extensions.audio_level = (rng.random() < 0.5, rng.randint(0, 127))
        abs_send_time = rng.getrandbits(24)
        seq, ts = rng.getrandbits(16), rng.getrandbits(32)

        expected = RtpPacket(payload_type=writer.payload_type, marker=packet.marker, sequence_number=seq,
                             timestamp=ts, ssrc=writer.ssrc, payload=packet.payload)
        expected.padding_size = packet.padding_size
        expected.extensions.mid = mid
        expected.extensions.abs_send_time = abs_send_time
        expected.extensions.audio_level = packet.extensions.audio_level
        ours = writer.write(packet, seq, ts, abs_send_time.to_bytes(3, "big"))
        theirs = expected.serialize(ext_map)
        # Identical, except the padding filler, which is arbitrary (RFC 3550; aiortc writes random bytes).
        assert len(ours) == len(theirs)
        filler = max(packet.padding_size - 1, 0)
        assert ours[: len(ours) - packet.padding_size] == theirs[: len(theirs) - packet.padding_size]
        assert ours[-1:] == theirs[-1:] if packet.padding_size else ours == theirs
        assert filler == 0 or RtpPacket.parse(ours, ext_map).payload == packet.payload


def vp8_descriptor(*, start: bool, pid: int = 0, picture_id: int | None = None, keyframe: bool) -> bytes:
    first = (0x10 if start else 0) | pid | (0x80 if picture_id is not None else 0)
    out = bytes([first])
    if picture_id is not None:
        out += bytes([0x80]) + bytes([0x80 | (picture_id >> 8), picture_id & 0xFF])  # I bit, 15-bit id
    return out + bytes([0x00 if keyframe else 0x01, 0x9D, 0x01, 0x2A])


def test_vp8_keyframe_start() -> None:
    assert vp8_is_keyframe_start(vp8_descriptor(start=True, keyframe=True))
    assert vp8_is_keyframe_start(vp8_descriptor(start=True, picture_id=1234, keyframe=True))
    assert not vp8_is_keyframe_start(vp8_descriptor(start=True, picture_id=1234, keyframe=False))
    assert not vp8_is_keyframe_start(vp8_descriptor(start=False, keyframe=True))  # a continuation
    assert not vp8_is_keyframe_start(vp8_descriptor(start=True, pid=2, keyframe=True))  # another partition
    assert not vp8_is_keyframe_start(b"\x90\x80")  # truncated
    assert not vp8_is_keyframe_start(b"")


def test_h264_keyframe_start() -> None:
    sps, pps, idr, slice_ = b"\x67\x42", b"\x68\xce", b"\x65\x88", b"\x41\x9a"
    assert h264_is_keyframe_start(sps)
    assert h264_is_keyframe_start(idr)
    assert not h264_is_keyframe_start(slice_)
    assert not h264_is_keyframe_start(pps)

    def stap_a(*nalus: bytes) -> bytes:
        return b"\x18" + b"".join(len(n).to_bytes(2, "big") + n for n in nalus)

    assert h264_is_keyframe_start(stap_a(sps, pps, idr))
    assert not h264_is_keyframe_start(stap_a(slice_))
    fu_a_start = bytes([0x7C, 0x80 | 5]) + b"\x00" * 10
    fu_a_middle = bytes([0x7C, 5]) + b"\x00" * 10
    assert h264_is_keyframe_start(fu_a_start)
    assert not h264_is_keyframe_start(fu_a_middle)
    assert not h264_is_keyframe_start(b"")
