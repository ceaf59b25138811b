"""
The one way events travel up from the media plane: a :class:`RouterObserver`, told in plain data.

Whoever owns a :class:`~.router.Router` (the signaling room) implements it. The media plane never calls anything
else of its owner and receives no callables from it; the owner never walks media objects, it asks the router for
descriptions and counters (:meth:`~.router.Router.describe`, :meth:`~.router.Router.counts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TrackInfo:
    """A source as the room's participants learn about it."""

    id: str
    peer_id: str
    kind: str
    #: MIME type, e.g. ``video/VP8``.
    codec: str
    muted: bool
    #: The publish m-section it arrived on (what the client labels its tracks by).
    mid: str | None = None

    def public(self) -> dict[str, Any]:
        """What participants are told (``track_published``): id, kind, muted."""
        return {"id": self.id, "kind": self.kind, "muted": self.muted}


@dataclass(frozen=True)
class OfferedTrack:
    """One m-section of a subscribe offer: which track it carries, from whom."""

    mid: str | None
    track_id: str
    peer_id: str
    kind: str

    def public(self) -> dict[str, Any]:
        return {"mid": self.mid, "track_id": self.track_id, "peer_id": self.peer_id, "kind": self.kind}


@dataclass(frozen=True)
class SubscribeOffer:
    """A subscribe offer for the client to answer; ``restart``: answer it on a new RTCPeerConnection."""

    sdp: str
    tracks: list[OfferedTrack] = field(default_factory=list)
    restart: bool = False


class RouterObserver(Protocol):
    """What the owner of a Router is told. Events go up, method calls go down."""

    def send_offer(self, peer_id: str, offer: SubscribeOffer) -> None:
        """Deliver a subscribe offer to the participant; its answer comes back through ``Peer.answer``."""

    def peer_failed(self, peer_id: str, reason: str) -> None:
        """A participant's connection failed (or it did not answer in time); the owner removes it."""

    def source_added(self, track: TrackInfo) -> None:
        """A participant published a track."""

    def source_removed(self, track: TrackInfo) -> None:
        """A published track ended (unpublished, or its participant left)."""

    def layers_wanted(self, track: TrackInfo, rids: list[str]) -> None:
        """Which simulcast layers (RIDs) of ``track`` its publisher should keep sending; the others nobody needs."""

    def viewer_closed(self, viewer_id: str, reason: str) -> None:
        """A viewer (WHEP player) ended: its connection failed or closed, or what it watched ended. The router has
        already closed and forgotten it."""

    def active_speakers(self, peer_ids: list[str]) -> None:
        """Who speaks changed: the participants speaking now, loudest first (at most four times a second)."""
