"""Prometheus metrics, computed when scraped from the live rooms plus the totals of closed objects."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sfu.stats import TOTALS

from .room import RoomRegistry


class MediaCollector(Collector):
    """Gauges of rooms/peers/producers/consumers and media counters, read from the registry on scrape
    (nothing is counted per packet for metrics' sake)."""

    def __init__(self, registry: RoomRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rooms = list(self._registry.rooms.values())
        peers = [p for r in rooms for p in r.router.peers.values()]
        producers = [pr for p in peers for pr in p.producers.values()]
        consumers = [c for p in peers for c in p.consumers.values()]
        yield GaugeMetricFamily("chorus_rooms", "Rooms open", value=len(rooms))
        yield GaugeMetricFamily("chorus_peers", "Participants connected", value=len(peers))
        gauge = GaugeMetricFamily("chorus_producers", "Published tracks", labels=["kind"])
        for kind in ("audio", "video"):
            gauge.add_metric([kind], sum(1 for p in producers if p.kind == kind))
        yield gauge
        gauge = GaugeMetricFamily("chorus_consumers", "Forwarded tracks (one per subscriber)", labels=["kind"])
        for kind in ("audio", "video"):
            gauge.add_metric([kind], sum(1 for c in consumers if c.kind == kind))
        yield gauge

        def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("chorus_rtp_received_packets", "RTP packets received from publishers",
                      TOTALS.packets_received + sum(p.stats.packets for p in producers))
        yield counter("chorus_rtp_received_bytes", "RTP payload bytes received from publishers",
                      TOTALS.bytes_received + sum(p.stats.bytes for p in producers))
        yield counter("chorus_rtp_forwarded_packets", "RTP packets forwarded to subscribers",
                      TOTALS.packets_forwarded + sum(c.stats.packets for c in consumers))
        yield counter("chorus_rtp_forwarded_bytes", "RTP payload bytes forwarded to subscribers",
                      TOTALS.bytes_forwarded + sum(c.stats.bytes for c in consumers))
        yield counter("chorus_keyframe_requests", "PLIs sent to publishers (after merging)",
                      TOTALS.keyframe_requests + sum(p.stats.keyframe_requests for p in producers))
        yield counter("chorus_subscriber_plis", "PLIs received from subscribers",
                      TOTALS.plis + sum(c.stats.plis for c in consumers))
        yield counter("chorus_subscriber_nacks", "NACK packets received from subscribers",
                      TOTALS.nacks + sum(c.stats.nacks for c in consumers))
        yield counter("chorus_retransmitted_packets", "Packets resent from the NACK cache",
                      TOTALS.retransmitted + sum(c.stats.retransmitted for c in consumers))


class Metrics:
    """The metrics of one Chorus app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.errors = Counter("chorus_signaling_errors", "Error responses sent, by code", ["code"],
                              registry=self.registry)
        self.sessions = Counter("chorus_websocket_sessions", "Websocket sessions opened", registry=self.registry)
        self.webhooks = Counter("chorus_webhooks", "Webhook deliveries, by outcome", ["outcome"],
                                registry=self.registry)

    def watch(self, rooms: RoomRegistry) -> None:
        """Report the media plane of ``rooms``."""
        self.registry.register(MediaCollector(rooms))

    def render(self) -> bytes:
        return generate_latest(self.registry)
