"""VP8 payload descriptor (RFC 7741 §4.2) and the munger, on synthetic three-layer L1T3 simulcast streams."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from aiortc.codecs.vpx import VpxPayloadDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.sfu.rtp import vp8_is_keyframe_start
from chorus.sfu.vp8 import Vp8Munger, parse_vp8

# --- parsing ------------------------------------------------------------------------------------------


def test_parse_chromium_descriptor() -> None:
    # X; I L T; picture id 0x1234 (M=1); TL0PICIDX 0x56; TID 2, Y; then a key frame's payload header (P=0).
    d = parse_vp8(bytes([0x90, 0xE0, 0x92, 0x34, 0x56, 0xA0, 0x00, 0x9D]))
    assert d is not None
    assert (d.size, d.start, d.partition, d.picture_id, d.picture_id_bits) == (6, True, 0, 0x1234, 15)
    assert (d.tl0picidx, d.tid, d.layer_sync, d.keyidx, d.keyframe) == (0x56, 2, True, None, True)
    assert (d.tl0picidx_at, d.tk_at) == (4, 5)


def test_parse_minimal_and_keyframe_rules() -> None:
    d = parse_vp8(bytes([0x10, 0x00]))  # no X: S=1, PID 0, key frame
    assert d is not None and d.size == 1 and d.keyframe and d.picture_id is None and d.tid is None
    assert parse_vp8(bytes([0x10, 0x01])).keyframe is False  # type: ignore[union-attr]  # P=1: inter frame
    assert parse_vp8(bytes([0x00, 0x00])).keyframe is False  # type: ignore[union-attr]  # not a start
    assert parse_vp8(bytes([0x11, 0x00])).keyframe is False  # type: ignore[union-attr]  # partition 1
    d7 = parse_vp8(bytes([0x90, 0x90, 0x05, 0x0B, 0x00]))  # I (7-bit id 5) and K (KEYIDX 11)
    assert d7 is not None and (d7.picture_id, d7.picture_id_bits, d7.keyidx, d7.tid, d7.size) == (5, 7, 11, None, 4)
    assert d7.tk_at == 3


def test_parse_truncated_is_none() -> None:
    full = bytes([0x90, 0xF0, 0x92, 0x34, 0x56, 0xA0, 0x00])
    assert parse_vp8(full) is not None
    for cut in range(len(full)):
        assert parse_vp8(full[:cut]) is None  # the VP8 payload header byte is required too


@settings(max_examples=300, deadline=None)
@given(start=st.booleans(), partition=st.integers(0, 7), picture_id=st.one_of(st.none(), st.integers(0, 0x7FFF)),
       tl0=st.one_of(st.none(), st.integers(0, 255)), tid=st.one_of(st.none(), st.tuples(st.integers(0, 3),
                                                                                    st.integers(0, 1))),
       keyidx=st.one_of(st.none(), st.integers(0, 31)), header=st.integers(0, 255))
def test_parse_matches_aiortc(start: bool, partition: int, picture_id: int | None, tl0: int | None,
                              tid: tuple[int, int] | None, keyidx: int | None, header: int) -> None:
    descriptor = VpxPayloadDescriptor(int(start), partition, picture_id, tl0, tid, keyidx)
    payload = bytes(descriptor) + bytes([header, 1, 2])
    ours = parse_vp8(payload)
    theirs, rest = VpxPayloadDescriptor.parse(payload)
    assert ours is not None
    assert ours.size == len(payload) - len(rest)
    assert (ours.start, ours.partition) == (bool(theirs.partition_start), theirs.partition_id)
    assert (ours.picture_id, ours.tl0picidx, ours.keyidx) == (theirs.picture_id, theirs.tl0picidx, theirs.keyidx)
    assert (ours.tid, int(ours.layer_sync)) == ((theirs.tid[0], theirs.tid[1]) if theirs.tid else (None, 0))
    assert ours.keyframe == vp8_is_keyframe_start(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12))
def test_parse_garbage_never_raises(data: bytes) -> None:
    d = parse_vp8(data)
    assert d is None or d.size < len(data)


# --- synthetic L1T3 simulcast -------------------------------------------------------------------------

#: libwebrtc's three-layer pattern: TL0, TL2 (sync: refers to TL0 only), TL1 (sync), TL2.
PATTERN = [(0, False), (2, True), (1, True), (2, False)]


@dataclass
class Frame:
    layer: int
    picture_id: int
    tl0: int
    tid: int
    sync: bool
    keyframe: bool
    payloads: list[bytes]


class Layer:
    """One simulcast encoding: its own random picture-id and TL0PICIDX bases, as Chromium's are (M6)."""

    def __init__(self, index: int, rng: random.Random, seven_bit: bool = False) -> None:
        self.index = index
        self.rng = rng
        self.seven_bit = seven_bit
        self.picture_id = rng.randrange(128 if seven_bit else 1 << 15)
        self.tl0 = rng.randrange(256)
        self.since_key = 0
        self.first = True

    def frame(self, keyframe: bool) -> Frame:
        if keyframe:
            self.since_key = 0
        tid, sync = PATTERN[self.since_key % 4]
        self.since_key += 1
        if not self.first:
            self.picture_id = (self.picture_id + 1) % (128 if self.seven_bit else 1 << 15)
            if tid == 0:
                self.tl0 = (self.tl0 + 1) & 0xFF
        self.first = False
        payloads = []
        for i in range(self.rng.randint(1, 3)):
            pid_bytes = (bytes([self.picture_id]) if self.seven_bit
                         else bytes([0x80 | self.picture_id >> 8, self.picture_id & 0xFF]))
            descriptor = bytes([0x90 if i == 0 else 0x80, 0xE0]) + pid_bytes + bytes([self.tl0, tid << 6 | sync << 5])
            header = bytes([0x00 if keyframe else 0x01]) if i == 0 else b""
            payloads.append(descriptor + header + self.rng.randbytes(self.rng.randint(5, 40)))
        return Frame(self.index, self.picture_id, self.tl0, tid, sync, keyframe, payloads)


