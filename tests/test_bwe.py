"""The send-side bandwidth estimator: its parts, a simulated bottleneck end to end, and lying inputs."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from linksim import MS, Link, Simulation, direction_changes

from chorus.sfu.bwe import (
    MAX_BPS,
    MIN_BPS,
    NORMAL,
    OVERUSING,
    UNDERUSING,
    AimdRateControl,
    InterArrival,
    ProbeEstimator,
    SendSideBwe,
    TrendlineEstimator,
)

# --- parts ------------------------------------------------------------------------------------------


def test_inter_arrival_groups_5ms_bursts() -> None:
    inter = InterArrival()
    out = []
    # Three packets per frame sent within 2 ms, frames 33 ms apart; each frame arrives 1 ms later than sent.
    for frame in range(4):
        for i in range(3):
            send = frame * 33_000 + i * 1000
            out.append(inter.compute(send, send + 40_000 + frame * 1000, send))
    deltas = [d for d in out if d is not None]
    # A frame's group closes when the next frame's first packet arrives: deltas between frames 0-1 and 1-2.
    assert deltas == [(33_000, 34_000), (33_000, 34_000)]


def test_inter_arrival_ignores_reordered_and_resets_on_clock_jump() -> None:
    inter = InterArrival()
    assert inter.compute(100_000, 1_000_000, 0) is None
    assert inter.compute(50_000, 1_000_100, 0) is None  # sent before the current group: reordered
    # Groups 10 ms apart; then the arrival clock jumps 5 s ahead of ours (at 130 ms).
    sends = [110_000, 120_000, 130_000, 140_000, 150_000, 160_000, 170_000]
    arrivals = [1_010_000, 1_020_000, 6_030_000, 6_040_000, 6_050_000, 6_060_000, 6_070_000]
    out = [inter.compute(s, a, s - 100_000) for s, a in zip(sends, arrivals, strict=True)]
    # The group that spans the jump is dropped and the state starts over: two groups before a delta again.
    assert out == [None, (10_000, 10_000), (10_000, 10_000), None, None, None, (10_000, 10_000)]


def feed(trend: TrendlineEstimator, extra_ms: float, n: int, start_ms: float = 0.0) -> list[str]:
    """Groups 33 ms apart whose arrival spacing exceeds the send spacing by ``extra_ms``."""
    states = []
    for i in range(n):
        states.append(trend.update(33.0 + extra_ms, 33.0, start_ms + i * (33.0 + extra_ms)))
    return states


def test_trendline_detects_growing_delay_and_draining() -> None:
    trend = TrendlineEstimator()
    assert set(feed(trend, 0.0, 40)) == {NORMAL}
    states = feed(trend, 3.0, 40, 40 * 33.0)
    assert OVERUSING in states
    assert states.index(OVERUSING) < 15  # within ~0.5 s of 33 ms groups
    drained = feed(trend, -3.0, 40, 80 * 36.0)
    assert UNDERUSING in drained


def test_trendline_threshold_adapts_and_stays_bounded() -> None:
    trend = TrendlineEstimator()
    rng = random.Random(2)
    for i in range(3000):
        trend.update(33.0 + rng.uniform(-20, 20), 33.0, i * 33.0)
    assert 6.0 <= trend.threshold <= 600.0


def test_aimd_decreases_to_085_of_throughput_then_holds() -> None:
    aimd = AimdRateControl(1_000_000, MIN_BPS, MAX_BPS)
    aimd.update(OVERUSING, 800_000, 1_000_000)
    assert aimd.bitrate == pytest.approx(0.85 * 800_000)
    aimd.update(UNDERUSING, 800_000, 1_100_000)
    assert aimd.bitrate == pytest.approx(0.85 * 800_000)


def test_aimd_increases_multiplicatively_far_and_additively_near_capacity() -> None:
    far = AimdRateControl(2_000_000, MIN_BPS, MAX_BPS)
    far.update(NORMAL, 2_000_000, 0)
    far.update(NORMAL, 2_000_000, 1_000_000)
    assert far.bitrate == pytest.approx(2_160_000, rel=0.001)  # +8 % in a second
    near = AimdRateControl(2_000_000, MIN_BPS, MAX_BPS)
    near.update(OVERUSING, 2_000_000, 0)  # the link capacity is now known: ~2 Mbps
    start = near.bitrate
    near.update(NORMAL, 2_000_000, 100_000)
    near.update(NORMAL, 2_000_000, 1_100_000)
    # One average packet per response time (RTT 100 ms + 100 ms): 1.7 Mbps / 30 fps = 7083 bytes a frame,
    # 6 packets of 1181 bytes, 9444 bits per 0.2 s = 47 kbps in a second (libwebrtc's near-max rate).
    frame_bits = start / 30
    per_second = frame_bits / 6 / 0.2
    assert near.bitrate - start == pytest.approx(per_second, rel=0.01)
    assert near.bitrate - start < 0.03 * start


def test_aimd_increase_is_limited_by_throughput() -> None:
    aimd = AimdRateControl(1_000_000, MIN_BPS, MAX_BPS)
    for t in range(0, 20_000_000, 100_000):
        aimd.update(NORMAL, 200_000, t)
    assert aimd.bitrate <= 1_000_000  # never raised while 1.5 × 200 k + 10 k is lower


def test_probe_estimator_saturated_link() -> None:
    probes = ProbeEstimator()
    for _ in range(10):
        probes.on_sent(1)
    # Sent 1 ms apart (1000 bytes: 8 Mbps), received 2 ms apart (4 Mbps): the link saturated.
    for i in range(10):
        probes.on_acked(1, 1000 * i, 50_000 + 2000 * i, 1000)
    result = probes.result(1, 5)
    assert result == pytest.approx(0.95 * 9 * 1000 * 8e6 / 18_000)


def test_probe_estimator_needs_80_percent_and_rejects_implausible() -> None:
    probes = ProbeEstimator()
    for _ in range(10):
        probes.on_sent(2)
    for i in range(7):
        probes.on_acked(2, 1000 * i, 50_000 + 1000 * i, 1000)
    assert probes.result(2, 5) is None  # 7 of 10 acknowledged
    probes.on_acked(2, 7000, 57_000, 1000)
    assert probes.result(2, 5) == pytest.approx(8e6)  # 8 of 10
    for _ in range(10):
        probes.on_sent(3)
    for i in range(10):  # sent 1 ms apart, "received" 0.1 ms apart: faster than any link delivers it
        probes.on_acked(3, 1000 * i, 50_000 + 100 * i, 1000)
    assert probes.result(3, 5) is None


def test_probe_estimator_waits_for_the_cluster_bytes() -> None:
    """Feedback that arrives while a 10 kB cluster is still being sent (4 packets so far, all acknowledged) is
    no result: four packets of a cluster say nothing of its rate."""
    probes = ProbeEstimator()
    for i in range(4):
        probes.on_sent(4)
        probes.on_acked(4, 10_000 * i, 50_000 + 10_000 * i, 1000)
    assert probes.result(4, 5, 10_000) is None and probes.result(4, 3, 0) is not None
    for i in range(4, 10):
        probes.on_sent(4)
        probes.on_acked(4, 10_000 * i, 50_000 + 10_000 * i, 1000)
    assert probes.result(4, 5, 10_000) == pytest.approx(9 * 1000 * 8e6 / 90_000)


# --- a simulated bottleneck ---------------------------------------------------------------------------


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.95 * (len(ordered) - 1))]


@pytest.mark.parametrize(("delay_ms", "buffer_bytes"), [(5, 15_000), (20, 30_000), (50, 60_000)])
def test_cap_then_lift(delay_ms: int, buffer_bytes: int) -> None:
    """2.5 Mbps flowing; the link drops to 300 kbit/s, then is lifted back to 5 Mbit/s."""
    link = Link(5e6, delay_ms * MS, buffer_bytes)
    sim = Simulation(SendSideBwe(), link, demand_bps=2_500_000)
    sim.run_until(5_000 * MS)
    assert sim.samples[-1].estimate >= 2_500_000  # probing took it to the demand

    link.set_capacity(sim.now, 300e3)
    sim.run_until(15_000 * MS)
    capped = 300e3
    first_below = next(s.t for s in sim.window(5_000 * MS, 15_000 * MS) if s.estimate < capped)
    assert first_below - 5_000 * MS < 2_000 * MS
    steady = sim.window(7_000 * MS, 15_000 * MS)
    assert max(s.estimate for s in steady) < 1.15 * capped
    assert statistics.mean(s.estimate for s in steady) < capped
    assert min(s.estimate for s in sim.window(10_000 * MS, 15_000 * MS)) > 0.6 * capped  # no collapse
    queue = [s.queue_us for s in sim.window(9_000 * MS, 15_000 * MS)]
    assert p95(queue) < 150_000  # the standing queue from the drop has drained

    link.set_capacity(sim.now, 5e6)
    sim.run_until(27_000 * MS)
    recovered = next(s.t for s in sim.window(15_000 * MS, 27_000 * MS) if s.estimate >= 0.8 * 2_500_000)
    assert recovered - 15_000 * MS <= 10_000 * MS
    assert sim.samples[-1].sent_bps >= 0.8 * 2_500_000  # and the sender really sends it
    assert any(s.state == "increase: probe" for s in sim.window(15_000 * MS, 27_000 * MS)) or sim.probes


@pytest.mark.parametrize("capacity", [300e3, 1e6, 2e6])
def test_bandwidth_limited_steady_state_does_not_flap(capacity: float) -> None:
    """Demand above capacity for a minute: GCC's sawtooth stays in a narrow band and turns slowly."""
    link = Link(capacity, 20 * MS, 30_000)
    sim = Simulation(SendSideBwe(), link, demand_bps=4_000_000)
    sim.run_until(60_000 * MS)
    estimates = [s.estimate for s in sim.window(10_000 * MS, 60_000 * MS)]
    assert 0.7 * capacity <= min(estimates)
    assert max(estimates) <= 1.2 * capacity
    assert direction_changes(estimates, 0.3) == 0
    assert direction_changes(estimates, 0.1) <= 50 / 1.2  # at most one 10 % reversal per 1.2 s on average
    assert p95([s.queue_us for s in sim.window(10_000 * MS, 60_000 * MS)]) < 150_000


