"""
Send-side bandwidth estimation for one subscribe connection, after Google Congestion Control as
libwebrtc's ``goog_cc`` implements it (draft-ietf-rmcat-gcc-02; Carlucci et al., "Analysis and Design of the
Google Congestion Control for WebRTC", 2016).

Inputs come from the forwarding path and from transport-cc feedback (:mod:`chorus.sfu.twcc`):

* every packet sent on the connection, with its transport-wide sequence number and size
  (:meth:`SendSideBwe.on_packet_sent`);
* each feedback datagram, read by :class:`chorus.sfu.twcc.FeedbackReader` (:meth:`SendSideBwe.on_feedback`);
* REMB (:meth:`SendSideBwe.on_remb`) from receivers that do not send transport-cc — then REMB alone
  drives the estimate ("REMB-only" mode); with transport-cc it only caps it.

The estimate is the minimum of

1. a **delay-based** estimate: packets are grouped into 5 ms send bursts (:class:`InterArrival`); the
   growth of the one-way delay between groups is smoothed and fitted with a line (:class:`TrendlineEstimator`);
   a slope beyond an adaptive threshold means the bottleneck queue grows (overuse). :class:`AimdRateControl`
   then decreases to 0.85 × the acknowledged throughput, holds while the queue drains (underuse), and
   otherwise increases: multiplicatively (8 %/s) while the link capacity is unknown, additively (about one
   packet per response time) near the capacity last measured at an overuse — as libwebrtc does;
2. a **loss-based** cap: above 10 % loss it lowers the rate by half the loss fraction (at most every
   300 ms + RTT), between 2 and 10 % it holds, below 2 % it rises 8 %/s until it no longer limits;
3. the receiver's REMB, when it sends one.

Beyond libwebrtc (Chorus additions, all from the measured queuing delay, :class:`QueueDelay`: one-way delay
above its 10 s minimum): a queue above 150 ms that keeps growing is overuse even before the trendline says so
(after a drop in capacity a big frame may take 300 ms through the bottleneck, leaving the trendline a few
samples a second); a queue above 50 ms that keeps growing stops increases; and an overuse decrease with more
than 100 ms queued goes below 0.85 × throughput, to drain the queue in about a second (never below 0.5 ×) —
stale media sitting in a bottleneck is what freezes a viewer.

Going up faster than 8 %/s takes **probing**: :meth:`SendSideBwe.poll_probe` tells the caller when to send a
probe cluster (padding or RTX at a given rate for ~40 ms, every packet tagged with the cluster id); the rate
at which the cluster was received (:class:`ProbeEstimator`) lifts the estimate at once. Probes are sent
while the caller wants more than the estimate (:meth:`SendSideBwe.set_demand`): the first at 3 ×, then at
2 × the estimate right after each success; after a failure 1 s later, the wait doubling up to 3 s.

Lying inputs are clamped: the estimate stays within ``min_bps``..``max_bps`` (30 kbps..50 Mbps) and never
grows above twice the measured throughput (acknowledged, or sent in REMB-only mode), a recent probe result or
the start rate, whichever is highest (with transport-cc, sending less keeps the estimate where it was: it only
stops it growing; in REMB-only mode it is lowered to that too); probe results never exceed the rate the cluster
was *sent* at. Probe clusters count once 80 % of their packets and of their bytes are acknowledged.

Units: times are integer microseconds on the caller's monotonic clock (``time.monotonic_ns() // 1000``),
except feedback arrival times, which are on the remote clock (only their differences are used); rates are
bits per second; sizes bytes (the whole RTP packet). Pure and synchronous: no I/O, no tasks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

MIN_BPS = 30_000
MAX_BPS = 50_000_000
START_BPS = 300_000

# Delay-based states (libwebrtc BandwidthUsage).
NORMAL = "normal"
OVERUSING = "overusing"
UNDERUSING = "underusing"

# AIMD states (libwebrtc RateControlState).
HOLD = "hold"
INCREASE = "increase"
DECREASE = "decrease"


class _RateWindow:
    """Bytes per second over a sliding window, in buckets (cheap to add to on the per-packet path)."""

    __slots__ = ("window_us", "bucket_us", "_buckets", "_current", "_current_start", "_first")

    def __init__(self, window_us: int, buckets: int = 10) -> None:
        self.window_us = window_us
        self.bucket_us = window_us // buckets
        self._buckets: deque[tuple[int, int]] = deque()  # (bucket start, bytes)
        self._current = 0
        self._current_start = -1
        self._first = -1  # time of the first sample

    def add(self, now_us: int, size: int) -> None:
        """``size`` bytes at ``now_us``."""
        start = now_us - now_us % self.bucket_us
        if start != self._current_start:
            if self._current_start >= 0:
                self._buckets.append((self._current_start, self._current))
            self._current_start = start
            self._current = 0
        self._current += size
        if self._first < 0:
            self._first = now_us

    def bps(self, now_us: int) -> int | None:
        """The rate over the last window, or ``None`` until one window has passed since the first sample."""
        if self._first < 0 or now_us - self._first < self.window_us:
            return None
        cutoff = now_us - self.window_us
        buckets = self._buckets
        while buckets and buckets[0][0] < cutoff:
            buckets.popleft()
        total = sum(size for _, size in buckets)
        if self._current_start >= cutoff:
            total += self._current
        return total * 8_000_000 // self.window_us


class InterArrival:
    """
    Groups packets into send bursts and yields the send and arrival time deltas between consecutive groups
    (libwebrtc ``InterArrivalDelta``): a group spans 5 ms of send time; a packet that arrives within 5 ms of
    the group's last with a shorter delay than the send spacing (i.e. it queued behind it) joins the burst,
    for at most 100 ms. Reordered groups are skipped; a jump of more than 3 s between the arrival clock and
    ours resets the state.
    """

    GROUP_US = 5_000
    BURST_US = 5_000
    MAX_BURST_US = 100_000
    OFFSET_RESET_US = 3_000_000
    REORDER_RESET = 3

    __slots__ = ("_current", "_prev", "_reordered")

    def __init__(self) -> None:
        # A group: [first send, last send, first arrival, last arrival, our clock at its last packet]
        self._current: list[int] | None = None
        self._prev: list[int] | None = None
        self._reordered = 0

    def compute(self, send_us: int, arrival_us: int, now_us: int) -> tuple[int, int] | None:
        """Add one packet (in arrival order); returns ``(send delta, arrival delta)`` in µs when it closes a
        group, else ``None``."""
        current = self._current
        if current is None:
            self._current = [send_us, send_us, arrival_us, arrival_us, now_us]
            return None
        if send_us < current[0]:
            return None  # reordered: sent before the current group started
        deltas: tuple[int, int] | None = None
        if self._new_group(current, send_us, arrival_us):
            prev = self._prev
            if prev is not None:
                send_delta = current[1] - prev[1]
                arrival_delta = current[3] - prev[3]
                system_delta = current[4] - prev[4]
                if arrival_delta - system_delta >= self.OFFSET_RESET_US:
                    self.reset()
                    return None
                if arrival_delta < 0:
                    self._reordered += 1
                    if self._reordered >= self.REORDER_RESET:
                        self.reset()
                    return None
                self._reordered = 0
                deltas = (send_delta, arrival_delta)
            self._prev = current
            self._current = current = [send_us, send_us, arrival_us, arrival_us, now_us]
            return deltas
        if send_us > current[1]:
            current[1] = send_us
        current[3] = arrival_us
        current[4] = now_us
        return None

    def _new_group(self, current: list[int], send_us: int, arrival_us: int) -> bool:
        arrival_delta = arrival_us - current[3]
        send_delta = send_us - current[1]
        if send_delta == 0:
            return False
        if (arrival_delta - send_delta < 0 and arrival_delta <= self.BURST_US
                and arrival_us - current[2] < self.MAX_BURST_US):
            return False  # belongs to the burst
        return send_us - current[0] > self.GROUP_US

    def reset(self) -> None:
        """Start over (clock jump, persistent reordering)."""
        self._current = self._prev = None
        self._reordered = 0


class TrendlineEstimator:
    """
    Overuse detector on the delay gradient (libwebrtc ``TrendlineEstimator``): accumulates the one-way delay
    variation between groups, smooths it (coefficient 0.9), fits a line over the last 20 points (arrival time,
    smoothed delay), and compares the slope × min(deltas, 60) × 4 with an adaptive threshold (initially
    12.5 ms, adapting up at 0.0087/ms and down at 0.039/ms, clamped to 6..600). Overuse is signalled when the
    threshold is exceeded for more than 10 ms and two groups while the slope is not decreasing.
    """

    WINDOW = 20
    SMOOTHING = 0.9
    GAIN = 4.0
    K_UP = 0.0087
    K_DOWN = 0.039
    OVERUSE_TIME_MS = 10.0
    MIN_DELTAS = 60
    MAX_ADAPT_OFFSET_MS = 15.0

    __slots__ = ("state", "threshold", "trend", "_deltas", "_first_arrival", "_accumulated", "_smoothed",
                 "_history", "_time_over", "_over_count", "_last_update")

    def __init__(self) -> None:
        self.state = NORMAL
        self.threshold = 12.5
        self.trend = 0.0
        self._deltas = 0
        self._first_arrival: float | None = None
        self._accumulated = 0.0
        self._smoothed = 0.0
        self._history: deque[tuple[float, float]] = deque(maxlen=self.WINDOW)
        self._time_over = -1.0
        self._over_count = 0
        self._last_update: float | None = None

    def update(self, recv_delta_ms: float, send_delta_ms: float, arrival_ms: float) -> str:
        """Add one group delta; returns the detector state (:data:`NORMAL`, :data:`OVERUSING`,
        :data:`UNDERUSING`)."""
        self._deltas = min(self._deltas + 1, 1000)
        if self._first_arrival is None:
            self._first_arrival = arrival_ms
        self._accumulated += recv_delta_ms - send_delta_ms
        self._smoothed = self.SMOOTHING * self._smoothed + (1 - self.SMOOTHING) * self._accumulated
        self._history.append((arrival_ms - self._first_arrival, self._smoothed))
        trend = self.trend
        if len(self._history) == self.WINDOW:
            slope = _slope(self._history)
            if slope is not None:
                trend = slope
        self._detect(trend, send_delta_ms, arrival_ms)
        return self.state

    def _detect(self, trend: float, ts_delta_ms: float, now_ms: float) -> None:
        if self._deltas < 2:
            self.state = NORMAL
            return
        modified = min(self._deltas, self.MIN_DELTAS) * trend * self.GAIN
        if modified > self.threshold:
            if self._time_over < 0:
                self._time_over = ts_delta_ms / 2  # assume half the interval was already over
            else:
                self._time_over += ts_delta_ms
            self._over_count += 1
            if self._time_over > self.OVERUSE_TIME_MS and self._over_count > 1 and trend >= self.trend:
                self._time_over = 0
                self._over_count = 0
                self.state = OVERUSING
        elif modified < -self.threshold:
            self._time_over = -1
            self._over_count = 0
            self.state = UNDERUSING
        else:
            self._time_over = -1
            self._over_count = 0
            self.state = NORMAL
        self.trend = trend
        self._adapt_threshold(modified, now_ms)

    def _adapt_threshold(self, modified: float, now_ms: float) -> None:
        if self._last_update is None:
            self._last_update = now_ms
        if abs(modified) > self.threshold + self.MAX_ADAPT_OFFSET_MS:
            self._last_update = now_ms  # a latency spike (e.g. a capacity drop): do not adapt to it
            return
        k = self.K_DOWN if abs(modified) < self.threshold else self.K_UP
        elapsed = min(now_ms - self._last_update, 100.0)
        self.threshold = min(max(self.threshold + k * (abs(modified) - self.threshold) * elapsed, 6.0), 600.0)
        self._last_update = now_ms


def _slope(points: Iterable[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(x, y)`` points, ``None`` when x does not vary."""
    pts = list(points)
    n = len(pts)
    x_avg = sum(x for x, _ in pts) / n
    y_avg = sum(y for _, y in pts) / n
    num = sum((x - x_avg) * (y - y_avg) for x, y in pts)
    den = sum((x - x_avg) ** 2 for x, _ in pts)
    return num / den if den else None


