"""A Router is one room's media plane: its peers, their sources, and who consumes what."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import stats
from .errors import InvalidStateError, NotFoundError
from .logs import PeerLogger
from .observer import RouterObserver, SubscribeOffer, TrackInfo
from .peer import Peer
from .producer import Producer


@dataclass(frozen=True)
class RouterCounts:
    """How much a router holds, for metrics and the admin API."""

    peers: int
    #: kind → published tracks
    producers: Counter[str]
    #: kind → forwarded tracks (one per subscriber)
    consumers: Counter[str]
    #: video consumers by the simulcast layer sent ("0", "1", "2"; "none" while nothing is)
    video_layers: Counter[str] = field(default_factory=Counter)
    #: video consumers of adaptive sources by the reason for their layer
    reasons: Counter[str] = field(default_factory=Counter)
    #: each subscribe connection's bandwidth estimate (bps), where it has one
    estimates: list[int] = field(default_factory=list)


def track_info(producer: Producer) -> TrackInfo:
    return TrackInfo(producer.id, producer.peer_id, producer.kind, producer.codec.mimeType, producer.paused)


class Router:
    """
    The media plane of one room.

    Every producer of a peer is consumed by every other peer of the room: a peer that joins late gets a
    consumer for each existing producer, and a new producer gets a consumer in every other peer. What happens
    is told to the ``observer`` (:class:`~.observer.RouterObserver`), in plain data.

    Lifecycle: *open* → *closed*; :meth:`close` closes every peer (and so every producer and consumer).
    """

    mode = "sfu"

    def __init__(self, room_id: str, observer: RouterObserver, *, log: PeerLogger) -> None:
        self.id = room_id
        self.closed = False
        self._peers: dict[str, Peer] = {}
        self._observer = observer
        self._log = log

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id}, peers={len(self._peers)})"

    # --- what the owner asks -----------------------------------------------------------------------------

    def create_peer(self, peer_id: str, name: str, *, subscribe: bool = True) -> Peer:
        """Add a participant; unless ``subscribe`` is false it consumes every producer already in the room
        and every later one.

        :raises InvalidStateError: the router is closed."""
        if self.closed:
            raise InvalidStateError(f"room {self.id} is closed")
        peer = Peer(peer_id, name, self, log=self._log.bind(peer=peer_id), subscribe=subscribe)
        self._peers[peer_id] = peer
        self._peer_joined(peer)
        return peer

    def peer(self, peer_id: str) -> Peer:
        """:raises NotFoundError: no such peer here."""
        peer = self._peers.get(peer_id)
        if peer is None:
            raise NotFoundError(f"no participant {peer_id!r} in room {self.id!r}")
        return peer

    async def remove_peer(self, peer_id: str) -> bool:
        """Close and remove a participant: its producers end for everyone. Whether it was here."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return False
        await peer.close()
        return True

    def set_muted(self, track_id: str, muted: bool) -> TrackInfo:
        """Pause or resume any participant's track (the owner's moderation).

        :raises NotFoundError: no such track in this room."""
        for peer in self._peers.values():
            if track_id in peer.producers:
                return track_info(peer.set_muted(track_id, muted))
        raise NotFoundError(f"no track {track_id!r} in room {self.id!r}")

    def describe_peers(self, *, exclude: str | None = None) -> list[dict[str, Any]]:
        """Every participant (id, name, tracks) but ``exclude``."""
        return [p.describe() for p in self._peers.values() if p.id != exclude]

    def describe(self) -> dict[str, Any]:
        """The room's media plane for the admin API."""
        return {"participants": [p.details() for p in self._peers.values()]}

    def set_preferences(self, peer_id: str, track_id: str, *, max_height: int | None, paused: bool) -> None:
        """A participant says how it shows a track it receives (see :meth:`Peer.set_preferences`).

        :raises NotFoundError: no such participant, or it receives no such track."""
        self.peer(peer_id).set_preferences(track_id, max_height=max_height, paused=paused)

    def counts(self) -> RouterCounts:
        peers = list(self._peers.values())
        video = [c for peer in peers for c in peer.consumers.values() if c.kind == "video"]
        return RouterCounts(
            len(peers),
            Counter(p.kind for peer in peers for p in peer.producers.values()),
            Counter(c.kind for peer in peers for c in peer.consumers.values()),
            Counter("none" if c.layer is None else str(c.layer) for c in video),
            Counter(c.reason for c in video if c.source.layer_count > 1),
            [p.subscriber.bandwidth.estimate_bps for p in peers if p.subscriber.bandwidth.mode != "none"],
        )

    def live_totals(self) -> Counter[str]:
        """The media counters (:data:`~.stats.PRODUCER_COUNTERS`, :data:`~.stats.CONSUMER_COUNTERS`) of the live
        producers and consumers; closed ones are in :data:`~.stats.TOTALS`."""
        return stats.live(
            [p for peer in self._peers.values() for p in peer.producers.values()],
            [c for peer in self._peers.values() for c in peer.consumers.values()],
        )

    async def close(self) -> None:
        """Close every peer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for peer_id in list(self._peers):
            await self.remove_peer(peer_id)

    # --- what peers tell (PeerHost) ------------------------------------------------------------------------

    def _peer_joined(self, peer: Peer) -> None:
        """What a new peer receives: here every producer already in the room."""
        if peer.subscribe:
            for other in list(self._peers.values()):
                if other is not peer:
                    for producer in list(other.producers.values()):
                        peer.consume(producer)

    def source_added(self, peer: Peer, producer: Producer) -> None:
        for other in self._peers.values():
            if other is not peer and not other.closed and other.subscribe:
                other.consume(producer)
        self._observer.source_added(track_info(producer))

    def source_closed(self, peer: Peer, producer: Producer) -> None:
        self._observer.source_removed(track_info(producer))

    def layers_wanted(self, peer: Peer, producer: Producer, rids: list[str]) -> None:
        self._observer.layers_wanted(track_info(producer), rids)

    def send_offer(self, peer: Peer, offer: SubscribeOffer) -> None:
        self._observer.send_offer(peer.id, offer)

    def peer_failed(self, peer: Peer, reason: str) -> None:
        self._observer.peer_failed(peer.id, reason)