def test_demand_below_capacity_never_decreases() -> None:
    link = Link(5e6, 20 * MS, 60_000)
    sim = Simulation(SendSideBwe(), link, demand_bps=1_000_000)
    sim.run_until(20_000 * MS)
    estimates = [s.estimate for s in sim.window(2_000 * MS, 20_000 * MS)]
    assert min(estimates) >= 1_000_000
    assert all(b >= a for a, b in zip(estimates, estimates[1:], strict=False))
    assert max(estimates) <= 2 * 1_000_000 * 1.1  # about twice what is sent, at most
    assert not any(s.state.startswith("decrease") for s in sim.samples)


def test_random_loss_is_handled_by_the_loss_controller() -> None:
    link = Link(10e6, 20 * MS, 60_000)
    lossy = Simulation(SendSideBwe(), link, demand_bps=2_500_000, loss=0.2, seed=3)
    lossy.run_until(20_000 * MS)
    assert any(s.state == "decrease: loss" for s in lossy.samples)
    assert lossy.samples[-1].estimate < 1_000_000
    light = Simulation(SendSideBwe(), Link(10e6, 20 * MS, 60_000), demand_bps=2_500_000, loss=0.01, seed=3)
    light.run_until(20_000 * MS)
    assert light.samples[-1].estimate >= 2_500_000  # 1 % loss is ignored