class LinkCapacity:
    """Exponentially smoothed throughput seen at overuses, with a normalized deviation (libwebrtc
    ``LinkCapacityEstimator``): the band in which AIMD increases additively."""

    __slots__ = ("estimate_kbps", "_deviation")

    def __init__(self) -> None:
        self.estimate_kbps: float | None = None
        self._deviation = 0.4

    def update(self, sample_bps: float, alpha: float = 0.05) -> None:
        """A throughput sample at an overuse (``alpha`` 0.05) or from a probe (0.5)."""
        sample = sample_bps / 1000
        estimate = sample if self.estimate_kbps is None else (1 - alpha) * self.estimate_kbps + alpha * sample
        self.estimate_kbps = estimate
        error = estimate - sample
        self._deviation = (1 - alpha) * self._deviation + alpha * error * error / max(estimate, 1.0)
        self._deviation = min(max(self._deviation, 0.4), 2.5)

    def _spread(self) -> float:
        assert self.estimate_kbps is not None
        return 3 * math.sqrt(self._deviation * self.estimate_kbps)

    def upper_bps(self) -> float:
        """Estimate + 3 deviations (infinite while unknown)."""
        return math.inf if self.estimate_kbps is None else (self.estimate_kbps + self._spread()) * 1000

    def lower_bps(self) -> float:
        """Estimate − 3 deviations (0 while unknown)."""
        return 0.0 if self.estimate_kbps is None else max(0.0, self.estimate_kbps - self._spread()) * 1000

    def reset(self) -> None:
        """Forget the capacity: AIMD searches multiplicatively again."""
        self.estimate_kbps = None


