"""Transport-cc feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01): bytes, limits, round trips."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.sfu.twcc import (
    DELTA_TICK_US,
    REFERENCE_TICK_US,
    REFERENCE_WRAP,
    FeedbackReader,
    FeedbackRecorder,
    iter_rtcp,
    pack_transport_seq,
    parse_transport_feedback,
    read_transport_seq,
    transport_seq_element,
    unpack_transport_seq,
)

# A transport-cc packet Chrome sent, as dissected by Wireshark (olivermichel/webrtc-analysis,
# test/include/data.h): base seq 1, 9 packets, reference time 6197520, one run-length chunk (0x2009: 9 small
# deltas), deltas 7, 3, 11, 14, 0, 1, 0, 2, 6 ms, one byte of padding with the P bit.
CHROME_FEEDBACK = bytes.fromhex("afcd000700000001dd586eb6000100095e91100020091c0c2c38000400081801")
CHROME_DELTAS_MS = [7, 3, 11, 14, 0, 1, 0, 2, 6]

# Chrome RTP packets from the same capture: transport-wide sequence number 0x009b under ID 4, in a one-byte
# header (with abs-send-time and a dependency descriptor), and 0x0002 in a two-byte header (profile 0x1000).
RTP_ONE_BYTE = bytes.fromhex("902d1a5fd4090549f7b16e83bede000322f3435041009bd281004500")
RTP_TWO_BYTE = bytes.fromhex(
    "902d61c5950a0fee8d3814e510000011"  # header; profile 0x1000, 17 words of extensions
    "020303f7ae" "04020002" "090130" "030100" "060102"  # IDs 2, 4 (0x0002), 9, 3, 6
    "070d0100010007000700" "0a00000000"  # ID 7, 13 bytes
    "0d21c00001800318" "7aaaf130a0a014d141382304600864222226" "5009f0077013f00ef0"  # ID 13, 33 bytes
)


def test_chrome_feedback_is_built_byte_for_byte() -> None:
    recorder = FeedbackRecorder(sender_ssrc=1)
    arrival = 6197520 * REFERENCE_TICK_US
    for i, delta_ms in enumerate(CHROME_DELTAS_MS):
        arrival += delta_ms * 1000
        recorder.record(1 + i, arrival)
    assert recorder.build(media_ssrc=0xDD586EB6) == [CHROME_FEEDBACK]
    assert recorder.build() == []  # nothing new


def test_chrome_feedback_parses() -> None:
    feedback = parse_transport_feedback(CHROME_FEEDBACK)
    assert (feedback.sender_ssrc, feedback.media_ssrc) == (1, 0xDD586EB6)
    assert (feedback.base_seq, feedback.reference_time, feedback.feedback_count) == (1, 6197520, 0)
    arrival = 6197520 * REFERENCE_TICK_US
    expected = []
    for i, delta_ms in enumerate(CHROME_DELTAS_MS):
        arrival += delta_ms * 1000
        expected.append((1 + i, arrival))
    assert feedback.packets == expected


def test_header_extension_value() -> None:
    assert pack_transport_seq(0x1234) == b"\x12\x34"
    assert pack_transport_seq(0x10001) == b"\x00\x01"
    assert unpack_transport_seq(b"\xff\xfe") == 0xFFFE
    assert transport_seq_element(4, 0x009B) == b"\x41\x00\x9b"  # as in RTP_ONE_BYTE
    for bad in (b"", b"\x01", b"\x01\x02\x03"):
        try:
            unpack_transport_seq(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    for bad_id in (0, 15):
        try:
            transport_seq_element(bad_id, 1)
        except ValueError:
            continue
        raise AssertionError(bad_id)


def test_read_transport_seq_from_raw_packets() -> None:
    assert read_transport_seq(RTP_ONE_BYTE, 4) == 0x009B
    assert read_transport_seq(RTP_ONE_BYTE, 2) is None  # abs-send-time is 3 bytes, not a sequence number
    assert read_transport_seq(RTP_ONE_BYTE, 5) is None
    assert read_transport_seq(RTP_TWO_BYTE, 4) == 0x0002
    assert read_transport_seq(RTP_TWO_BYTE, 9) is None  # one byte long
    no_extension = bytes([0x80]) + RTP_ONE_BYTE[1:12] + b"payload"
    assert read_transport_seq(no_extension, 4) is None
    for cut in range(len(RTP_ONE_BYTE)):  # truncated anywhere: None, never an exception
        assert read_transport_seq(RTP_ONE_BYTE[:cut], 4) in (None, 0x009B)
    assert read_transport_seq(b"", 4) is None


def test_read_transport_seq_matches_aiortc() -> None:
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
    from aiortc.rtp import HeaderExtensionsMap, RtpPacket

    ext_map = HeaderExtensionsMap()
    ext_map.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
        RTCRtpHeaderExtensionParameters(id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"),
        RTCRtpHeaderExtensionParameters(
            id=5, uri="http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"),
    ]))
    rng = random.Random(5)
    for _ in range(200):
        packet = RtpPacket(payload_type=96, sequence_number=rng.getrandbits(16), payload=rng.randbytes(30))
        seq = rng.getrandbits(16)
        packet.extensions.transport_sequence_number = seq
        if rng.random() < 0.5:
            packet.extensions.mid = rng.choice(["0", "video", "x" * 16])
        if rng.random() < 0.5:
            packet.extensions.abs_send_time = rng.getrandbits(24)
        data = packet.serialize(ext_map)
        assert read_transport_seq(data, 5) == seq
        assert RtpPacket.parse(data, ext_map).extensions.transport_sequence_number == seq


def sizes(received: list[int], times_us: list[int] | None = None, delta_us: int = 1000) -> int:
    """Build feedback for ``received`` (times default to seq × delta, as libwebrtc's FeedbackTester does)
    and check the parse; returns the packet's size in bytes."""
    if times_us is None:
        times_us, offset, last = [], 0, received[0]
        for seq in received:
            if seq < last:
                offset += 0x10000 * delta_us
            last = seq
            times_us.append(offset + seq * delta_us)
    recorder = FeedbackRecorder(sender_ssrc=7)
    for seq, t in zip(received, times_us, strict=True):
        recorder.record(seq, t)
    [packet] = recorder.build()
    feedback = parse_transport_feedback(packet)
    got = {seq: t for seq, t in feedback.packets if t is not None}
    assert sorted(got) == sorted(received)
    for seq, t in zip(received, times_us, strict=True):
        assert abs(got[seq] - t) <= DELTA_TICK_US // 2
    assert all(t is None for seq, t in feedback.packets if seq not in received)
    return len(packet)


def words(n: int) -> int:
    return (n + 3) // 4 * 4


# Sizes from libwebrtc's transport_feedback_unittest.cc: header 20 bytes, 2 per status chunk, 1 per small
# delta, 2 per large one, rounded up to whole 32-bit words.
def test_one_bit_vector() -> None:
    assert sizes([1, 2, 7, 8, 9, 10, 13]) == words(20 + 2 + 7)
    assert sizes([1, 2, 7, 8, 9, 10, 13, 14]) == words(20 + 2 + 8)


def test_sequence_number_wrap() -> None:
    assert sizes([0xFFFD, 0xFFFE, 0xFFFF, 0, 1, 2]) == words(20 + 2 + 6)
    assert sizes([0xFFFD, 0xFFFE, 1, 2]) == words(20 + 2 + 4)


def test_two_bit_vectors() -> None:
    large = 256 * DELTA_TICK_US  # one tick beyond a small delta
    assert sizes([1, 2, 6, 7], delta_us=large) == words(20 + 2 + 1 + 3 * 2)
    assert sizes([1, 2, 6, 7, 8], delta_us=large) == words(20 + 2 * 2 + 1 + 4 * 2)


def test_large_and_negative_deltas() -> None:
    times = [2000, 1000, 4000, 3000, 3000 + 256 * DELTA_TICK_US]
    assert sizes([1, 2, 6, 7, 8], times) == words(20 + 2 * 2 + 2 * 1 + 3 * 2)


def test_run_lengths() -> None:
    # 1 received + 13 lost (one-bit vector), a run of lost of the maximum length 8191, 1 received.
    assert sizes([0, (1 << 13) - 1 + 14], [1000, 2000]) == words(20 + 3 * 2 + 2)
    assert sizes([0, 14 * 2 + 1], [1000, 2000]) == words(20 + 3 * 2 + 2)


def test_one_to_two_bit_split() -> None:
    large = 256 * DELTA_TICK_US
    assert sizes([0, 6], [0, large]) == words(20 + 2 + 1 + 2)
    assert sizes([0, 7], [0, large]) == words(20 + 2 * 2 + 1 + 2)
    times = [1000]
    for i in range(1, 22):
        times.append(times[-1] + (large if i == 8 else 1000))
    assert sizes(list(range(22)), times) == words(20 + 3 * 2 + 21 + 2)


def test_chunk_bytes() -> None:
    recorder = FeedbackRecorder(sender_ssrc=0)
    for seq in (0, 2):  # received, lost, received with a large delta
        recorder.record(seq, seq * 100_000)
    [packet] = recorder.build()
    # Two-bit vector 11 01 00 10 (then 3 unused symbols): 0xC000 | 1 << 12 | 2 << 8.
    assert packet[20:22] == b"\xd2\x00"
    assert packet[12:16] == b"\x00\x00\x00\x03"  # base 0, 3 statuses
    delta = struct.unpack("!h", packet[23:25])[0]
    assert delta == 200_000 // DELTA_TICK_US


def test_reports_losses_and_counts_feedback() -> None:
    recorder = FeedbackRecorder(sender_ssrc=0)
    recorder.record(1000, 10_000)
    recorder.record(1003, 12_000)
    first = parse_transport_feedback(recorder.build()[0])
    assert [(s, t is None) for s, t in first.packets] == [(1000, False), (1001, True), (1002, True), (1003, False)]
    recorder.record(1004, 13_000)
    second = parse_transport_feedback(recorder.build()[0])
    assert second.base_seq == 1004 and second.feedback_count == first.feedback_count + 1


def test_late_packet_is_reported_again_and_old_ones_are_ignored() -> None:
    recorder = FeedbackRecorder(sender_ssrc=0, back_window_us=500_000)
    for seq in range(100, 110):
        if seq != 105:
            recorder.record(seq, seq * 1000)
    lost = parse_transport_feedback(recorder.build()[0])
    assert dict(lost.packets)[105] is None
    recorder.record(105, 111_000)  # arrives late, within the window
    recorder.record(110, 112_000)
    again = parse_transport_feedback(recorder.build()[0])
    assert again.base_seq == 105
    assert dict(again.packets)[105] is not None and dict(again.packets)[110] is not None
    # A second later, the old numbers are forgotten: a straggler is counted as too old and not reported.
    for seq in range(111, 120):
        recorder.record(seq, 1_200_000 + seq)
    recorder.build()
    recorder.record(101, 1_300_000)
    recorder.record(120, 1_300_000)
    [packet] = recorder.build()
    assert parse_transport_feedback(packet).base_seq == 120
    assert recorder.stats.too_old == 1
    recorder.record(120, 1_300_100)
    assert recorder.build() == [] and recorder.stats.duplicates == 1


def test_max_packet_size_splits_feedback() -> None:
    recorder = FeedbackRecorder(sender_ssrc=0, max_packet_size=64)
    rng = random.Random(1)
    times = {}
    t = 0
    for seq in range(500):
        t += rng.choice([100, 1000, 70_000, 300_000])  # small and large deltas
        if rng.random() < 0.8:
            times[seq] = t
            recorder.record(seq, t)
    packets = recorder.build()
    assert len(packets) > 10
    assert all(len(p) <= 64 for p in packets)
    seen: dict[int, int | None] = {}
    reader = FeedbackReader()
    for packet in packets:
        for seq, arrival in reader.read(packet):
            assert seq not in seen or seen[seq] is None  # each status once (losses may repeat)
            seen[seq] = arrival
    assert {s for s, a in seen.items() if a is not None} == set(times)
    base = next(a - times[s] for s, a in seen.items() if a is not None)
    assert all(abs(a - times[s] - base) <= DELTA_TICK_US // 2 for s, a in seen.items() if a is not None)


def test_delta_beyond_16_bits_starts_a_new_packet() -> None:
    recorder = FeedbackRecorder(sender_ssrc=0)
    recorder.record(1, 0)
    recorder.record(2, 9_000_000)  # 36000 ticks: more than a signed 16-bit delta
    packets = recorder.build()
    assert len(packets) == 2
    assert [parse_transport_feedback(p).base_seq for p in packets] == [1, 2]


def test_wild_jump_is_bounded() -> None:
    recorder = FeedbackRecorder(sender_ssrc=0)
    recorder.record(0, 0)
    recorder.build()
    recorder.record(30_000, 1000)
    packets = recorder.build()
    total = sum(len(parse_transport_feedback(p).packets) for p in packets)
    assert total <= FeedbackRecorder.MAX_SPAN + 1
    assert sum(len(p) for p in packets) < 100  # run-length chunks


def test_iter_rtcp_splits_compound_and_stops_on_garbage() -> None:
    receiver_report = bytes.fromhex("81c90007") + bytes(28)
    compound = receiver_report + CHROME_FEEDBACK
    assert [(pt, fmt, len(p)) for pt, fmt, p in iter_rtcp(compound)] == [(201, 1, 32), (205, 15, 32)]
    assert list(iter_rtcp(compound[:40])) == [(201, 1, receiver_report)]  # truncated second packet
    assert list(iter_rtcp(b"\x00" * 8)) == []  # version 0
    reader = FeedbackReader()
    assert len(reader.read(compound)) == 9 and reader.messages == 1


def test_parser_rejects_malformed() -> None:
    bad = [
        CHROME_FEEDBACK[:21],  # too short
        CHROME_FEEDBACK[:14] + b"\x00\x00" + CHROME_FEEDBACK[16:],  # zero status count
        CHROME_FEEDBACK[:14] + b"\x00\x40" + CHROME_FEEDBACK[16:],  # 64 statuses, 9 deltas
        CHROME_FEEDBACK[:20] + b"\xff\xff" + CHROME_FEEDBACK[22:],  # two-bit vector of reserved symbols
        b"\x8e" + CHROME_FEEDBACK[1:],  # FMT 14
    ]
    for packet in bad:
        try:
            parse_transport_feedback(packet)
        except ValueError:
            continue
        raise AssertionError(packet.hex())
    reader = FeedbackReader()
    assert reader.read(b"".join(p + bytes(-len(p) % 4) for p in bad[1:4])) == [] or reader.errors


def test_zero_padding_without_p_bit_parses() -> None:
    # Old clients padded with zeros without setting P (libwebrtc keeps parsing those).
    packet = bytes([CHROME_FEEDBACK[0] & ~0x20]) + CHROME_FEEDBACK[1:-1] + b"\x00"
    assert len(parse_transport_feedback(packet).packets) == 9


@settings(max_examples=150, deadline=None)
@given(
    base=st.integers(0, 0xFFFF),
    start_us=st.integers(0, 2 * REFERENCE_WRAP * REFERENCE_TICK_US),
    steps=st.lists(st.tuples(st.booleans(), st.integers(-20_000, 300_000)), min_size=1, max_size=400),
    shuffle_seed=st.integers(0, 1000),
    build_every=st.integers(1, 60),
    max_size=st.sampled_from([64, 200, 1200]),
)
def test_round_trip_with_loss_and_reordering(base: int, start_us: int, steps: list[tuple[bool, int]],
                                             shuffle_seed: int, build_every: int, max_size: int) -> None:
    """Whatever arrives, in whatever order: every packet ends up reported received at its arrival time
    (within half a tick), each lost one as not received, and no feedback packet exceeds the size limit."""
    truth: dict[int, int] = {}
    t = start_us
    for i, (received, jitter) in enumerate(steps):
        t = max(0, t + jitter)
        if received:
            truth[(base + i) & 0xFFFF] = t
    if not truth:
        return
    order = list(truth.items())
    rng = random.Random(shuffle_seed)
    for i in range(len(order) - 1):  # local reordering only (a few places), as networks do
        if rng.random() < 0.2:
            j = min(len(order) - 1, i + rng.randint(1, 3))
            order[i], order[j] = order[j], order[i]
    recorder = FeedbackRecorder(sender_ssrc=1, max_packet_size=max_size, back_window_us=10**12)
    reader = FeedbackReader()
    status: dict[int, int | None] = {}
    for i, (seq, arrival) in enumerate(order):
        recorder.record(seq, arrival)
        if i % build_every == 0 or i == len(order) - 1:
            for packet in recorder.build():
                assert len(packet) <= max_size
                for s, a in reader.read(packet):
                    if status.get(s) is None:
                        status[s] = a
    assert {s for s, a in status.items() if a is not None} == set(truth)
    wrap = REFERENCE_WRAP * REFERENCE_TICK_US
    offsets = {(status[s] - truth[s]) for s in truth}  # type: ignore[operator]
    anchor = min(offsets)
    for off in offsets:
        assert abs(off - anchor) <= DELTA_TICK_US or abs((off - anchor) % wrap) <= DELTA_TICK_US
    assert reader.errors == 0
