"""Output sequence numbers across drops, reordering, wrap-around and source switches; timestamp rebasing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.sfu.seqmanager import SeqManager, TimestampRebaser


def test_drops_close_up() -> None:
    seqs = SeqManager(first_output=100)
    assert seqs.forward(5000) == 100
    seqs.drop(5001)
    seqs.drop(5002)
    assert seqs.forward(5003) == 101
    assert seqs.forward(5004) == 102
    assert seqs.forward(5001) is None  # a retransmission of a dropped packet is not sent
    assert seqs.last_output == 102


def test_reordered_input_keeps_its_place() -> None:
    seqs = SeqManager(first_output=0)
    assert seqs.forward(10) == 0
    seqs.drop(14)  # 11..13 not seen yet
    assert seqs.forward(15) == 4
    assert [seqs.forward(s) for s in (12, 11, 13)] == [2, 1, 3]


def test_late_drop_leaves_a_gap_and_is_counted() -> None:
    seqs = SeqManager(first_output=0)
    seqs.forward(10)
    seqs.forward(12)
    seqs.drop(11)  # too late: 12 already has output 2
    assert seqs.late_drops == 1
    assert seqs.forward(13) == 3


def test_wraparound() -> None:
    seqs = SeqManager(first_output=0xFFFE)
    out = []
    for i, seq in enumerate(range(65530, 65530 + 20)):
        if i % 3 == 1:
            seqs.drop(seq & 0xFFFF)
        else:
            out.append(seqs.forward(seq & 0xFFFF))
    assert out == [(0xFFFE + i) & 0xFFFF for i in range(len(out))]


def test_switch_follows_the_last_output_and_rejects_the_old_source() -> None:
    seqs = SeqManager(first_output=500)
    for seq in range(1000, 1010):
        seqs.forward(seq)
    seqs.switch()
    assert seqs.forward(40_000) == 510  # the new source's key frame
    assert seqs.forward(40_001) == 511
    assert seqs.forward(39_999) is None  # before the switch point: would collide with what was sent
    seqs.switch()
    seqs.drop(7)  # a new source whose first packet is dropped
    assert seqs.forward(8) == 512


def test_a_jump_beyond_the_window_restarts_without_a_gap() -> None:
    seqs = SeqManager(first_output=0)
    seqs.forward(100)
    seqs.forward(101)
    assert seqs.forward(101 + SeqManager.WINDOW + 1) == 2  # e.g. after a long outage
    assert seqs.forward(102 + SeqManager.WINDOW + 1) == 3
    assert seqs.forward(101) is None  # before the new start


def test_too_old_is_rejected() -> None:
    seqs = SeqManager(first_output=0)
    seqs.forward(0)
    for seq in range(1, SeqManager.WINDOW + 100):
        seqs.forward(seq)
    assert seqs.forward(5) is None


@settings(max_examples=200, deadline=None)
@given(first_in=st.integers(0, 0xFFFF), first_out=st.integers(0, 0xFFFF), seed=st.integers(0, 10**6),
       n=st.integers(1, 3000), drop_rate=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       switches=st.lists(st.integers(1, 2999), max_size=5))
def test_contiguous_and_ordered(first_in: int, first_out: int, seed: int, n: int, drop_rate: float,
                                switches: list[int]) -> None:
    """Whatever is dropped (on arrival, as the forwarder decides) and however packets are locally reordered:
    the outputs of what is forwarded are distinct, contiguous, and in input order, across wraps and switches."""
    rng = random.Random(seed)
    seqs = SeqManager(first_output=first_out)
    outputs: list[int] = []  # unwrapped, in input order
    base = first_in
    segment_start = 0
    for cut in sorted(set(switches) | {n}):
        if cut <= segment_start:
            continue
        order = list(range(segment_start, cut))
        for i in range(1, len(order) - 1):  # swap neighbours, never before the source's first packet
            if rng.random() < 0.2:
                order[i], order[i + 1] = order[i + 1], order[i]
        newest = -1
        forwarded: dict[int, int] = {}
        for index in order:
            seq = (base + index) & 0xFFFF
            if index > newest and rng.random() < drop_rate and index != segment_start:
                seqs.drop(seq)
            else:
                out = seqs.forward(seq)
                assert out is not None
                forwarded[index] = out
            newest = max(newest, index)
        for index in sorted(forwarded):
            outputs.append(forwarded[index])
        segment_start = cut
        base = rng.randrange(0x10000)  # the next source has its own numbering
        seqs.switch()
    unwrapped = [first_out]
    for out in outputs[1:]:
        unwrapped.append(unwrapped[-1] + ((out - unwrapped[-1]) & 0xFFFF))
    assert outputs[0] == first_out
    assert unwrapped == list(range(first_out, first_out + len(outputs)))
    assert seqs.late_drops == 0


def test_timestamps_continue_by_elapsed_time_across_switches() -> None:
    ts = TimestampRebaser(90_000, first_output=1000)
    assert ts.rewrite(555_555, 10.0) == 1000  # first packet: the chosen start
    assert ts.rewrite(555_555 + 3000, 10.033) == 4000
    ts.switch()
    # Another source, its own base; it starts 0.5 s after the last packet: 45000 ticks later.
    assert ts.rewrite(123, 10.533) == 4000 + 45_000
    assert ts.rewrite(123 + 3000, 10.566) == 52_000
    ts.switch()
    assert ts.rewrite(99, 10.566) == 52_000 + 90  # at least 1 ms later, never the same or earlier
    assert ts.last_output == 52_090


def test_timestamps_wrap_and_stay_monotonic() -> None:
    rng = random.Random(4)
    ts = TimestampRebaser(90_000, first_output=0xFFFF_F000)
    now = 0.0
    last = None
    for _ in range(50):
        ts.switch()
        base = rng.getrandbits(32)
        for frame in range(rng.randint(1, 30)):
            now += 1 / 30
            out = ts.rewrite((base + 3000 * frame) & 0xFFFFFFFF, now)
            if last is not None:
                assert 0 < (out - last) & 0xFFFFFFFF < 0x8000_0000  # strictly newer, serial arithmetic
            last = out


def test_timestamp_of_reordered_packet_does_not_move_the_clock() -> None:
    ts = TimestampRebaser(48_000, first_output=0)
    ts.rewrite(1000, 1.0)
    ts.rewrite(1960, 1.02)
    assert ts.rewrite(1000, 1.03) == 0  # an older packet: rewritten, but the newest stays
    assert ts.last_output == 960


@pytest.mark.parametrize("clock", [48_000, 90_000])
def test_random_starting_points(clock: int) -> None:
    assert 0 <= TimestampRebaser(clock).last_output < 1 << 32
    assert 0 <= SeqManager().last_output <= 0xFFFF


def test_inserted_numbers_shift_newer_inputs_only() -> None:
    """Padding takes output numbers between media packets; a late older input keeps its own place."""
    seqs = SeqManager(first_output=100)
    assert [seqs.forward(s) for s in (10, 12)] == [100, 102]
    padding = [seqs.insert(), seqs.insert()]
    assert padding == [103, 104]
    assert seqs.forward(11) == 101  # late, keeps the number before the inserts
    assert [seqs.forward(s) for s in (13, 14)] == [105, 106]
    seqs.drop(15)
    assert seqs.forward(16) == 107
    assert seqs.insert() == 108
    assert seqs.forward(17) == 109


def test_insert_before_a_switch_is_followed() -> None:
    seqs = SeqManager(first_output=0xFFFE)
    assert seqs.forward(500) == 0xFFFE
    seqs.switch()
    assert seqs.insert() == 0xFFFF
    assert seqs.forward(9000) == 0  # the new source continues after the padding, across the wrap
    assert seqs.forward(9001) == 1