class AimdRateControl:
    """
    Additive-increase/multiplicative-decrease on the detector's state (libwebrtc ``AimdRateControl``):
    overuse → decrease to ``BETA`` × acknowledged throughput, then hold; underuse → hold; normal → increase,
    never beyond 1.5 × throughput + 10 kbps. See the module docstring for the increase modes.
    """

    BETA = 0.85

    __slots__ = ("bitrate", "state", "min_bps", "max_bps", "rtt_us", "link", "_last_change", "_last_decrease")

    def __init__(self, start_bps: int, min_bps: int, max_bps: int) -> None:
        self.bitrate = float(start_bps)
        self.state = HOLD
        self.min_bps = min_bps
        self.max_bps = max_bps
        self.rtt_us = 100_000
        self.link = LinkCapacity()
        self._last_change: int | None = None
        self._last_decrease: int | None = None

    def set_estimate(self, bps: float, now_us: int) -> None:
        """Jump to ``bps`` (a probe result)."""
        self.bitrate = self._clamp(bps)
        self._last_change = now_us

    def time_to_reduce(self, now_us: int, throughput_bps: float) -> bool:
        """Whether an overuse may decrease again: once per RTT (10..200 ms), or at once if the throughput is
        under half the estimate."""
        interval = min(max(self.rtt_us, 10_000), 200_000)
        if self._last_change is None or now_us - self._last_change >= interval:
            return True
        return throughput_bps < 0.5 * self.bitrate

    def update(self, usage: str, throughput_bps: float | None, now_us: int, beta: float = BETA) -> None:
        """Apply one detector state with the current acknowledged throughput (``None`` while unknown);
        ``beta``: the multiple of the throughput an overuse decreases to."""
        if usage == NORMAL:
            if self.state == HOLD:
                self._last_change = now_us
                self.state = INCREASE
        elif usage == OVERUSING:
            self.state = DECREASE
        else:
            self.state = HOLD
        if self.state == INCREASE:
            throughput = throughput_bps if throughput_bps is not None else self.bitrate
            if throughput > self.link.upper_bps():
                self.link.reset()  # far above the capacity last measured: search again, multiplicatively
            limit = 1.5 * throughput + 10_000
            if self.bitrate < limit:
                elapsed = 0.0 if self._last_change is None else (now_us - self._last_change) / 1e6
                if self.link.estimate_kbps is not None:
                    increased = self.bitrate + self._near_max_rate() * elapsed
                else:
                    alpha = 1.08 ** min(elapsed, 1.0)
                    increased = self.bitrate + max(self.bitrate * (alpha - 1.0), 1000.0)
                self.bitrate = self._clamp(min(increased, limit))
            self._last_change = now_us
        elif self.state == DECREASE:
            throughput = throughput_bps if throughput_bps is not None else self.bitrate
            # An SFU sends whole layers, often well below the estimate (application-limited): then the
            # acknowledged throughput says little about the link, and one overuse signal must not take the
            # estimate down to it (Chorus addition: at most a halving per decrease; only a throughput near the
            # estimate is taken as the link's capacity).
            limited = throughput < self.APP_LIMITED * self.bitrate
            decreased = beta * throughput
            if decreased > self.bitrate and self.link.estimate_kbps is not None:
                decreased = beta * self.link.estimate_kbps * 1000
            decreased = max(decreased, self.MAX_DECREASE * self.bitrate)
            if decreased < self.bitrate:
                self.bitrate = self._clamp(decreased)
            if not limited:
                if throughput < self.link.lower_bps():
                    self.link.reset()
                self.link.update(throughput)
            self.state = HOLD  # until the queue has drained
            self._last_change = self._last_decrease = now_us

    #: One overuse decrease goes at most this far down (a multiple of the estimate).
    MAX_DECREASE = 0.5
    #: Sending less than this share of the estimate is application-limited (see :meth:`update`).
    APP_LIMITED = 0.5

    def _near_max_rate(self) -> float:
        """Additive increase in bps per second: one average packet per response time (RTT + 100 ms), at
        least 4 kbps/s (libwebrtc ``GetNearMaxIncreaseRateBpsPerSecond``)."""
        frame_bits = self.bitrate / 30
        packets_per_frame = math.ceil(frame_bits / (1200 * 8))
        avg_packet_bits = frame_bits / max(packets_per_frame, 1)
        response_s = (self.rtt_us + 100_000) / 1e6
        return max(4000.0, avg_packet_bits / response_s)

    def _clamp(self, bps: float) -> float:
        return min(max(bps, float(self.min_bps)), float(self.max_bps))


