"""A Router is one room's media plane: its peers, their producers, and who consumes what."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from .errors import InvalidStateError
from .logs import PeerLogger
from .peer import OfferSender, Peer
from .producer import Producer


class RouterObserver(Protocol):
    """What the owner of a Router (the signaling room) is told. Events go up, method calls go down."""

    def producer_added(self, peer: Peer, producer: Producer) -> None: ...

    def producer_closed(self, peer: Peer, producer: Producer) -> None: ...

    def peer_failed(self, peer: Peer, reason: str) -> None: ...


class Router:
    """
    The media plane of one room.

    Every producer of a peer is consumed by every other peer of the room: a peer that joins late gets a
    consumer for each existing producer, and a new producer gets a consumer in every other peer.

    Lifecycle: *open* → *closed*; :meth:`close` closes every peer (and so every producer and consumer).
    """

    def __init__(self, room_id: str, observer: RouterObserver, *, log: PeerLogger) -> None:
        self.id = room_id
        self.closed = False
        self.peers: dict[str, Peer] = {}
        self._observer = observer
        self._log = log

    def __repr__(self) -> str:
        return f"Router(id={self.id}, peers={len(self.peers)})"

    def producers(self) -> Iterator[Producer]:
        for peer in self.peers.values():
            yield from (p for p in peer.producers.values() if not p.closed)

    def create_peer(self, peer_id: str, name: str, send_offer: OfferSender, *, subscribe: bool = True) -> Peer:
        """Add a participant; unless ``subscribe`` is false it consumes every producer already in the room
        and every later one."""
        if self.closed:
            raise InvalidStateError(f"room {self.id} is closed")
        peer = Peer(
            peer_id,
            name,
            send_offer=send_offer,
            on_producer=self._producer_added,
            on_failed=self._observer.peer_failed,
            log=self._log.bind(peer=peer_id),
            subscribe=subscribe,
        )
        self.peers[peer_id] = peer
        self._peer_joined(peer)
        return peer

    def _peer_joined(self, peer: Peer) -> None:
        """What a new peer receives: here every producer already in the room."""
        if peer.subscribe:
            for producer in list(self.producers()):
                peer.consume(producer)

    def find_producer(self, producer_id: str) -> tuple[Peer, Producer] | None:
        for peer in self.peers.values():
            producer = peer.producers.get(producer_id)
            if producer is not None:
                return peer, producer
        return None

    def _producer_added(self, peer: Peer, producer: Producer) -> None:
        producer.on_close(lambda p: self._observer.producer_closed(peer, p))
        for other in self.peers.values():
            if other is not peer and not other.closed and other.subscribe:
                other.consume(producer)
        self._observer.producer_added(peer, producer)

    async def remove_peer(self, peer_id: str) -> Peer | None:
        """Close and remove a participant: its producers end for everyone. Returns it, if it was here."""
        peer = self.peers.pop(peer_id, None)
        if peer is not None:
            await peer.close()
        return peer

    async def close(self) -> None:
        """Close every peer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for peer_id in list(self.peers):
            await self.remove_peer(peer_id)
