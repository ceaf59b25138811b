"""A Viewer is a WHEP player watching some of a room's tracks; it is not a participant."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .consumer import Consumer
from .errors import NotFoundError
from .logs import PeerLogger
from .playback import PlaybackTransport
from .source import Source


class ViewerHost(Protocol):
    """What a Viewer tells the router that created it."""

    def viewer_failed(self, viewer: Viewer, reason: str) -> None: ...


class Viewer:
    """
    A player (WHEP) receiving chosen tracks of a room over one :class:`~.playback.PlaybackTransport`: the player
    offers, Chorus answers. The room's participants are not told about viewers; the admin API lists them.

    :param find_source: the router's lookup of a live source by id (a child is given a callable, not its parent).

    Lifecycle: *new* → *watching* (:meth:`watch`) → *closed*. The host's ``viewer_failed`` is called (once) when
    the connection fails, the player closes it, or everything it watched has ended; the host then closes it.
    """

    def __init__(self, viewer_id: str, name: str, host: ViewerHost, *, find_source: Callable[[str], Source | None],
                 log: PeerLogger) -> None:
        self.id = viewer_id
        self.name = name
        self.closed = False
        self._host = host
        self._find_source = find_source
        self._log = log
        self._failed = False
        self.transport = PlaybackTransport(viewer_id, log=log, on_failed=self._fail, on_ended=self._fail)

    def __repr__(self) -> str:
        return f"Viewer(id={self.id}, name={self.name!r})"

    @property
    def consumers(self) -> dict[str, Consumer]:
        return self.transport.consumers

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name,
                "tracks": [{"id": c.source.id, "peer_id": c.source.peer_id, "kind": c.kind}
                           for c in self.consumers.values()]}

    async def watch(self, offer_sdp: str, track_ids: Sequence[str]) -> str:
        """
        Answer the player's offer with the tracks ``track_ids`` (see :meth:`PlaybackTransport.answer`).

        :raises NotFoundError: a track is not (or no longer) live in the room.
        """
        sources = []
        for track_id in track_ids:
            source = self._find_source(track_id)
            if source is None:
                raise NotFoundError(f"no live track {track_id!r}")
            sources.append(source)
        return await self.transport.answer(offer_sdp, sources)

    async def add_ice_candidate(self, candidate: dict[str, Any] | None) -> None:
        """Add a candidate the player trickled (see :meth:`~.transport.Transport.add_ice_candidate`)."""
        await self.transport.add_ice_candidate(candidate)

    def _fail(self, reason: str) -> None:
        if not self.closed and not self._failed:
            self._failed = True
            self._log.info("viewer ended", reason=reason)
            self._host.viewer_failed(self, reason)

    async def close(self) -> None:
        """Close the playback connection and its consumers. Idempotent."""
        if self.closed:
            return
        self.closed = True
        await self.transport.close()
        self._log.info("viewer closed")