class LossBasedControl:
    """
    A cap from the loss fraction reported by feedback (libwebrtc ``SendSideBandwidthEstimation``, the
    classic rules): computed over at least 20 packets; > 10 % → cap = rate × (1 − loss/2), at most every
    300 ms + RTT; 2..10 % → hold; < 2 % → the cap rises 8 %/s and is lifted once it no longer limits.
    """

    MIN_PACKETS = 20
    LOW = 0.02
    HIGH = 0.10

    __slots__ = ("cap_bps", "loss_fraction", "_received", "_lost", "_last_decrease", "_last_update")

    def __init__(self) -> None:
        self.cap_bps: float | None = None
        self.loss_fraction = 0.0
        self._received = 0
        self._lost = 0
        self._last_decrease: int | None = None
        self._last_update: int | None = None

    def add(self, received: int, lost: int) -> bool:
        """Count reported packets; ``True`` when a new loss fraction is ready."""
        self._received += received
        self._lost = max(self._lost + lost, 0)
        total = self._received + self._lost
        if total < self.MIN_PACKETS:
            return False
        self.loss_fraction = self._lost / total
        self._received = self._lost = 0
        return True

    #: A decrease never goes below this share of what the link is delivering (Chorus addition: a sudden cap
    #: loses most of what was in flight for a while, and compounding "rate × (1 − loss/2)" every few hundred
    #: milliseconds would take the estimate to the floor, far below the new capacity).
    DELIVERED_FLOOR = 0.8

    def update(self, current_bps: float, delay_based_bps: float, rtt_us: int, now_us: int,
               delivered_bps: float | None = None) -> bool:
        """Apply the latest loss fraction; ``True`` when it decreased the cap. ``delivered_bps``: the acknowledged
        throughput, below :data:`DELIVERED_FLOOR` of which a decrease does not go."""
        elapsed = 0.0 if self._last_update is None else (now_us - self._last_update) / 1e6
        self._last_update = now_us
        loss = self.loss_fraction
        if loss > self.HIGH:
            if self._last_decrease is None or now_us - self._last_decrease >= 300_000 + rtt_us:
                cap = current_bps * (1 - 0.5 * loss)
                if delivered_bps is not None:
                    cap = max(cap, min(current_bps, self.DELIVERED_FLOOR * delivered_bps))
                self.cap_bps = cap
                self._last_decrease = now_us
                return True
        elif loss < self.LOW and self.cap_bps is not None:
            self.cap_bps *= 1.08 ** min(elapsed, 1.0)
            if self.cap_bps >= delay_based_bps:
                self.cap_bps = None
        return False


@dataclass(frozen=True, slots=True)
class ProbeCluster:
    """
    A request to probe: for ``duration_us``, send :meth:`padding_bytes` on top of the media (so that the
    total is ``bitrate_bps``) in at least ``min_packets`` packets spaced evenly over the duration (a burst
    sent at once measures nothing), and tag every packet sent meanwhile, media too, with ``cluster_id`` in
    :meth:`SendSideBwe.on_packet_sent`. libwebrtc sends padding-only RTP packets (RFC 3550 §5.1 P bit, 255
    bytes of padding at most per packet) or RTX copies of recent packets.
    """

    cluster_id: int
    bitrate_bps: int
    duration_us: int
    min_packets: int

    @property
    def bytes(self) -> int:
        """Bytes the whole cluster carries."""
        return self.bitrate_bps * self.duration_us // 8_000_000

    def padding_bytes(self, media_bps: int) -> int:
        """Padding to send over the cluster while media goes on at ``media_bps``: the difference."""
        return max(0, self.bitrate_bps - media_bps) * self.duration_us // 8_000_000


