"""
The estimator and the layer allocation together, on the simulated bottleneck of tests/linksim.py: a viewer
of one simulcast video (three layers, three temporal layers each) and its audio, whose link drops from 5 Mbit/s
to 300 kbit/s and comes back. Deterministic and fast; the browser test of test_adaptive.py shows the same live.
"""

from __future__ import annotations

import pytest
from linksim import MS, Link, Simulation

from chorus.sfu.allocator import BUDGET_SHARE, INTERVAL, UP_HEADROOM, Candidate, Hysteresis, Option, allocate, options
from chorus.sfu.bandwidth import START_BPS
from chorus.sfu.bwe import SendSideBwe

AUDIO_BPS = 45_000
#: Layer → bitrate of each temporal layer (what Chromium's q/h/f at 150k/500k/1.5M look like).
LAYERS = [(38_000, 37_000, 75_000), (125_000, 125_000, 250_000), (375_000, 375_000, 750_000)]


class Layers:
    """The three layers as the allocation reads a source."""

    layer_count = 3

    def layer_active(self, layer: int) -> bool:
        return True

    def layer_height(self, layer: int) -> int:
        return (180, 360, 720)[layer]

    def layer_temporal(self, layer: int) -> list[int]:
        return list(LAYERS[layer])


def run(link_schedule: list[tuple[int, float]], seconds: int, buffer_bytes: int
        ) -> list[tuple[float, int, Option, float]]:
    """(time s, estimate, option chosen, queue delay ms) every allocation interval."""
    link = Link(link_schedule[0][1], 20 * MS, max(buffer_bytes, int(link_schedule[0][1] / 8 * 0.05)))
    sim = Simulation(SendSideBwe(start_bps=START_BPS), link, demand_bps=AUDIO_BPS + LAYERS[0][0])
    memory: dict[str, Hysteresis] = {}
    opts = options(Layers(), 720, False)
    current: int | None = None
    series = []
    schedule = list(link_schedule[1:])
    step = int(INTERVAL * 1000 * MS)
    for t in range(0, seconds * 1_000_000, step):
        while schedule and schedule[0][0] * 1_000_000 <= t:
            capacity = schedule.pop(0)[1]
            link.set_capacity(sim.now, capacity)
            if buffer_bytes < 10_000:  # tc tbf: the queue holds at most `latency` worth (50 ms), burst 8000
                link.buffer_bytes = max(8_000, int(capacity / 8 * 0.05))
        sim.run_until(t + step)
        result = allocate(sim.bwe.estimate_bps, AUDIO_BPS, [Candidate("v", 0, opts, current)], memory, t / 1e6)
        current = result.decisions["v"].index
        chosen = opts[current if current is not None else 0]
        sim.demand_bps = AUDIO_BPS + chosen.bps
        sim.bwe.set_demand(int((AUDIO_BPS + result.wanted_bps) * UP_HEADROOM / BUDGET_SHARE))
        series.append((t / 1e6, sim.bwe.estimate_bps, chosen, link.queue_delay_us(sim.now) / 1000))
    return series


@pytest.mark.parametrize("buffer_bytes", [8_000, 40_000])
def test_capped_viewer_goes_down_within_seconds_and_comes_back(buffer_bytes: int) -> None:
    """A short bottleneck queue (tc tbf with a 50 ms latency: packets dropped) and a long one (1 s: delay)."""
    series = run([(0, 5e6), (10, 300e3), (40, 5e6)], 60, buffer_bytes)
    for t, estimate, option, queue in series[::4]:
        print(f"{t:5.1f} s  estimate {estimate // 1000:5d} kbps  layer {option.layer} T{option.temporal} "
              f"({option.bps // 1000} kbps)  queue {queue:.0f} ms")
    before = [o for t, _, o, _ in series if 6 <= t < 10]
    assert all(o.layer == 2 and o.temporal == 2 for o in before)  # full quality on a fast link
    assert next(t for t, _, o, _ in series if o.layer == 2 and o.temporal == 2) <= 5
    low = next(t for t, _, o, _ in series if t >= 10 and o.layer == 0)
    assert low - 10 <= 8
    capped = [(o, q) for t, _, o, q in series if low + 2 <= t < 40]
    assert all(o.layer == 0 for o, _ in capped)
    # ≥ 15 fps nearly always; a bloated buffer (1 s of queue when the cap came) first has to drain.
    assert sum(o.temporal >= 1 for o, _ in capped) >= (0.95 if buffer_bytes < 10_000 else 0.8) * len(capped)
    assert max(q for _, q in capped) < 500  # no standing queue of stale media
    switches = sum(1 for (_, _, a, _), (_, _, b, _) in zip(series, series[1:], strict=False) if a != b)
    assert switches <= 20
    back = next(t for t, _, o, _ in series if t >= 40 and o.layer == 2)
    assert back - 40 <= 15



def test_a_larger_tile_is_served_at_once_and_a_rising_budget_waits() -> None:
    """The viewer enlarging a tile gets the larger layer in the same allocation when the budget covers it with
    headroom; the same budget reached by a rising estimate (options unchanged) waits for the hysteresis."""
    layers = [Option(0, 2, 150_000), Option(1, 2, 500_000), Option(2, 2, 1_200_000)]
    memory: dict[str, Hysteresis] = {}
    small = allocate(2_000_000, AUDIO_BPS, [Candidate("v", 0, layers[:1], None)], memory, 0.0)
    assert small.decisions["v"].index == 0
    grown = allocate(2_000_000, AUDIO_BPS, [Candidate("v", 0, layers, 0)], memory, 0.25)
    assert grown.decisions["v"].index == 2 and grown.decisions["v"].reason == "size: up"

    memory = {}
    allocate(600_000, AUDIO_BPS, [Candidate("v", 0, layers, None)], memory, 0.0)
    rising = allocate(2_000_000, AUDIO_BPS, [Candidate("v", 0, layers, 1)], memory, 0.25)
    assert rising.decisions["v"].index == 1 and rising.decisions["v"].reason == "bandwidth: waiting"
