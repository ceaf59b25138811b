"""A Peer is one participant of a room: its identity, and the publish and subscribe transports it owns."""

from __future__ import annotations

from typing import Any, Protocol

from .consumer import Consumer
from .errors import InvalidStateError, NotFoundError
from .logs import PeerLogger
from .observer import SubscribeOffer
from .producer import Producer
from .publish import PublishTransport
from .source import Source
from .subscribe import SubscribeTransport


class PeerHost(Protocol):
    """What a Peer tells the router that created it (and asks it: the video codec publishers should prefer)."""

    @property
    def preferred_video_codec(self) -> str | None: ...

    def source_added(self, peer: Peer, producer: Producer) -> None: ...

    def source_closed(self, peer: Peer, producer: Producer) -> None: ...

    def layers_wanted(self, peer: Peer, producer: Producer, rids: list[str]) -> None: ...

    def send_offer(self, peer: Peer, offer: SubscribeOffer) -> None: ...

    def peer_failed(self, peer: Peer, reason: str) -> None: ...


class Peer:
    """
    One participant, named by ``id`` and ``name``.

    Two connections avoid offer glare: on the :class:`~.publish.PublishTransport` the client offers and Chorus
    answers (each received track becomes a :class:`~.producer.Producer`); on the
    :class:`~.subscribe.SubscribeTransport` Chorus offers one m-section per :class:`~.consumer.Consumer` and the
    client answers.

    Lifecycle: *new* → *closed*. The host's ``peer_failed`` is called (once) when either connection fails or the
    client does not answer an offer in time; the host then closes the peer.
    """

    def __init__(self, peer_id: str, name: str, host: PeerHost, *, log: PeerLogger, subscribe: bool = True) -> None:
        self.id = peer_id
        self.name = name
        #: Whether this peer receives the room's tracks.
        self.subscribe = subscribe
        self.closed = False
        self._host = host
        self._log = log
        self._failed = False
        self.publisher = PublishTransport(
            peer_id, log=log, on_failed=self._fail,
            on_source_added=lambda producer: host.source_added(self, producer),
            on_source_closed=lambda producer: host.source_closed(self, producer),
            on_layers_wanted=lambda producer, rids: host.layers_wanted(self, producer, rids),
            preferred_video_codec=lambda: host.preferred_video_codec,
        )
        self.subscriber = SubscribeTransport(
            peer_id, log=log, on_failed=self._fail, send_offer=lambda offer: host.send_offer(self, offer)
        )

    def __repr__(self) -> str:
        return f"Peer(id={self.id}, name={self.name!r})"

    @property
    def producers(self) -> dict[str, Producer]:
        return self.publisher.producers

    @property
    def consumers(self) -> dict[str, Consumer]:
        return self.subscriber.consumers

    def describe(self) -> dict[str, Any]:
        """The participant as others see it: id, name, tracks."""
        return {
            "id": self.id,
            "name": self.name,
            "tracks": [{"id": p.id, "kind": p.kind, "muted": p.paused} for p in self.producers.values()],
        }

    def _fail(self, reason: str) -> None:
        if not self.closed and not self._failed:
            self._failed = True
            self._log.warning("peer failed", reason=reason)
            self._host.peer_failed(self, reason)

    # --- what the client asks ----------------------------------------------------------------------------

    async def publish(self, offer_sdp: str, *, max_tracks: int = 4) -> tuple[str, list[Producer]]:
        """Negotiate the client's publish offer (see :meth:`PublishTransport.negotiate`)."""
        return await self.publisher.negotiate(offer_sdp, max_tracks=max_tracks)

    async def answer(self, answer_sdp: str) -> None:
        """Apply the client's answer to the pending subscribe offer (see :meth:`SubscribeTransport.answer`)."""
        await self.subscriber.answer(answer_sdp)

    async def add_ice_candidate(self, target: str, candidate: dict[str, Any] | None) -> None:
        """Add a trickled client candidate to the ``"publish"`` or ``"subscribe"`` connection."""
        transport = self.publisher if target == "publish" else self.subscriber
        await transport.add_ice_candidate(candidate)

    def set_muted(self, producer_id: str, muted: bool) -> Producer:
        """Pause or resume one of this peer's tracks.

        :raises NotFoundError: the peer publishes no such track."""
        return self.publisher.set_muted(producer_id, muted)

    def unpublish(self, producer_id: str) -> None:
        """End one of this peer's tracks now (see :meth:`PublishTransport.unpublish`).

        :raises NotFoundError: the peer publishes no such track."""
        self.publisher.unpublish(producer_id)

    def set_preferences(self, track_id: str, *, max_height: int | None, paused: bool) -> Consumer:
        """
        How the viewer shows a track it receives: ``max_height`` device pixels tall (``None``: no limit), or not at
        all (``paused``). The layer it gets follows at the next allocation.

        :raises NotFoundError: this peer receives no such track.
        """
        consumer = next((c for c in self.consumers.values() if c.source.id == track_id), None)
        if consumer is None:
            raise NotFoundError(f"you receive no track {track_id!r}")
        consumer.max_height = max_height
        consumer.viewer_paused = paused
        consumer.priority = max_height or 0
        if consumer.kind == "audio":
            consumer.suspend(paused)
        return consumer

    def details(self) -> dict[str, Any]:
        """Everything about the participant for the admin API: its tracks with their simulcast layers, and what
        it receives with the bandwidth estimate and each consumer's layer and reason."""
        return {
            **self.describe(),
            "publish": {"transport_cc": self.publisher.transport_cc,
                        "tracks": [{"id": p.id, "kind": p.kind, "codec": p.codec.mimeType,
                                    "layers": p.describe_layers(), "publish_layers": p.publish_top + 1}
                                   for p in self.producers.values()]},
            "subscribe": self.subscriber.describe(),
        }

    def consume(self, source: Source) -> Consumer:
        """Start forwarding ``source`` to this peer.

        :raises InvalidStateError: the peer is closed."""
        if self.closed:
            raise InvalidStateError("peer is closed")
        return self.subscriber.consume(source)

    # --- teardown ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close both transports: every producer (and so the consumers of others) and every consumer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        await self.publisher.close()
        await self.subscriber.close()
        self._log.info("peer closed")