class ProbeEstimator:
    """
    The rate a probe cluster got through (libwebrtc ``ProbeBitrateEstimator``): needs 80 % of the cluster's
    packets acknowledged; send rate = bytes without the last sent packet over the send interval, receive rate
    = bytes without the first received over the arrival interval; the result is the smaller, or 95 % of the
    receive rate when that is under 90 % of the send rate (the link was saturated). A receive rate above
    twice the send rate is not plausible: no result.
    """

    MIN_ACKED = 0.8

    __slots__ = ("_clusters",)

    def __init__(self) -> None:
        # cluster id → ([packets sent], acknowledged [(send, arrival, size)])
        self._clusters: dict[int, tuple[list[int], list[tuple[int, int, int]]]] = {}

    def on_sent(self, cluster_id: int) -> None:
        """One more packet sent for ``cluster_id``."""
        entry = self._clusters.get(cluster_id)
        if entry is None:
            self._clusters[cluster_id] = ([1], [])
        else:
            entry[0][0] += 1

    def on_acked(self, cluster_id: int, send_us: int, arrival_us: int, size: int) -> None:
        """One of its packets was acknowledged."""
        entry = self._clusters.get(cluster_id)
        if entry is not None:
            entry[1].append((send_us, arrival_us, size))

    def result(self, cluster_id: int, min_packets: int, min_bytes: int = 0) -> float | None:
        """The cluster's rate once enough of it is acknowledged, else ``None``. ``min_bytes``: what the whole
        cluster carries; 80 % of it must be acknowledged too (as libwebrtc's ``kMinReceivedBytesRatio``), or
        feedback arriving while the cluster is still being sent would measure its first few packets only."""
        entry = self._clusters.get(cluster_id)
        if entry is None:
            return None
        sent, acked = entry[0][0], entry[1]
        if len(acked) < max(min_packets, 2) * self.MIN_ACKED or len(acked) < sent * self.MIN_ACKED:
            return None
        if sum(p[2] for p in acked) < min_bytes * self.MIN_ACKED:
            return None
        by_send = sorted(acked)
        send_interval = by_send[-1][0] - by_send[0][0]
        by_arrival = sorted(acked, key=lambda p: p[1])
        recv_interval = by_arrival[-1][1] - by_arrival[0][1]
        if send_interval <= 0 or send_interval > 1_000_000 or recv_interval <= 0:
            return None
        total = sum(p[2] for p in acked)
        send_bps = (total - by_send[-1][2]) * 8e6 / send_interval
        recv_bps = (total - by_arrival[0][2]) * 8e6 / recv_interval
        if recv_bps > 2 * send_bps:
            return None
        if recv_bps < 0.9 * send_bps:
            return 0.95 * recv_bps
        return min(send_bps, recv_bps)

    def forget(self, cluster_id: int) -> None:
        """Drop a cluster's records (result taken, or timed out)."""
        self._clusters.pop(cluster_id, None)


class ProbeController:
    """
    When to probe (after libwebrtc ``ProbeController``, driven by demand instead of ALR detection): only while
    the caller wants more than 1.05 × the estimate and the last second had no congestion. First probe at 3 ×
    the estimate; after a success (the estimate reached 70 % of the target) the next at 2 × at once; after a
    failure wait ``interval_us`` (1 s, doubling up to 3 s) and try 2 × the estimate again. Targets never
    exceed 1.25 × demand.
    """

    DURATION_US = 40_000
    MIN_PACKETS = 5
    TIMEOUT_US = 1_000_000
    MIN_INTERVAL_US = 1_000_000
    MAX_INTERVAL_US = 3_000_000
    SUCCESS = 0.7

    __slots__ = ("demand_bps", "interval_us", "in_flight", "sent", "succeeded", "_next_id", "_next_time",
                 "_started", "_probed")

    def __init__(self) -> None:
        self.demand_bps = 0
        self.interval_us = self.MIN_INTERVAL_US
        self.in_flight: ProbeCluster | None = None
        #: Clusters started, and those that reached 70 % of their rate (diagnostics).
        self.sent = 0
        self.succeeded = 0
        self._next_id = 1
        self._next_time = 0
        self._started = 0
        self._probed = False

    def poll(self, now_us: int, estimate_bps: float, quiet: bool, max_bps: int) -> ProbeCluster | None:
        """A new cluster to send now, or ``None``. ``quiet``: no overuse or loss decrease for a second."""
        if self.in_flight is not None or now_us < self._next_time or not quiet:
            return None
        if self.demand_bps <= estimate_bps * 1.05:
            return None
        factor = 2.0 if self._probed else 3.0
        target = min(estimate_bps * factor, self.demand_bps * 1.25, float(max_bps))
        if target <= estimate_bps * 1.1:
            return None
        cluster = ProbeCluster(self._next_id, int(target), self.DURATION_US, self.MIN_PACKETS)
        self._next_id += 1
        self.in_flight = cluster
        self.sent += 1
        self._started = now_us
        self._probed = True
        return cluster

    def timed_out(self, now_us: int) -> bool:
        """Whether the in-flight cluster has had no result a second after it was sent."""
        return self.in_flight is not None and now_us - self._started > self.DURATION_US + self.TIMEOUT_US

    def finish(self, now_us: int, estimate_bps: float) -> None:
        """The in-flight cluster got its result (or timed out); ``estimate_bps`` is the estimate after it."""
        cluster = self.in_flight
        self.in_flight = None
        if cluster is None:
            return
        if estimate_bps >= self.SUCCESS * cluster.bitrate_bps:
            self.succeeded += 1
            self.interval_us = self.MIN_INTERVAL_US
            self._next_time = now_us  # exponential: go on at once
        else:
            self._next_time = now_us + self.interval_us
            self.interval_us = min(self.interval_us * 2, self.MAX_INTERVAL_US)

    def backoff(self, now_us: int) -> None:
        """Congestion was just detected: no probing for a while."""
        self._next_time = max(self._next_time, now_us + self.interval_us)


class AckedThroughput:
    """
    Acknowledged throughput on the *receiver's* arrival clock (as libwebrtc's ``AcknowledgedBitrateEstimator``
    measures it): bytes that arrived within the last ``window_us`` before the newest arrival. That is the rate
    the bottleneck delivered, which an overuse decrease must get under. Never more than ``limit`` (the caller
    passes a multiple of what was sent), so compressed arrival times cannot inflate it.
    """

    __slots__ = ("window_us", "_packets", "_bytes", "_newest", "_oldest")

    def __init__(self, window_us: int = 250_000) -> None:
        self.window_us = window_us
        self._packets: deque[tuple[int, int]] = deque()  # (arrival, size)
        self._bytes = 0
        self._newest: int | None = None
        self._oldest: int | None = None

    def add(self, arrival_us: int, size: int) -> None:
        """One acknowledged packet."""
        if self._newest is None or arrival_us > self._newest:
            self._newest = arrival_us
        if self._oldest is None:
            self._oldest = arrival_us
        if arrival_us <= self._newest - self.window_us:
            return  # far out of order: already outside the window
        self._packets.append((arrival_us, size))
        self._bytes += size
        cutoff = self._newest - self.window_us
        packets = self._packets
        while packets and packets[0][0] <= cutoff:
            self._bytes -= packets.popleft()[1]

    def bps(self, limit: float) -> float | None:
        """The throughput, or ``None`` until one window of arrivals has been seen."""
        if self._newest is None or self._oldest is None or self._newest - self._oldest < self.window_us:
            return None
        return min(self._bytes * 8e6 / self.window_us, limit)