@dataclass
class Sent:
    source: int
    source_picture: int
    picture_id: int
    tl0: int
    tid: int
    sync: bool
    keyframe: bool
    target_temporal: int


def run_forwarder(seed: int, frames: int = 600, *, seven_bit_layer: int | None = None,
                  temporal_changes: bool = True, reorder: bool = False) -> tuple[list[Sent], list[int]]:
    """
    Three layers in lockstep; a subscriber whose wanted layer and temporal target change at random; switches
    happen at the wanted layer's next key frame (requested, arriving 2-6 frames later), as the Consumer will
    do. Returns what the munger sent and the frame indices where switches landed.
    """
    rng = random.Random(seed)
    shuffle = random.Random(-seed)  # separate, so that reordering leaves the streams themselves unchanged
    layers = [Layer(i, rng, seven_bit=(i == seven_bit_layer)) for i in range(3)]
    munger = Vp8Munger()
    current, wanted = 0, 0
    keyframe_due: dict[int, int] = {0: 0}
    sent: list[Sent] = []
    switches = []
    held: tuple[Frame, bytes] | None = None
    for f in range(frames):
        if rng.random() < 0.02:
            wanted = rng.randrange(3)
            if wanted != current and wanted not in keyframe_due:
                keyframe_due[wanted] = f + rng.randint(2, 6)
        if temporal_changes and rng.random() < 0.03:
            munger.target_temporal = rng.randrange(3)
        produced = [layer.frame(keyframe_due.get(layer.index) == f) for layer in layers]
        for layer in layers:
            if keyframe_due.get(layer.index) == f:
                del keyframe_due[layer.index]
        if wanted != current and produced[wanted].keyframe:
            current = wanted
            switches.append(f)
        frame = produced[current]
        items = [(frame, p) for p in frame.payloads]
        if reorder and not frame.keyframe:
            if len(items) > 1 and shuffle.random() < 0.5:
                items.reverse()  # a later packet of the picture overtakes its first one
            if held is not None and held[0].layer == frame.layer:
                items.insert(1, held)  # the previous picture's last packet arrives after this one's first
            held = None
            if len(items) > 1 and shuffle.random() < 0.3:
                held = items.pop()
        elif held is not None:
            items.insert(0, held)
            held = None
        for frame_of, payload in items:
            out = munger.munge(payload, frame_of.layer)
            if out is None:
                continue
            assert len(out) == len(payload)
            d = parse_vp8(out)
            assert d is not None
            assert out[d.size:] == payload[d.size:]  # only descriptor fields change
            src = parse_vp8(payload)
            assert src is not None and (d.start, d.partition, d.tid, d.layer_sync) == (
                src.start, src.partition, src.tid, src.layer_sync)
            assert d.picture_id is not None and d.tl0picidx is not None and d.tid is not None
            sent.append(Sent(frame_of.layer, frame_of.picture_id, d.picture_id, d.tl0picidx, d.tid, d.layer_sync,
                             d.keyframe, munger.target_temporal))
    return sent, switches