def test_probe_clusters_are_bounded_by_demand() -> None:
    sim = Simulation(SendSideBwe(), Link(50e6, 10 * MS, 200_000), demand_bps=1_500_000)
    sim.run_until(10_000 * MS)
    assert sim.probes, "no probe"
    assert all(p.bitrate_bps <= 1.25 * 1_500_000 for p in sim.probes)
    assert len(sim.probes) <= 4  # once at the demand, no more probing


# --- REMB-only and lying inputs ------------------------------------------------------------------------


def test_sending_less_keeps_the_estimate() -> None:
    """A viewer who shrinks its tiles (demand far below the estimate, application-limited) keeps the estimate it
    had, so the larger layers come back at once; it only stops growing."""
    link = Link(5e6, 20 * MS, 60_000)
    sim = Simulation(SendSideBwe(), link, demand_bps=2_000_000)
    sim.run_until(8_000 * MS)
    before = sim.samples[-1].estimate
    assert before >= 2_000_000
    sim.demand_bps = 150_000
    sim.bwe.set_demand(150_000)
    sim.run_until(16_000 * MS)
    small = [s.estimate for s in sim.window(8_500 * MS, 16_000 * MS)]
    assert min(small) >= 0.95 * before and max(small) <= 1.05 * before


def send_steady(bwe: SendSideBwe, bps: int, start_us: int, end_us: int, seq: int = 0) -> int:
    for t in range(start_us, end_us, 10_000):
        bwe.on_packet_sent(seq & 0xFFFF, bps // 800, t)
        seq += 1
    return seq


def test_remb_only_follows_remb_down_at_once_and_up_after_a_second() -> None:
    bwe = SendSideBwe(start_bps=300_000)
    seq = send_steady(bwe, 1_000_000, 0, 2_000_000)
    bwe.on_remb(800_000, 2_000_000)
    assert bwe.estimate_bps == 800_000 and bwe.state == "remb"
    seq = send_steady(bwe, 1_000_000, 2_000_000, 2_250_000, seq)
    bwe.on_remb(400_000, 2_250_000)
    assert bwe.estimate_bps == 400_000  # down at once
    seq = send_steady(bwe, 1_000_000, 2_250_000, 2_500_000, seq)
    bwe.on_remb(900_000, 2_500_000)
    assert bwe.estimate_bps == 400_000  # up only once the low value is a second old
    seq = send_steady(bwe, 1_000_000, 2_500_000, 3_300_000, seq)
    bwe.on_remb(900_000, 3_300_000)
    assert bwe.estimate_bps == 900_000
    bwe.on_remb(900_000, 6_000_000)  # nothing sent for 2.7 s: no more than the start rate is believed
    assert bwe.estimate_bps == 300_000
    assert bwe.poll_probe(3_300_000) is None  # no probing without transport-cc
    bwe.set_demand(2_000_000)
    assert bwe.padding_bps > 0


@pytest.mark.parametrize("lie", [0, -5, 10_000_000_000])
def test_lying_remb_is_clamped(lie: int) -> None:
    bwe = SendSideBwe(start_bps=300_000)
    send_steady(bwe, 500_000, 0, 2_000_000)
    bwe.on_remb(lie, 2_000_000)
    assert MIN_BPS <= bwe.estimate_bps <= 2 * 500_000 * 1.05


def test_oscillating_remb_holds_the_low_value() -> None:
    bwe = SendSideBwe(start_bps=300_000)
    seq = 0
    values = []
    for i in range(40):
        t = i * 250_000
        seq = send_steady(bwe, 2_000_000, t, t + 250_000, seq)
        bwe.on_remb(300_000 if i % 2 else 5_000_000, t + 250_000)
        values.append(bwe.estimate_bps)
    assert set(values[2:]) == {300_000}


def run_with_feedback(bwe: SendSideBwe, make_arrival: object, rng: random.Random, seconds: int = 10) -> list[int]:
    """Send 1 Mbps, feed back what ``make_arrival(seq, send_time)`` claims; return estimates."""
    estimates = []
    seq = 0
    for step in range(seconds * 20):  # 50 ms steps
        t0 = step * 50_000
        batch = []
        for i in range(6):  # 6 × 1041 bytes per 50 ms ≈ 1 Mbps
            send = t0 + i * 8_000
            bwe.on_packet_sent(seq & 0xFFFF, 1041, send)
            batch.append((seq & 0xFFFF, make_arrival(seq, send)))  # type: ignore[operator]
            seq += 1
        bwe.on_feedback(batch, t0 + 50_000)
        cluster = bwe.poll_probe(t0 + 50_000)
        if cluster is not None:
            for i in range(cluster.min_packets):
                bwe.on_packet_sent(seq & 0xFFFF, 1000, t0 + 50_000 + i * 5_000, cluster.cluster_id)
                seq += 1
        estimates.append(bwe.estimate_bps)
    return estimates


@pytest.mark.parametrize("name", ["all at once", "random", "all lost", "far future", "alternating"])
def test_lying_feedback_is_clamped(name: str) -> None:
    rng = random.Random(name)
    liars = {
        "all at once": lambda seq, send: 1_000_000,  # infinite receive rate
        "random": lambda seq, send: rng.randrange(0, 10**9),
        "all lost": lambda seq, send: None,
        "far future": lambda seq, send: send + 10**12,
        "alternating": lambda seq, send: send + (0 if seq % 2 else 3_000_000),
    }
    bwe = SendSideBwe(start_bps=300_000)
    bwe.set_demand(50_000_000)
    estimates = run_with_feedback(bwe, liars[name], rng)
    assert all(MIN_BPS <= e <= MAX_BPS for e in estimates)
    # Sent ~1 Mbps (plus probes): the estimate never goes beyond about twice that.
    assert max(estimates[20:]) <= 2.6e6, max(estimates)
    if name == "all lost":
        assert estimates[-1] < 300_000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-10, 70_000), st.one_of(st.none(), st.integers(-10**12, 10**12))),
                max_size=200),
       st.integers(0, 10**9))
def test_garbage_feedback_never_raises(results: list[tuple[int, int | None]], now: int) -> None:
    bwe = SendSideBwe()
    for seq in range(300):
        bwe.on_packet_sent(seq, 1200, seq * 3000)
    bwe.on_feedback(results, now)
    bwe.on_feedback(results, now + 50_000)
    bwe.poll_probe(now + 60_000)
    bwe.on_remb(results[0][0] if results else 0, now + 70_000)
    assert MIN_BPS <= bwe.estimate_bps <= MAX_BPS


def test_bad_configuration() -> None:
    with pytest.raises(ValueError):
        SendSideBwe(start_bps=10_000, min_bps=30_000)