class QueueDelay:
    """
    Queuing delay from one-way delays (arrival on the remote clock − send on ours): the current value minus
    the smallest seen over the last ``base_window_us`` (the propagation delay plus the clock offset, which
    cancels out; the window follows clock drift). A Chorus addition to GCC, used to drain a standing queue.
    """

    __slots__ = ("base_window_us", "_minima", "current_us", "previous_us")

    def __init__(self, base_window_us: int = 10_000_000) -> None:
        self.base_window_us = base_window_us
        self._minima: deque[tuple[int, int]] = deque()  # (our time of the 1 s bucket, min one-way delay)
        self.current_us = 0
        self.previous_us = 0

    def update(self, one_way_us: int, now_us: int) -> None:
        """One feedback's smallest one-way delay (its least-queued packet)."""
        bucket = now_us - now_us % 1_000_000
        minima = self._minima
        if minima and minima[-1][0] == bucket:
            if one_way_us < minima[-1][1]:
                minima[-1] = (bucket, one_way_us)
        else:
            minima.append((bucket, one_way_us))
        while minima and minima[0][0] < now_us - self.base_window_us:
            minima.popleft()
        self.previous_us = self.current_us
        self.current_us = max(0, one_way_us - min(m for _, m in minima))

    def growing_above(self, threshold_us: int) -> bool:
        """Whether the queue holds more than ``threshold_us`` and grew since the previous feedback."""
        return self.current_us > threshold_us and self.current_us > self.previous_us


