"""An ExternalPeer is a participant without a WebRTC connection: an RTMP/SRT encoder, a pulled camera, a stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .consumer import Consumer
from .errors import InvalidStateError, NotFoundError
from .logs import PeerLogger
from .source import Source


class ExternalPeerHost(Protocol):
    """What an ExternalPeer tells the router that created it."""

    def source_added(self, peer: ExternalPeer, source: Source) -> None: ...

    def source_closed(self, peer: ExternalPeer, source: Source) -> None: ...


class ExternalPeer:
    """
    A participant whose tracks are fed from inside the process (an ingest) instead of a publish connection. It
    receives nothing. Whoever asked the router for it (:meth:`~.router.Router.add_external_peer`) publishes
    :class:`~.source.Source` objects on it with :meth:`publish` and ends them with :meth:`unpublish`; the other
    participants consume them exactly as they consume a :class:`~.producer.Producer`, and the router's observer
    hears ``source_added``/``source_removed`` as for any participant's tracks.

    Lifecycle: *open* → *closed* (:meth:`close`, by the router when the participant is removed: every source it
    still has is closed, so its consumers end, and the router is told).
    """

    #: An external participant receives nothing.
    subscribe = False

    def __init__(self, peer_id: str, name: str, host: ExternalPeerHost, *, log: PeerLogger) -> None:
        self.id = peer_id
        self.name = name
        self.closed = False
        self._host = host
        self._log = log
        self._sources: dict[str, Source] = {}

    def __repr__(self) -> str:
        return f"ExternalPeer(id={self.id}, name={self.name!r}, sources={len(self._sources)})"

    @property
    def producers(self) -> Mapping[str, Source]:
        """Its live sources, by id (named like a Peer's producers: what the others consume)."""
        return self._sources

    @property
    def consumers(self) -> Mapping[str, Consumer]:
        """Nothing: an external participant receives no one."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The participant as others see it: id, name, tracks."""
        return {
            "id": self.id,
            "name": self.name,
            "tracks": [{"id": s.id, "kind": s.kind, "muted": s.paused} for s in self._sources.values()],
        }

    def details(self) -> dict[str, Any]:
        """Everything about the participant for the admin API: its tracks with codecs; it receives nothing."""
        return {
            **self.describe(),
            "external": True,
            "publish": {"tracks": [{"id": s.id, "kind": s.kind, "codec": s.codec.mimeType,
                                    "profile_level_id": s.codec.parameters.get("profile-level-id")}
                                   for s in self._sources.values()]},
        }

    def publish(self, source: Source) -> None:
        """Announce ``source`` (whose ``peer_id`` is this participant): every other peer starts consuming it.

        :raises InvalidStateError: the participant is closed, or the source is closed or not announced as its own.
        """
        if self.closed:
            raise InvalidStateError("participant is closed")
        if source.closed or source.peer_id != self.id or source.id in self._sources:
            raise InvalidStateError(f"{source!r} cannot be published by {self!r}")
        self._sources[source.id] = source
        self._log.info("external source published", source=source.id, kind=source.kind, codec=source.codec.mimeType)
        self._host.source_added(self, source)

    def unpublish(self, source_id: str) -> None:
        """End one source: it closes (its consumers end) and the router is told. Idempotent."""
        source = self._sources.pop(source_id, None)
        if source is None:
            return
        source.close()
        self._host.source_closed(self, source)

    def set_muted(self, source_id: str, muted: bool) -> Source:
        """Pause or resume one of its sources (moderation).

        :raises NotFoundError: no such source here."""
        source = self._sources.get(source_id)
        if source is None:
            raise NotFoundError(f"no track {source_id!r} published by this participant")
        if muted:
            source.pause()
        else:
            source.resume()
        return source

    async def close(self) -> None:
        """End every source. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for source_id in list(self._sources):
            self.unpublish(source_id)
        self._log.info("external participant closed")