def pictures(sent: list[Sent]) -> list[Sent]:
    """One entry per output picture, in order (first packet of each)."""
    out: list[Sent] = []
    seen = set()
    for s in sent:
        key = (s.source, s.source_picture)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_switches_and_temporal_drops_keep_the_stream_continuous(seed: int) -> None:
    sent, switches = run_forwarder(seed)
    assert switches, "the run should switch at least once"
    pics = pictures(sent)
    # All packets of one picture carry the same picture id and TL0PICIDX.
    by_picture: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for s in sent:
        by_picture.setdefault((s.source, s.source_picture), set()).add((s.picture_id, s.tl0))
    assert all(len(v) == 1 for v in by_picture.values())
    for prev, cur in zip(pics, pics[1:], strict=False):
        # Picture ids go up by exactly one: no gap for a decoder to take for a lost frame.
        assert cur.picture_id == (prev.picture_id + 1) % (1 << 15), (prev, cur)
        # TL0PICIDX goes up by one on each TL0 frame and stays put on the others.
        assert cur.tl0 == ((prev.tl0 + 1) & 0xFF if cur.tid == 0 else prev.tl0), (prev, cur)
        if cur.source != prev.source:
            assert cur.keyframe  # every switch lands on a key frame
        assert cur.tid <= max(cur.target_temporal, 0) or cur.keyframe
    sources = {p.source for p in pics}
    assert len(sources) >= 2


def test_lowering_the_temporal_target_drops_whole_pictures_at_once() -> None:
    rng = random.Random(7)
    layer = Layer(0, rng)
    munger = Vp8Munger(target_temporal=2)
    out_tids = []
    for f in range(40):
        if f == 20:
            munger.target_temporal = 0
        frame = layer.frame(keyframe=f == 0)
        results = [munger.munge(p, 0) for p in frame.payloads]
        assert all(r is None for r in results) or all(r is not None for r in results)  # whole pictures
        if results[0] is not None:
            out_tids.append((f, frame.tid))
    assert all(tid == 0 for f, tid in out_tids if f >= 20)
    assert {tid for f, tid in out_tids if f < 20} == {0, 1, 2}
    assert len([f for f, _ in out_tids if f >= 20]) == 5  # a quarter of the frames: TL0 only


def test_raising_the_temporal_target_waits_for_layer_sync_frames() -> None:
    rng = random.Random(8)
    layer = Layer(0, rng)
    munger = Vp8Munger(target_temporal=0)
    forwarded = []
    for f in range(40):
        if f == 9:  # just after a TL0 frame, mid-pattern
            munger.target_temporal = 2
        frame = layer.frame(keyframe=f == 0)
        if munger.munge(frame.payloads[0], 0) is not None:
            forwarded.append((f, frame.tid, frame.sync))
    after = [(f, tid, sync) for f, tid, sync in forwarded if f >= 9]
    first_t1 = next(x for x in after if x[1] == 1)
    first_t2 = next(x for x in after if x[1] == 2)
    assert first_t1[2] and first_t2[2]  # each layer starts at one of its sync frames
    assert first_t1[0] < first_t2[0]  # one layer at a time
    assert not [x for x in after if x[1] == 2 and x[0] < first_t1[0]]


