"""
A deterministic network simulator for bandwidth-estimator tests: a sender that sends at
min(estimate, demand) with the estimator's probe clusters, a bottleneck (capacity, propagation delay,
drop-tail buffer) and a receiver that returns transport-cc feedback every 50 ms, built and parsed by
chorus.sfu.twcc. Time advances in 1 ms steps; no randomness unless a seed asks for it.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from chorus.sfu.bwe import ProbeCluster, SendSideBwe
from chorus.sfu.twcc import FeedbackReader, FeedbackRecorder

MS = 1000
PACKET = 1200
FPS = 30


class Link:
    """
    A FIFO bottleneck: ``capacity_bps`` (changeable at any time; queued packets are then served at the new
    rate), one-way ``delay_us``, drop-tail at ``buffer_bytes`` queued.
    """

    def __init__(self, capacity_bps: float, delay_us: int, buffer_bytes: int) -> None:
        self.capacity_bps = capacity_bps
        self.delay_us = delay_us
        self.buffer_bytes = buffer_bytes
        self.queue: deque[tuple[int, int, int]] = deque()  # (enqueue time, size, seq)
        self.queued_bytes = 0
        self.free_at = 0.0  # when the packet in service has left
        self.dropped = 0
        self.departed: list[tuple[int, int]] = []  # (arrival time at the receiver, seq), for the receiver

    def set_capacity(self, now: int, capacity_bps: float) -> None:
        self.serve(now)
        self.capacity_bps = capacity_bps

    def queue_delay_us(self, now: int) -> float:
        """How long a packet enqueued now would wait."""
        return self.queued_bytes * 8e6 / self.capacity_bps + max(0.0, self.free_at - now)

    def send(self, now: int, size: int, seq: int) -> None:
        self.serve(now)
        if self.queued_bytes + size > self.buffer_bytes:
            self.dropped += 1
            return
        self.queue.append((now, size, seq))
        self.queued_bytes += size

    def serve(self, now: int) -> None:
        """Move the packets that started service by ``now`` to :attr:`departed`."""
        while self.queue:
            enqueued, size, seq = self.queue[0]
            start = max(self.free_at, float(enqueued))
            if start > now:
                break
            self.queue.popleft()
            self.queued_bytes -= size
            self.free_at = start + size * 8e6 / self.capacity_bps
            self.departed.append((int(self.free_at) + self.delay_us, seq))


@dataclass
class Sample:
    t: int
    estimate: int
    queue_us: float
    state: str
    sent_bps: float


@dataclass
class Simulation:
    bwe: SendSideBwe
    link: Link
    demand_bps: int
    feedback_interval_us: int = 50 * MS
    loss: float = 0.0  # random loss before the bottleneck
    seed: int = 0
    samples: list[Sample] = field(default_factory=list)
    probes: list[ProbeCluster] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.recorder = FeedbackRecorder(sender_ssrc=1)
        self.reader = FeedbackReader()
        self.rng = random.Random(self.seed)
        self.now = 0
        self.seq = 0
        self.budget = 0.0
        self.next_frame = 0
        self.arrivals: list[tuple[int, int]] = []
        self.feedback: deque[tuple[int, bytes]] = deque()
        self.probe: ProbeCluster | None = None
        self.probe_start = 0
        self.probe_sent = 0
        self.sent_window: deque[tuple[int, int]] = deque()
        self.bwe.set_demand(self.demand_bps)

    def _send(self, size: int, cluster: int | None) -> None:
        seq = self.seq & 0xFFFF
        self.seq += 1
        self.bwe.on_packet_sent(seq, size, self.now, cluster)
        self.sent_window.append((self.now, size))
        if self.loss and self.rng.random() < self.loss:
            return
        self.link.send(self.now, size, seq)

    def run_until(self, end_us: int) -> None:
        bwe = self.bwe
        while self.now < end_us:
            now = self.now
            # Sender: media at min(estimate, demand) as 30 fps frames, each a burst of packets (as an SFU
            # forwards them); probe padding paced over the cluster.
            rate = min(bwe.estimate_bps, self.demand_bps)
            self.budget += rate / 8 / 1000
            cluster_id = None
            probe = self.probe
            if probe is not None:
                if now < self.probe_start + probe.duration_us:
                    cluster_id = probe.cluster_id
                    total = probe.padding_bytes(rate)
                    count = max(probe.min_packets, math.ceil(total / PACKET))
                    size = max(total // count, 100)
                    due = (now - self.probe_start) * count // probe.duration_us + 1
                    while self.probe_sent < min(due, count):
                        self._send(size, cluster_id)
                        self.probe_sent += 1
                else:
                    self.probe = None
            if now >= self.next_frame:
                self.next_frame += 1_000_000 // FPS
                frame = int(self.budget)
                self.budget -= frame
                count = math.ceil(frame / PACKET)
                for _ in range(count):
                    self._send(max(frame // count, 50), cluster_id)
            # Receiver.
            self.link.serve(now)
            for item in self.link.departed:
                heapq.heappush(self.arrivals, item)
            self.link.departed.clear()
            while self.arrivals and self.arrivals[0][0] <= now:
                arrival, seq = heapq.heappop(self.arrivals)
                self.recorder.record(seq, arrival)
            if now % self.feedback_interval_us == 0:
                for packet in self.recorder.build():
                    self.feedback.append((now + self.link.delay_us, packet))
            while self.feedback and self.feedback[0][0] <= now:
                _, packet = self.feedback.popleft()
                bwe.on_feedback(self.reader.read(packet), now)
            if now % (25 * MS) == 0 and self.probe is None:
                new = bwe.poll_probe(now)
                if new is not None:
                    self.probe, self.probe_start, self.probe_sent = new, now, 0
                    self.probes.append(new)
            if now % (10 * MS) == 0:
                while self.sent_window and self.sent_window[0][0] < now - 500 * MS:
                    self.sent_window.popleft()
                sent = sum(s for _, s in self.sent_window) * 8 / 0.5
                self.samples.append(Sample(now, bwe.estimate_bps, self.link.queue_delay_us(now), bwe.state, sent))
            self.now += MS

    def window(self, start_us: int, end_us: int) -> list[Sample]:
        return [s for s in self.samples if start_us <= s.t < end_us]


def direction_changes(values: list[int], threshold: float = 0.1) -> int:
    """How often the series reverses direction by more than ``threshold`` (relative) from its last extreme."""
    changes = 0
    direction = 0
    extreme = values[0]
    for v in values[1:]:
        if direction >= 0 and v > extreme:
            extreme = v
            direction = 1 if direction == 0 and v > values[0] * (1 + threshold) else direction
        elif direction <= 0 and v < extreme:
            extreme = v
            direction = -1 if direction == 0 and v < values[0] * (1 - threshold) else direction
        if direction == 1 and v < extreme * (1 - threshold):
            changes += 1
            direction, extreme = -1, v
        elif direction == -1 and v > extreme * (1 + threshold):
            changes += 1
            direction, extreme = 1, v
    return changes
