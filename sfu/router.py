"""A Router is one room's media plane: its peers, their sources, and who consumes what."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import speakers, stats
from .errors import InvalidStateError, NotFoundError
from .external import ExternalPeer
from .logs import PeerLogger
from .observer import RouterObserver, SubscribeOffer, TrackInfo
from .peer import Peer
from .producer import Producer
from .quality import PeerQuality, QualityTracker, link_sample
from .source import Source
from .speakers import SpeakerDetector
from .tasks import Tasks
from .viewer import Viewer


class SourceWatcher(Protocol):
    """
    Something of the media plane that follows a room's sources besides its participants: an HTTP egress, a
    recorder. It attaches its own sinks to the sources it wants (:meth:`~.source.Source.attach`).
    """

    def source_added(self, source: Source) -> None:
        """A participant published ``source`` (``source.peer_id`` says who); also each existing one at watch."""

    def source_removed(self, source: Source) -> None:
        """``source`` ended (its sinks were told ``source_closed`` too)."""


@dataclass(frozen=True)
class RouterCounts:
    """How much a router holds, for metrics and the admin API."""

    peers: int
    #: kind → published tracks
    producers: Counter[str]
    #: kind → forwarded tracks (one per subscriber, viewers included)
    consumers: Counter[str]
    #: video consumers by the simulcast layer sent ("0", "1", "2"; "none" while nothing is)
    video_layers: Counter[str] = field(default_factory=Counter)
    #: video consumers of adaptive sources by the reason for their layer
    reasons: Counter[str] = field(default_factory=Counter)
    #: each subscribe connection's bandwidth estimate (bps), where it has one
    estimates: list[int] = field(default_factory=list)
    #: WHEP viewers (not participants)
    viewers: int = 0


def track_info(source: Source) -> TrackInfo:
    mid = source.mid if isinstance(source, Producer) else None
    return TrackInfo(source.id, source.peer_id, source.kind, source.codec.mimeType, source.paused, mid)


class Router:
    """
    The media plane of one room.

    Every producer of a peer is consumed by every other peer of the room: a peer that joins late gets a
    consumer for each existing producer, and a new producer gets a consumer in every other peer. What happens
    is told to the ``observer`` (:class:`~.observer.RouterObserver`), in plain data.

    Participants are WebRTC :class:`~.peer.Peer` objects or :class:`~.external.ExternalPeer` objects (an
    ingested stream: sources fed from inside the process, consumed like anyone's producers, receiving nothing).
    :class:`~.viewer.Viewer` objects (WHEP players) watch chosen sources and are not participants.

    Who speaks is worked out from the audio levels its audio producers receive (:mod:`.speakers`) and told with
    ``active_speakers`` when it changes, at most four times a second. :meth:`connection_quality` samples each
    WebRTC peer's connections (:mod:`.quality`).

    Lifecycle: *open* → *closed*; :meth:`close` closes every peer and viewer (and so every producer and
    consumer).

    Watchers (:class:`SourceWatcher`, e.g. an egress) are told about every published source (ingested ones too);
    while ``preferred_video_codec`` is set (``video/H264`` when an egress would rather pass H.264 through than
    transcode), publishers who publish from then on are answered with that codec first when they offer it.
    """

    mode = "sfu"

    def __init__(self, room_id: str, observer: RouterObserver, *, log: PeerLogger) -> None:
        self.id = room_id
        self.closed = False
        self._peers: dict[str, Peer | ExternalPeer] = {}
        self._viewers: dict[str, Viewer] = {}
        #: source id → when it was published (a sequence number), for choosing what a viewer watches
        self._published: dict[str, int] = {}
        self._publish_sequence = 0
        self._observer = observer
        self._log = log
        self._speakers = SpeakerDetector()
        self._speaking: list[str] = []
        self._speaker_task: asyncio.Task[None] | None = None
        self._quality = QualityTracker()
        self._tasks = Tasks(f"router {room_id}")
        self._watchers: list[SourceWatcher] = []
        #: The video codec new publish answers prefer (see :meth:`PublishTransport.negotiate`), or ``None``.
        self.preferred_video_codec: str | None = None

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

    def add_external_peer(self, peer_id: str, name: str) -> ExternalPeer:
        """Add a participant without a WebRTC connection (an ingested stream): whoever asked publishes sources on
        it (:meth:`ExternalPeer.publish`) and every other participant consumes them. It receives nothing.

        :raises InvalidStateError: the router is closed."""
        if self.closed:
            raise InvalidStateError(f"room {self.id} is closed")
        peer = ExternalPeer(peer_id, name, self, log=self._log.bind(peer=peer_id))
        self._peers[peer_id] = peer
        return peer

    def peer(self, peer_id: str) -> Peer:
        """:raises NotFoundError: no such WebRTC peer here."""
        peer = self._peers.get(peer_id)
        if not isinstance(peer, Peer):
            raise NotFoundError(f"no participant {peer_id!r} in room {self.id!r}")
        return peer

    # --- viewers (WHEP) ----------------------------------------------------------------------------------------

    def create_viewer(self, viewer_id: str, name: str) -> Viewer:
        """Add a viewer; it watches nothing until :meth:`Viewer.watch` (with ids from :meth:`playback_tracks`).

        :raises InvalidStateError: the router is closed."""
        if self.closed:
            raise InvalidStateError(f"room {self.id} is closed")
        viewer = Viewer(viewer_id, name, self, find_source=self._find_source, log=self._log.bind(viewer=viewer_id))
        self._viewers[viewer_id] = viewer
        return viewer

    async def remove_viewer(self, viewer_id: str) -> bool:
        """Close and forget a viewer. Whether it was here."""
        viewer = self._viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        await viewer.close()
        return True

    def playback_tracks(self, participant: str | None = None) -> list[TrackInfo]:
        """
        What a viewer of this room watches: one video and one audio track of one participant, the
        ``participant`` named (by id, else by name), else the one whose video was published most recently
        (else whose audio was). Unmuted tracks first, then the most recent. Empty when nothing is live.

        :raises NotFoundError: no participant of that id or name is here.
        """
        peers = list(self._peers.values())
        if participant is not None:
            named = [p for p in peers if p.id == participant] or [p for p in peers if p.name == participant]
            if not named:
                raise NotFoundError(f"no participant {participant!r} in room {self.id!r}")
            peers = named

        def rank(source: Source) -> tuple[bool, int]:
            return not source.paused, self._published.get(source.id, -1)

        def best(kind: str, among: list[Peer | ExternalPeer]) -> Source | None:
            sources = [s for p in among for s in p.producers.values() if s.kind == kind and not s.closed]
            return max(sources, key=rank, default=None)

        lead = best("video", peers) or best("audio", peers)
        if lead is None:
            return []
        owner = [p for p in peers if p.id == lead.peer_id]
        chosen = [s for s in (best("video", owner), best("audio", owner)) if s is not None]
        return [track_info(s) for s in chosen]

    def _find_source(self, source_id: str) -> Source | None:
        for peer in self._peers.values():
            source = peer.producers.get(source_id)
            if source is not None and not source.closed:
                return source
        return None

    def viewer_failed(self, viewer: Viewer, reason: str) -> None:
        """A viewer's connection failed or ended (ViewerHost): it is closed and the owner told."""
        if self._viewers.pop(viewer.id, None) is None:
            return
        self._observer.viewer_closed(viewer.id, reason)
        self._tasks.spawn(viewer.close(), name=f"close viewer {viewer.id}")

    async def remove_peer(self, peer_id: str) -> bool:
        """Close and remove a participant: its producers end for everyone. Whether it was here."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return False
        await peer.close()
        self._quality.forget(peer_id)
        return True

    def set_muted(self, track_id: str, muted: bool) -> TrackInfo:
        """Pause or resume any participant's track (the owner's moderation).

        :raises NotFoundError: no such track in this room."""
        for peer in self._peers.values():
            if track_id in peer.producers:
                return track_info(peer.set_muted(track_id, muted))
        raise NotFoundError(f"no track {track_id!r} in room {self.id!r}")

    def watch(self, watcher: SourceWatcher) -> None:
        """Tell ``watcher`` about every source published in this room: the existing ones now, later ones as they
        come, and each one that ends. Idempotent."""
        if watcher in self._watchers:
            return
        self._watchers.append(watcher)
        for peer in list(self._peers.values()):
            for producer in list(peer.producers.values()):
                watcher.source_added(producer)

    def unwatch(self, watcher: SourceWatcher) -> None:
        """Stop telling ``watcher``. Idempotent."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def _tell_watchers(self, producer: Source, added: bool) -> None:
        for watcher in list(self._watchers):
            try:
                if added:
                    watcher.source_added(producer)
                else:
                    watcher.source_removed(producer)
            except Exception:  # a failing egress must not break publishing
                self._log.error("source watcher failed", exc_info=True, producer=producer.id)

    def describe_peers(self, *, exclude: str | None = None) -> list[dict[str, Any]]:
        """Every participant (id, name, tracks) but ``exclude``."""
        return [p.describe() for p in self._peers.values() if p.id != exclude]

    def track_stats(self, peer_id: str) -> list[dict[str, Any]]:
        """A participant's tracks as received: id, kind, codec (H.264: its ``profile-level-id``), packets, bytes."""
        peer = self._peers.get(peer_id)
        out: list[dict[str, Any]] = []
        for source in peer.producers.values() if peer is not None else ():
            counters = getattr(source, "stats", None)
            entry: dict[str, Any] = {"id": source.id, "kind": source.kind, "codec": source.codec.mimeType,
                                     "packets": getattr(counters, "packets", 0), "bytes": getattr(counters, "bytes", 0)}
            if "profile-level-id" in source.codec.parameters:
                entry["profile_level_id"] = source.codec.parameters["profile-level-id"]
            out.append(entry)
        return out

    def describe(self) -> dict[str, Any]:
        """The room's media plane for the admin API."""
        return {"participants": [p.details() for p in self._peers.values()],
                "viewers": [v.describe() for v in self._viewers.values()]}

    def set_preferences(self, peer_id: str, track_id: str, *, max_height: int | None, paused: bool) -> None:
        """A participant says how it shows a track it receives (see :meth:`Peer.set_preferences`).

        :raises NotFoundError: no such participant, or it receives no such track."""
        self.peer(peer_id).set_preferences(track_id, max_height=max_height, paused=paused)

    def counts(self) -> RouterCounts:
        peers = list(self._peers.values())
        holders = [*peers, *self._viewers.values()]
        video = [c for holder in holders for c in holder.consumers.values() if c.kind == "video"]
        return RouterCounts(
            len(peers),
            Counter(p.kind for peer in peers for p in peer.producers.values()),
            Counter(c.kind for holder in holders for c in holder.consumers.values()),
            Counter("none" if c.layer is None else str(c.layer) for c in video),
            Counter(c.reason for c in video if c.source.layer_count > 1),
            [p.subscriber.bandwidth.estimate_bps for p in peers
             if isinstance(p, Peer) and p.subscriber.bandwidth.mode != "none"],
            len(self._viewers),
        )

    def live_totals(self) -> Counter[str]:
        """The media counters (:data:`~.stats.PRODUCER_COUNTERS`, :data:`~.stats.CONSUMER_COUNTERS`) of the live
        producers and consumers; closed ones are in :data:`~.stats.TOTALS`. Ingested sources are counted by
        the ingest, not here."""
        return stats.live(
            [p for peer in self._peers.values() for p in peer.producers.values() if isinstance(p, Producer)],
            [c for holder in [*self._peers.values(), *self._viewers.values()] for c in holder.consumers.values()],
        )

    def active_speakers(self) -> list[str]:
        """The peers speaking now, loudest first."""
        return list(self._speaking)

    async def connection_quality(self) -> list[PeerQuality]:
        """Each peer's connection quality since the previous call: loss both ways and round-trip time, as seen
        from here (see :mod:`.quality`). Call it every :data:`.quality.INTERVAL` seconds."""
        out = []
        for peer in [p for p in self._peers.values() if isinstance(p, Peer)]:
            sample = link_sample(await peer.publisher.rtp_stats() + await peer.subscriber.rtp_stats())
            if peer.id in self._peers:  # it may have left meanwhile
                out.append(self._quality.update(peer.id, sample))
        return out

    async def close(self) -> None:
        """Close every peer and viewer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._speaker_task is not None:
            self._speaker_task.cancel()  # it never ends by itself (the wait below is for viewers)
        for peer_id in list(self._peers):
            await self.remove_peer(peer_id)
        for viewer_id in list(self._viewers):
            await self.remove_viewer(viewer_id)
        deadline = asyncio.get_running_loop().time() + 5.0
        while len(self._tasks) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # viewers that ended on their own are still closing: let them finish
        await self._tasks.close()

    # --- what peers tell (PeerHost, ExternalPeerHost) ---------------------------------------------------------

    def _peer_joined(self, peer: Peer) -> None:
        """What a new peer receives: here every producer already in the room."""
        if peer.subscribe:
            for other in list(self._peers.values()):
                if other is not peer:
                    for producer in list(other.producers.values()):
                        peer.consume(producer)

    def source_added(self, peer: Peer | ExternalPeer, producer: Source) -> None:
        self._publish_sequence += 1
        self._published[producer.id] = self._publish_sequence
        for other in self._peers.values():
            if other is not peer and not other.closed and isinstance(other, Peer) and other.subscribe:
                other.consume(producer)
        self._watch_levels(producer)
        self._tell_watchers(producer, True)
        self._observer.source_added(track_info(producer))

    def source_closed(self, peer: Peer | ExternalPeer, producer: Source) -> None:
        self._published.pop(producer.id, None)
        self._speakers.forget(producer.id)
        self._tell_watchers(producer, False)
        self._observer.source_removed(track_info(producer))

    def layers_wanted(self, peer: Peer, producer: Producer, rids: list[str]) -> None:
        self._observer.layers_wanted(track_info(producer), rids)

    # --- active speakers -------------------------------------------------------------------------------------

    def _watch_levels(self, producer: Source) -> None:
        """Feed an audio producer's levels to the speaker detector; start asking it when the first one comes.
        (Ingested streams carry no levels.)"""
        if not isinstance(producer, Producer) or producer.kind != "audio" or self.closed:
            return
        detector, source_id, peer_id = self._speakers, producer.id, producer.peer_id
        producer.on_audio_level = lambda level: detector.observe(source_id, peer_id, level, time.monotonic())
        if self._speaker_task is None and not self._tasks.closed:
            self._speaker_task = self._tasks.spawn(self._watch_speakers(), name=f"active speakers of {self.id}")

    async def _watch_speakers(self) -> None:
        while True:
            await asyncio.sleep(speakers.INTERVAL)
            now = self._speakers.speakers(time.monotonic())
            if now != self._speaking:
                self._speaking = now
                self._speakers_changed(now)

    def _speakers_changed(self, peer_ids: list[str]) -> None:
        self._observer.active_speakers(list(peer_ids))

    def send_offer(self, peer: Peer, offer: SubscribeOffer) -> None:
        self._observer.send_offer(peer.id, offer)

    def peer_failed(self, peer: Peer, reason: str) -> None:
        self._observer.peer_failed(peer.id, reason)
