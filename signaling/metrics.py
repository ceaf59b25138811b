"""Prometheus metrics, computed when scraped from the live rooms plus the totals of closed objects."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from chorus.egress.manager import EgressManager
from chorus.ingest import KINDS, IngressManager
from chorus.sfu import stats

from .loophealth import BUCKETS, LoopMonitor
from .room import RoomRegistry

#: Prometheus name, help, and the process counter (sfu.stats) behind it.
COUNTERS = [
    ("chorus_rtp_received_packets", "RTP packets received from publishers", "packets_received"),
    ("chorus_rtp_received_bytes", "RTP payload bytes received from publishers", "bytes_received"),
    ("chorus_rtp_forwarded_packets", "RTP packets forwarded to subscribers", "packets_forwarded"),
    ("chorus_rtp_forwarded_bytes", "RTP payload bytes forwarded to subscribers", "bytes_forwarded"),
    ("chorus_keyframe_requests", "PLIs sent to publishers (after merging)", "keyframe_requests"),
    ("chorus_subscriber_plis", "PLIs received from subscribers", "plis"),
    ("chorus_subscriber_nacks", "NACK packets received from subscribers", "nacks"),
    ("chorus_retransmitted_packets", "Packets resent from the NACK cache", "retransmitted"),
]


class MediaCollector(Collector):
    """Gauges of rooms/peers/producers/consumers and media counters, read from the registry on scrape
    (nothing is counted per packet for metrics' sake)."""

    def __init__(self, registry: RoomRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        routers = [r.router for r in self._registry.rooms.values()]
        counts = [router.counts() for router in routers]
        yield GaugeMetricFamily("chorus_rooms", "Rooms open", value=len(routers))
        yield GaugeMetricFamily("chorus_peers", "Participants connected", value=sum(c.peers for c in counts))
        gauge = GaugeMetricFamily("chorus_producers", "Published tracks", labels=["kind"])
        for kind in ("audio", "video"):
            gauge.add_metric([kind], sum(c.producers[kind] for c in counts))
        yield gauge
        gauge = GaugeMetricFamily("chorus_consumers", "Forwarded tracks (one per subscriber)", labels=["kind"])
        for kind in ("audio", "video"):
            gauge.add_metric([kind], sum(c.consumers[kind] for c in counts))
        yield gauge
        yield GaugeMetricFamily("chorus_viewers", "WHEP viewers", value=sum(c.viewers for c in counts))

        gauge = GaugeMetricFamily("chorus_video_consumers_by_layer",
                                  "Forwarded video tracks by the simulcast layer sent (none: nothing yet)",
                                  labels=["layer"])
        layers: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        estimates: list[int] = []
        for c in counts:
            layers.update(c.video_layers)
            reasons.update(c.reasons)
            estimates += c.estimates
        for layer, n in sorted(layers.items()):
            gauge.add_metric([layer], n)
        yield gauge
        gauge = GaugeMetricFamily("chorus_video_consumers_by_reason",
                                  "Forwarded simulcast video tracks by why they get their layer", labels=["reason"])
        for reason, n in sorted(reasons.items()):
            gauge.add_metric([reason], n)
        yield gauge
        yield GaugeMetricFamily("chorus_subscriber_bandwidth_estimate_bps_sum",
                                "Sum of the subscribe connections' bandwidth estimates (bps)", value=sum(estimates))
        yield GaugeMetricFamily("chorus_subscriber_bandwidth_estimates",
                                "Subscribe connections with a bandwidth estimate", value=len(estimates))

        totals = stats.TOTALS.copy()
        for router in routers:
            totals.update(router.live_totals())
        for name, doc, counter in COUNTERS:
            yield CounterMetricFamily(name, doc, value=totals[counter])


class LoopCollector(Collector):
    """The event loop's lag (see loophealth.py)."""

    def __init__(self, monitor: LoopMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        m = self._monitor
        yield GaugeMetricFamily("chorus_event_loop_lag_seconds",
                                f"Worst event-loop lag of the last {m.window:g} s", value=m.recent_max)
        cumulative, buckets = 0, []
        for bound, count in zip((*[str(b) for b in BUCKETS], "+Inf"), m.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("chorus_event_loop_lag_samples_seconds", "Event-loop lag samples",
                                    buckets=buckets, sum_value=m.total)


class IngressCollector(Collector):
    """Ingress gauges and counters, read from the manager on scrape."""

    def __init__(self, manager: IngressManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        manager = self._manager
        live = GaugeMetricFamily("chorus_ingress_live", "Ingested streams publishing now", labels=["kind"])
        reencoding = 0
        for kind in KINDS:
            live.add_metric([kind], sum(1 for s in manager.live.values() if s.record.kind == kind))
        for session in manager.live.values():
            reencoding += int(session.bridge is not None and session.bridge.video_mode == "reencode")
        yield live
        yield GaugeMetricFamily("chorus_ingress_reencoding", "Ingested streams whose video is re-encoded",
                                value=reencoding)
        yield GaugeMetricFamily("chorus_ingresses", "Ingresses defined", value=len(manager.records))
        started = CounterMetricFamily("chorus_ingress_started", "Ingest sessions started", labels=["kind"])
        for kind in KINDS:
            started.add_metric([kind], manager.started_counts[kind])
        yield started
        ended = CounterMetricFamily("chorus_ingress_ended", "Ingest sessions ended, by reason",
                                    labels=["kind", "reason"])
        for (kind, reason), count in sorted(manager.ended_counts.items()):
            ended.add_metric([kind, reason], count)
        yield ended
        refused = CounterMetricFamily("chorus_ingress_refused", "Ingest connections refused, by error",
                                      labels=["protocol", "code"])
        for (proto, code), count in sorted(manager.refused_counts.items()):
            refused.add_metric([proto, code], count)
        yield refused
        received = CounterMetricFamily("chorus_ingress_received_bytes", "Media bytes ingested", labels=["kind"])
        totals = manager.totals()
        for kind in KINDS:
            received.add_metric([kind], totals[kind])
        yield received


class EgressCollector(Collector):
    """Egresses (HLS/DASH, recordings): how many run by kind and state, bytes written, how they ended, and the
    CPU their worker processes use."""

    def __init__(self, manager: EgressManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        egresses = self._manager.find()
        gauge = GaugeMetricFamily("chorus_egresses", "Egresses by kind and state", labels=["kind", "state"])
        for kind in ("hls", "record"):
            for state in ("starting", "waiting", "active", "ending"):
                gauge.add_metric([kind, state], sum(1 for e in egresses if e.kind == kind and e.state == state))
        yield gauge
        yield CounterMetricFamily("chorus_egress_bytes", "Bytes written by egresses (segments, recordings)",
                                  value=self._manager.bytes_written)
        totals = self._manager.totals
        yield CounterMetricFamily("chorus_egress_started", "Egresses started", value=totals.get("started", 0))
        ended = CounterMetricFamily("chorus_egress_ended", "Egresses ended, by reason", labels=["reason"])
        errors = CounterMetricFamily("chorus_egress_errors", "Egresses that failed, by error code", labels=["code"])
        for key, value in totals.items():
            if key.startswith("ended_"):
                ended.add_metric([key.removeprefix("ended_")], value)
            elif key.startswith("error_"):
                errors.add_metric([key.removeprefix("error_")], value)
        yield ended
        yield errors
        cpu = GaugeMetricFamily("chorus_egress_worker_cpu_percent",
                                "CPU of running egress workers per stage, % of one core", labels=["egress", "stage"])
        for egress in egresses:
            ladder = getattr(egress, "ladder", None)
            if ladder is not None and not egress.ended:
                for stage in ladder.stats.cpu:
                    cpu.add_metric([egress.id, stage], round(ladder.stats.percent_of_core(stage), 3))
        yield cpu


class Metrics:
    """The metrics of one Chorus app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.errors = Counter("chorus_signaling_errors", "Error responses sent, by code", ["code"],
                              registry=self.registry)
        self.sessions = Counter("chorus_websocket_sessions", "Websocket sessions opened", registry=self.registry)
        self.refused = Counter("chorus_connections_refused", "Websocket upgrades refused (HTTP 429), by reason",
                               ["reason"], registry=self.registry)
        self.join_timeouts = Counter("chorus_join_timeouts", "Websockets closed for not joining in time",
                                     registry=self.registry)
        self.webhooks = Counter("chorus_webhooks", "Webhook deliveries, by outcome", ["outcome"],
                                registry=self.registry)

    def watch(self, rooms: RoomRegistry, egress: EgressManager | None = None) -> None:
        """Report the media plane of ``rooms`` (and the egresses of ``egress``)."""
        self.registry.register(MediaCollector(rooms))
        if egress is not None:
            self.registry.register(EgressCollector(egress))

    def watch_loop(self, monitor: LoopMonitor) -> None:
        """Report the event loop's lag."""
        self.registry.register(LoopCollector(monitor))

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read from ``read()`` on every scrape."""
        self.registry.register(_Read(name, doc, read))

    def watch_ingress(self, manager: IngressManager) -> None:
        """Report the ingresses of ``manager``."""
        self.registry.register(IngressCollector(manager))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Read(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, doc, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._doc, value=self._read())