class SendSideBwe:
    """
    The bandwidth estimate of one subscribe connection (see the module docstring).

    Lifecycle: created with the connection; REMB-only until the first transport-cc feedback arrives, then
    transport-cc drives it (REMB, if any, only caps it). Call :meth:`on_packet_sent` for every RTP packet
    carrying the transport-wide sequence number, :meth:`on_feedback` for every feedback datagram,
    :meth:`poll_probe` every ~25 ms and :meth:`set_demand` when the wanted rate changes; read
    :attr:`estimate_bps` and :attr:`state` (diagnostics: ``start``, ``remb``, ``increase``, ``hold``,
    ``increase: probe``, ``probing``, ``decrease: overuse``, ``hold: overuse``, ``decrease: loss``,
    ``hold: loss``).

    :param start_bps: the estimate before any feedback.
    :param min_bps, max_bps: the estimate never leaves these bounds.
    """

    HISTORY_US = 10_000_000
    SENT_WINDOW_US = 500_000
    SENT_LONG_WINDOW_US = 2_000_000
    PROBE_VALID_US = 5_000_000
    #: Above this queuing delay an overuse decrease also drains the queue (see :meth:`_drain_factor`).
    DRAIN_ABOVE_US = 100_000
    #: A queue growing beyond this is overuse whatever the trendline says (it lags when a drop in capacity
    #: leaves only a few groups per second: a 10 KB frame takes 280 ms through 300 kbit/s).
    QUEUE_OVERUSE_US = 150_000
    #: A queue growing beyond this stops increases (holds) before the trendline sees overuse.
    QUEUE_HOLD_US = 50_000

    def __init__(self, *, start_bps: int = START_BPS, min_bps: int = MIN_BPS, max_bps: int = MAX_BPS) -> None:
        if not 0 < min_bps <= start_bps <= max_bps:
            raise ValueError(f"need 0 < min_bps <= start_bps <= max_bps, got {min_bps}, {start_bps}, {max_bps}")
        self.min_bps = min_bps
        self.max_bps = max_bps
        self.start_bps = start_bps
        #: What the estimator did last, for diagnostics.
        self.state = "start"
        #: Round-trip time: from :meth:`set_rtt`, else send-to-feedback time (includes the feedback interval).
        self.rtt_us: int | None = None
        #: The receiver's REMB (the minimum over the last second), if it sends any.
        self.remb_bps: int | None = None
        #: The last probe result.
        self.probe_bps: int | None = None
        #: Acknowledged throughput (bps) when last updated, ``None`` until known.
        self.acked_bps: int | None = None
        #: Sent rate over the last 500 ms (bps) when last updated, ``None`` until known.
        self.sent_bps: int | None = None
        self.inter_arrival = InterArrival()
        self.trendline = TrendlineEstimator()
        self.aimd = AimdRateControl(start_bps, min_bps, max_bps)
        self.loss = LossBasedControl()
        self.probes = ProbeController()
        self.queue = QueueDelay()
        self._probe_estimator = ProbeEstimator()
        self._throughput = AckedThroughput()
        self._estimate = float(start_bps)
        self._published = float(start_bps)  # the last estimate published (see :meth:`_publish`)
        # transport seq (unwrapped) → (send time, size, cluster id or 0, 1 once reported lost)
        self._sent: dict[int, tuple[int, int, int, int]] = {}
        self._oldest_sent = 0
        self._last_seq: int | None = None
        self._sent_rate = _RateWindow(self.SENT_WINDOW_US)
        self._sent_long = _RateWindow(self.SENT_LONG_WINDOW_US, buckets=20)  # bounds the acked throughput
        self._twcc = False
        self._remb: deque[tuple[int, int]] = deque()  # (time, bps) over the last second
        self._rtt_override = False
        self._last_congestion = -(10**12)
        self._probe_time = -(10**12)

    # --- inputs -------------------------------------------------------------------------------------

    def on_packet_sent(self, seq: int, size_bytes: int, send_time_us: int, probe_cluster: int | None = None) -> None:
        """A packet left with transport-wide sequence number ``seq`` (16-bit, as written), ``size_bytes``
        long, at ``send_time_us``; ``probe_cluster``: the id of the probe cluster it was sent for."""
        last = self._last_seq
        if last is None:
            ext = self._oldest_sent = self._last_seq = seq & 0xFFFF
        else:
            ext = last + ((seq - last + 0x8000) & 0xFFFF) - 0x8000
            if ext > last:
                self._last_seq = ext
        self._sent[ext] = (send_time_us, size_bytes, probe_cluster or 0, 0)
        self._sent_rate.add(send_time_us, size_bytes)
        self._sent_long.add(send_time_us, size_bytes)
        if probe_cluster:
            self._probe_estimator.on_sent(probe_cluster)

    def on_feedback(self, results: Iterable[tuple[int, int | None]], now_us: int) -> None:
        """
        Apply one feedback datagram's packet statuses: ``(seq, arrival µs on the remote clock, or None if
        reported lost)``, as :meth:`chorus.sfu.twcc.FeedbackReader.read` returns them. Unknown, forgotten
        (older than 10 s) and already acknowledged sequence numbers are ignored.
        """
        last = self._last_seq
        if last is None:
            return
        self._twcc = True
        sent = self._sent
        received: list[tuple[int, int, int, int]] = []  # (arrival, send, size, cluster)
        lost = 0
        for seq, arrival in results:
            ext = last + ((seq - last + 0x8000) & 0xFFFF) - 0x8000
            entry = sent.get(ext)
            if entry is None:
                continue
            if arrival is None:
                if not entry[3]:  # count each loss once, however often it is reported
                    lost += 1
                    sent[ext] = (entry[0], entry[1], entry[2], 1)
                continue
            del sent[ext]
            if entry[3]:
                lost -= 1  # reported lost before, arrived after all
            received.append((arrival, entry[0], entry[1], entry[2]))
        if not received and not lost:
            return
        if received:
            newest_send = max(r[1] for r in received)
            if not self._rtt_override:
                sample = max(now_us - newest_send, 1000)
                self.rtt_us = sample if self.rtt_us is None else (7 * self.rtt_us + sample) // 8
            self.queue.update(min(r[0] - r[1] for r in received), now_us)
        if self.rtt_us is not None:
            self.aimd.rtt_us = self.rtt_us
        received.sort()
        usage = self.trendline.state
        throughput = self._throughput
        for arrival, send, size, cluster in received:
            throughput.add(arrival, size)
            if cluster:
                self._probe_estimator.on_acked(cluster, send, arrival, size)
            deltas = self.inter_arrival.compute(send, arrival, now_us)
            if deltas is not None:
                usage = self.trendline.update(deltas[1] / 1000, deltas[0] / 1000, arrival / 1000)
        if received and usage != OVERUSING:
            if self.queue.growing_above(self.QUEUE_OVERUSE_US):
                usage = OVERUSING
            elif usage == NORMAL and self.queue.growing_above(self.QUEUE_HOLD_US):
                usage = UNDERUSING  # i.e. hold: the queue is building, do not add to it
        self._update(usage, len(received), lost, now_us)
        self._forget(now_us)

    def on_remb(self, bps: int, now_us: int) -> None:
        """A REMB from the receiver: the whole estimate in REMB-only mode, else a cap. Decreases apply at
        once, increases once they have held for a second (the minimum over the last second is used)."""
        bps = int(min(max(bps, 0), self.max_bps))
        remb = self._remb
        remb.append((now_us, bps))
        while remb and remb[0][0] < now_us - 1_000_000:
            remb.popleft()
        self.remb_bps = min(b for _, b in remb)
        if not self._twcc:
            self._estimate = float(self.remb_bps)
            self.state = "remb"
        self._publish(now_us)

    def set_rtt(self, rtt_us: int) -> None:
        """The round-trip time from RTCP receiver reports, used instead of the feedback-based one."""
        self._rtt_override = True
        self.rtt_us = self.aimd.rtt_us = max(int(rtt_us), 1000)

    def set_demand(self, bps: int) -> None:
        """What the caller would send with unlimited bandwidth (e.g. the sum of the wanted layers): probing
        happens only while the estimate is below it."""
        self.probes.demand_bps = max(int(bps), 0)

    def poll_probe(self, now_us: int) -> ProbeCluster | None:
        """A probe cluster to send now, or ``None``. Needs transport-cc feedback: never in REMB-only mode
        (there, :attr:`padding_bps` says how much padding would let REMB rise)."""
        if not self._twcc:
            return None
        in_flight = self.probes.in_flight
        if in_flight is not None and self.probes.timed_out(now_us):
            self._probe_estimator.forget(in_flight.cluster_id)
            self.probes.finish(now_us, self._estimate)
        quiet = now_us - self._last_congestion > 1_000_000
        cluster = self.probes.poll(now_us, self._estimate, quiet, self.max_bps)
        if cluster is not None:
            self.state = "probing"
        return cluster

    # --- outputs ------------------------------------------------------------------------------------

    @property
    def estimate_bps(self) -> int:
        """The available bandwidth estimate, in bits per second."""
        return int(self._estimate)

    @property
    def padding_bps(self) -> int:
        """REMB-only mode: padding that would let the receiver's REMB (never above ~1.5 × what it receives)
        rise towards the demand — the estimate minus what is sent, while the demand is higher; else 0."""
        if self._twcc or self.probes.demand_bps <= self._estimate:
            return 0
        return max(0, int(self._estimate) - (self.sent_bps or 0))

    @property
    def loss_fraction(self) -> float:
        """The last loss fraction computed from feedback (0..1)."""
        return self.loss.loss_fraction

    @property
    def queue_delay_us(self) -> int:
        """The queuing delay seen in the last feedback (µs)."""
        return self.queue.current_us

    # --- internals ----------------------------------------------------------------------------------

    def _drain_factor(self) -> float:
        """The multiple of the acknowledged throughput to decrease to: libwebrtc's 0.85, lower when the
        queue holds more than :data:`DRAIN_ABOVE_US` — enough to drain it in about a second (at least 0.5)."""
        queued_s = self.queue.current_us / 1e6
        if self.queue.current_us <= self.DRAIN_ABOVE_US:
            return AimdRateControl.BETA
        return max(0.5, min(AimdRateControl.BETA, 1.0 - queued_s))

    def _update(self, usage: str, received: int, lost: int, now_us: int) -> None:
        self.sent_bps = self._sent_rate.bps(now_us)
        # Lying arrival times cannot make the throughput more than 1.5 × what was sent (over 2 s: a draining
        # queue may deliver more than is being sent right after a decrease).
        sent_long = self._sent_long.bps(now_us)
        acked = self._throughput.bps(1.5 * max(sent_long or 0, self.sent_bps or 0) if sent_long else math.inf)
        self.acked_bps = None if acked is None else int(acked)
        aimd = self.aimd
        state = "hold: overuse"  # overusing, but decreased less than an RTT ago
        cluster = self.probes.in_flight
        probe_result = None
        if cluster is not None:
            probe_result = self._probe_estimator.result(cluster.cluster_id, cluster.min_packets, cluster.bytes)
            if probe_result is not None:
                # Never more than the cluster was sent at: lying feedback cannot lift the estimate further.
                probe_result = min(probe_result, float(cluster.bitrate_bps))
        if usage == OVERUSING:
            if acked is not None and aimd.time_to_reduce(now_us, acked):
                aimd.update(OVERUSING, acked, now_us, beta=self._drain_factor())
                state = "decrease: overuse"
                self._congestion(now_us)
            elif acked is None and aimd.time_to_reduce(now_us, math.inf):
                aimd.set_estimate(aimd.bitrate / 2, now_us)  # overuse before any throughput: halve
                state = "decrease: overuse"
                self._congestion(now_us)
        elif probe_result is not None and probe_result > aimd.bitrate:
            aimd.set_estimate(probe_result, now_us)
            aimd.link.reset()
            self.loss.cap_bps = None
            state = "increase: probe"
        else:
            aimd.update(usage, acked, now_us)
            state = "increase" if aimd.state == INCREASE else "hold"
        if probe_result is not None and self.loss.cap_bps is not None and probe_result > self.loss.cap_bps \
                and self.loss.loss_fraction < LossBasedControl.HIGH:
            # The link just carried the probe's rate: the loss cap (which only creeps up 8 %/s after a sudden
            # drop in capacity) need not stay below it.
            self.loss.cap_bps = probe_result
            if state == "hold":
                state = "increase: probe"
        if probe_result is not None and cluster is not None:
            self.probe_bps = int(probe_result)
            self._probe_time = now_us
            self._probe_estimator.forget(cluster.cluster_id)
            self.probes.finish(now_us, max(aimd.bitrate, probe_result))
        if self.loss.add(received, lost) and self.loss.update(self._estimate, aimd.bitrate,
                                                              self.rtt_us or 100_000, now_us, acked):
            state = "decrease: loss"
            self._congestion(now_us)
        estimate = aimd.bitrate
        if self.loss.cap_bps is not None and self.loss.cap_bps < estimate:
            estimate = self.loss.cap_bps
            if state in ("increase", "hold"):
                state = "hold: loss"
        self._estimate = estimate
        if self.probes.in_flight is not None and not state.startswith("decrease"):
            state = "probing"
        self.state = state
        self._publish(now_us)

    def _congestion(self, now_us: int) -> None:
        self._last_congestion = now_us
        self.probes.backoff(now_us)

    def _publish(self, now_us: int) -> None:
        """Clamp: bounds, REMB cap, and growth to ~2 × measured throughput (or the start rate, or a recent probe)."""
        estimate = self._estimate
        if self._twcc and self.remb_bps is not None and self.remb_bps < estimate:
            estimate = float(self.remb_bps)
        if not self._twcc:
            self.sent_bps = self._sent_rate.bps(now_us)
        measured = self.acked_bps if self._twcc else self.sent_bps
        if measured is not None:
            allowance = max(2.0 * measured, float(self.start_bps))
            if self.probe_bps is not None and now_us - self._probe_time < self.PROBE_VALID_US:
                allowance = max(allowance, float(self.probe_bps))
            # The throughput caps how far the estimate may *grow*; sending less than it (a viewer who shrank a
            # tile: application-limited) never lowers a transport-cc estimate (libwebrtc caps AIMD increases only),
            # or it would be gone by the time the viewer wants the larger layer back. REMB follows the receiver.
            ceiling = max(allowance, self._published) if self._twcc else allowance
            if estimate > ceiling:
                estimate = ceiling
                if self._twcc and self.aimd.bitrate > ceiling:
                    self.aimd.bitrate = ceiling  # keep the controller honest too
        self._estimate = min(max(estimate, float(self.min_bps)), float(self.max_bps))
        self._published = self._estimate

    def _forget(self, now_us: int) -> None:
        """Drop send records older than :attr:`HISTORY_US` (their feedback is not coming any more)."""
        sent = self._sent
        cutoff = now_us - self.HISTORY_US
        seq = self._oldest_sent
        last = self._last_seq if self._last_seq is not None else seq
        while seq <= last:
            entry = sent.get(seq)
            if entry is not None:
                if entry[0] >= cutoff:
                    break
                del sent[seq]
            seq += 1
        self._oldest_sent = seq