def test_reordered_packets_get_the_ids_of_an_in_order_run() -> None:
    for seed in range(6):
        in_order, _ = run_forwarder(seed, temporal_changes=False)
        shuffled, _ = run_forwarder(seed, temporal_changes=False, reorder=True)
        expected = {(s.source, s.source_picture): s.picture_id for s in in_order}
        assert {(s.source, s.source_picture): s.picture_id for s in shuffled} == expected


def test_late_dropped_picture_leaves_a_gap_but_never_a_duplicate() -> None:
    munger = Vp8Munger(target_temporal=1)
    def payload(pid: int, tid: int, key: bool = False) -> bytes:
        return bytes([0x90, 0xE0, 0x80 | pid >> 8, pid & 0xFF, 7, tid << 6, 0x00 if key else 0x01, 0xAA])
    ids = []
    for pid, tid in [(100, 0), (102, 1), (103, 0)]:
        out = munger.munge(payload(pid, tid, key=pid == 100), 0)
        assert out is not None
        ids.append(parse_vp8(out).picture_id)  # type: ignore[union-attr]
    assert munger.munge(payload(101, 2), 0) is None  # late, above the target: dropped
    assert ids == [100, 102, 103]  # 101 stays a gap (the decoder treats it as a lost TL2 frame)
    late = munger.munge(payload(101, 1), 0)  # had it been wanted, it would have kept its place
    assert late is None  # (the same picture id was already decided: dropped)


def test_late_first_packet_of_a_wanted_picture_keeps_its_place() -> None:
    munger = Vp8Munger(target_temporal=1)
    def payload(pid: int, tid: int) -> bytes:
        return bytes([0x90, 0xE0, 0x80 | pid >> 8, pid & 0xFF, 7, tid << 6, 0x00 if pid == 100 else 0x01])
    out = {}
    for pid, tid in [(100, 0), (102, 2), (103, 0), (101, 1)]:  # 101 arrives last; 102 is above the target
        result = munger.munge(payload(pid, tid), 0)
        out[pid] = None if result is None else parse_vp8(result).picture_id  # type: ignore[union-attr]
    assert out == {100: 100, 101: 101, 102: None, 103: 102}


def test_a_late_packet_does_not_rewind_the_switch_point() -> None:
    munger = Vp8Munger()
    def payload(pid: int, tl0: int, start: bool = True) -> bytes:
        return bytes([0x90 if start else 0x80, 0xE0, 0x80 | pid >> 8, pid & 0xFF, tl0, 0x00, 0x00])
    munger.munge(payload(100, 7), "a")
    munger.munge(payload(101, 8), "a")
    munger.munge(payload(100, 7, start=False), "a")  # a straggler of the older picture
    switched = parse_vp8(munger.munge(payload(9000, 200), "b"))  # type: ignore[arg-type]
    assert switched is not None and (switched.picture_id, switched.tl0picidx) == (102, 9)


def test_seven_bit_ids_keep_their_width() -> None:
    sent, switches = run_forwarder(3, seven_bit_layer=1, temporal_changes=True)
    assert switches
    pics = pictures(sent)
    for prev, cur in zip(pics, pics[1:], strict=False):
        if cur.source == 1:
            assert cur.picture_id < 128  # written in 7 bits
        # Continuous modulo the narrower width whenever a 7-bit picture is involved.
        modulus = 128 if 1 in (prev.source, cur.source) else 1 << 15
        assert cur.picture_id % modulus == (prev.picture_id + 1) % modulus, (prev, cur)


def test_keyidx_is_rebased_on_switch() -> None:
    munger = Vp8Munger()
    def payload(pid: int, keyidx: int) -> bytes:  # X; I, K; 15-bit id; KEYIDX
        return bytes([0x90, 0x90, 0x80 | pid >> 8, pid & 0xFF, keyidx, 0x00])
    a = parse_vp8(munger.munge(payload(10, 3), "a"))  # type: ignore[arg-type]
    b = parse_vp8(munger.munge(payload(5000, 20), "b"))  # type: ignore[arg-type]
    assert a is not None and b is not None
    assert (a.picture_id, a.keyidx) == (10, 3)
    assert (b.picture_id, b.keyidx) == (11, 4)


def test_garbage_is_dropped() -> None:
    munger = Vp8Munger()
    assert munger.munge(b"", 0) is None
    assert munger.munge(b"\x90", 0) is None
