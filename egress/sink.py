"""
An egress's sink on one media-plane source: forwarded RTP packets in, access units on the egress timeline out.

:class:`TrackSink` implements the :class:`~chorus.sfu.source.Sink` protocol. Its ``deliver`` only depacketizes
(:mod:`~chorus.egress.depacketize`: no decoding) and returns ``None``; whatever takes the units (a fragmenter, a
recorder, the ladder's pipe) is cheap on the event loop too, the encoding happens in the ladder's process.

**The egress timeline.** Every track of an egress is put on one clock: ticks of its own RTP clock rate (90 kHz
video, 48 kHz audio) since the egress's ``origin`` (a Unix time). A track is anchored once, after its first
``settle`` seconds: its offset is the smallest ``arrival - (pts - first pts) / clock rate`` seen over that time,
where ``arrival`` is when the *first* packet of the access unit arrived — the least delayed picture or packet,
so queueing, pacing and the transfer time of a large key frame do not shift the track. From then on the RTP
clock alone advances it. Audio and video of a participant therefore line up to within the difference of their
network delays (a few milliseconds on a LAN), and a participant who reconnects continues on the same clock.
The units of the settling time are held and then released, which costs the first second of output once, not
latency later.

**Simulcast.** An egress takes the top layer of a simulcast source: :attr:`TrackSink.wanted_layer` is always the
highest, so the publisher keeps sending it while an egress runs (an egress counts as a viewer for layer
pausing). If the publisher stops sending that layer anyway (its own bandwidth or CPU), the sink moves to the
highest layer still arriving at that layer's next key frame (requested), and back up when the top returns.
Layers have their own RTP timestamps, so a switch re-anchors on the arrival of the new layer's key frame.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from aiortc.rtp import RtpPacket

from chorus.egress.depacketize import AccessUnit, Depacketizer, Unwrapper, depacketizer_for
from chorus.sfu.logs import PeerLogger
from chorus.sfu.source import PacketMeta, Source

_log = PeerLogger(logging.getLogger("chorus.egress.sink"))

#: Seconds of a track observed before it is anchored on the egress timeline (see the module docstring).
SETTLE = 1.0
#: Units held at most while settling (a burst cannot grow memory).
MAX_SETTLE_UNITS = 400
#: How often (seconds) a simulcast sink checks which layers arrive, and asks again for a switch's key frame.
LAYER_CHECK = 0.5


def codec_name(mime_type: str) -> str:
    """``video/H264`` → ``h264``."""
    return mime_type.split("/", 1)[-1].lower()


class TrackSink:
    """
    One source of an egress (see the module docstring): ``on_unit`` gets its access units with ``pts`` on the
    egress timeline (ticks of the track's clock since ``origin``) and ``arrival`` the wall time that ``pts``
    stands for.

    Lifecycle: *settling* → *flowing* → *closed* (:meth:`close`, or the source ended: ``on_closed`` is called
    once). While the source is paused nothing arrives; :meth:`restart` waits for the next key frame and keeps
    the timeline.

    :param on_unit: called for every access unit, on the event loop.
    :param on_closed: called once when the source ends (not when :meth:`close` is called).
    """

    def __init__(self, egress_id: str, source: Source, *, origin: float, on_unit: Callable[[AccessUnit], None],
                 on_closed: Callable[[TrackSink], None] | None = None, settle: float = SETTLE,
                 log: PeerLogger | None = None) -> None:
        self.source = source
        self.kind = source.kind
        self.codec = codec_name(source.codec.mimeType)
        self.clock_rate = source.codec.clockRate
        self.origin = origin
        self.settle = settle
        self.closed = False
        self.units = 0
        self._id = f"{egress_id}:{source.id}"
        self._log = (log or _log).bind(sink=self._id, codec=self.codec)
        self._on_unit = on_unit
        self._on_closed = on_closed
        self._depacketizer: Depacketizer = self._new_depacketizer()  # raises EgressError unsupported_codec
        self._unwrap = Unwrapper(32)
        self._first_arrival: OrderedDict[int, float] = OrderedDict()  # RTP timestamp → first packet's arrival
        self._held: list[tuple[AccessUnit, int, float]] = []  # (unit, extended ts, first arrival) while settling
        self._settle_until: float | None = None
        self._first_ts: int | None = None
        self._anchor: float | None = None  # Unix time of ``_first_ts``
        self._rebase = False  # re-anchor at the next unit (a layer switch)
        self._last_arrival = 0.0
        #: The simulcast layer taken, and the one to switch to at its next key frame.
        self.layer = source.layer_count - 1
        self._target = self.layer
        self._checked = 0.0
        self._asked = 0.0
        self.layer_switches = 0

    @property
    def id(self) -> str:
        return self._id

    def _new_depacketizer(self) -> Depacketizer:
        return depacketizer_for(self.source.codec.mimeType, on_keyframe_needed=self.request_keyframe,
                                log=self._log)

    def attach(self) -> None:
        """Start receiving the source's packets (a video source is asked for a key frame)."""
        self.source.attach(self)
        self.request_keyframe()

    def request_keyframe(self) -> None:
        """Ask the publisher for a key frame of the layer taken (or being switched to)."""
        self.source.request_keyframe(self._target)

    # -- Sink

    @property
    def wanted_layer(self) -> int | None:
        """Always the top layer: an egress streams the best the publisher sends."""
        return self.source.layer_count - 1

    def deliver(self, packet: RtpPacket, meta: PacketMeta) -> None:
        if self.closed:
            return None
        if self.source.layer_count > 1 and not self._on_layer(meta):
            return None
        arrivals = self._first_arrival
        arrival = arrivals.get(packet.timestamp)
        if arrival is None:
            arrival = arrivals[packet.timestamp] = meta.now
            if len(arrivals) > 64:
                arrivals.popitem(last=False)
        self._last_arrival = meta.now
        for unit in self._depacketizer.push(packet, arrival):
            self._take(unit, unit.arrival if unit.arrival is not None else meta.now, meta.now)
        return None

    def _on_layer(self, meta: PacketMeta) -> bool:
        """Whether this packet is of the layer taken; switches layers at a key frame of the target."""
        if meta.now - self._checked >= LAYER_CHECK:
            self._checked = meta.now
            now = time.monotonic()
            active = [layer for layer in range(self.source.layer_count) if self.source.layer_active(layer)]
            best = max(active) if active else self.source.layer_count - 1
            if best != self._target or (best != self.layer and now - self._asked >= 2 * LAYER_CHECK):
                self._target = best
                self._asked = now
                if best != self.layer:
                    self.source.request_keyframe(best)
        if meta.layer == self.layer:
            return True
        if meta.layer != self._target or not meta.keyframe:
            return False
        self._log.info("simulcast layer switch", previous=self.layer, layer=meta.layer)
        self.layer = meta.layer
        self.layer_switches += 1
        self._depacketizer = self._new_depacketizer()
        self._unwrap = Unwrapper(32)
        self._first_arrival.clear()
        if self._anchor is not None:
            self._rebase = True
        else:  # still settling: start over on the new layer
            self._held.clear()
            self._first_ts = None
        return True

    def restart(self) -> None:
        """The source resumes after a pause: start again at its next key frame, on the same timeline."""
        self._depacketizer = self._new_depacketizer()
        self._first_arrival.clear()

    def source_closed(self) -> None:
        if self.closed:
            return
        self._flush()
        self.closed = True
        if self._on_closed is not None:
            self._on_closed(self)

    def close(self) -> None:
        """Detach from the source and release what the depacketizer still holds. Idempotent."""
        if self.closed:
            return
        self.source.detach(self)
        self._flush()
        self.closed = True

    # -- timeline

    def _take(self, unit: AccessUnit, arrival: float, now: float) -> None:
        ts = self._unwrap(unit.rtp_timestamp)
        if self._rebase:
            # Another layer, other RTP timestamps: continue the timeline from this unit's arrival.
            self._rebase = False
            self._first_ts, self._anchor = ts, arrival
        if self._anchor is None:
            if self._first_ts is None:
                self._first_ts = ts
                self._settle_until = now + self.settle
            self._held.append((unit, ts, arrival))
            assert self._settle_until is not None
            if now >= self._settle_until or len(self._held) >= MAX_SETTLE_UNITS:
                self._anchor = min(a - (t - self._first_ts) / self.clock_rate for _, t, a in self._held)
                self._log.debug("track anchored", offset_s=round(self._anchor - self.origin, 3),
                                held=len(self._held))
                held, self._held = self._held, []
                for u, t, _ in held:
                    self._emit(u, t)
            return
        self._emit(unit, ts)

    def _emit(self, unit: AccessUnit, ts: int) -> None:
        assert self._anchor is not None and self._first_ts is not None
        pts = round((self._anchor - self.origin) * self.clock_rate) + ts - self._first_ts
        if pts < 0:
            return  # before the egress began (only possible for a track anchored early by jitter)
        self.units += 1
        self._on_unit(replace(unit, pts=pts, arrival=self.origin + pts / self.clock_rate))

    def _flush(self) -> None:
        try:
            units = self._depacketizer.flush()
        except Exception:  # noqa: BLE001 (a broken tail must not stop the teardown)
            units = []
        for unit in units:
            # End of stream: a track still settling is anchored on what was seen.
            self._take(unit, unit.arrival or self._last_arrival, float("inf"))
        if self._held:  # anchor now on what was seen, and release it
            unit, _, arrival = self._held.pop()
            self._take(unit, arrival, float("inf"))
