"""
McuRouter: the media plane of a room in MCU mode. The server mixes, so each participant downloads exactly one
audio and one video stream however many others there are.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import InvalidStateError
from .external import ExternalPeer
from .logs import PeerLogger
from .mixer import LAYOUTS, AudioMixer, VideoCompositor
from .observer import RouterObserver
from .peer import Peer
from .producer import Producer
from .router import Router, track_info
from .source import Source
from .stats import snapshot

#: Room modes: ``sfu`` forwards every track to everyone; ``mcu`` mixes on the server.
MODES = ("sfu", "mcu")


@dataclass(frozen=True)
class McuOptions:
    """
    The composite video of an MCU room: ``width`` x ``height`` pixels (even, 64-1920 x 64-1080) at ``fps``
    frames per second (1-30), laid out as a ``grid`` of equal tiles or with the active ``speaker`` large.

    :raises ValueError: a value is out of range.
    """

    width: int = 640
    height: int = 480
    fps: int = 15
    layout: str = "grid"

    def __post_init__(self) -> None:
        for name, low, high in (("width", 64, 1920), ("height", 64, 1080), ("fps", 1, 30)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"'{name}' must be an integer from {low} to {high}")
        if self.width % 2 or self.height % 2:
            raise ValueError("'width' and 'height' must be even")
        if self.layout not in LAYOUTS:
            raise ValueError("'layout' must be \"grid\" or \"speaker\"")

    @classmethod
    def from_dict(cls, data: object) -> McuOptions:
        """Options from a JSON object such as ``{"width": 320, "height": 240, "fps": 15}`` (all optional).

        :raises ValueError: not an object, an unknown key, or a value out of range.
        """
        if not isinstance(data, dict):
            raise ValueError("'mcu' must be an object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown 'mcu' option(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(**data)


class McuRouter(Router):
    """
    The media plane of one room in MCU mode: a :class:`~sfu.router.Router` whose peers receive mixes instead
    of every producer.

    Peers are ordinary :class:`Peer` objects. Publishing is unchanged, except that each producer's receiver
    keeps decoding: its frames feed the :class:`~sfu.mixer.AudioMixer` and the
    :class:`~sfu.mixer.VideoCompositor` instead of being forwarded. On the subscribe connection each peer
    gets exactly two consumers, created at join: its own N-1 audio mix (``mcu-audio``) and the video
    composite shared by everyone (``mcu-video``), both announced as coming from peer ``mcu``.

    Lifecycle: *open* → *closed*. The mixer clocks start with the first peer; :meth:`close` closes every
    peer, then stops them. Idempotent.
    """

    mode = "mcu"

    def __init__(
        self, room_id: str, observer: RouterObserver, *, log: PeerLogger, options: McuOptions | None = None
    ) -> None:
        super().__init__(room_id, observer, log=log)
        self.options = options or McuOptions()
        self._audio = AudioMixer(log=log)
        self._video = VideoCompositor(self.options.width, self.options.height, self.options.fps, log=log,
                                      layout=self.options.layout)
        self._join_order: dict[str, int] = {}
        self._sequence = itertools.count()

    def _peer_joined(self, peer: Peer) -> None:
        """A new peer gets its own audio mix and the shared composite (unless it does not subscribe)."""
        self._join_order[peer.id] = next(self._sequence)
        self._audio.start()
        self._video.start()
        if peer.subscribe:
            # Mixes are sources like any published track.
            peer.consume(self._audio.add_output(peer.id))
            peer.consume(self._video)

    def add_external_peer(self, peer_id: str, name: str) -> ExternalPeer:
        """Not in MCU rooms: the mixer decodes WebRTC tracks only.

        :raises InvalidStateError: always."""
        raise InvalidStateError(f"room {self.id} mixes on the server (mcu mode): streams cannot be ingested into it")

    def source_added(self, peer: Peer | ExternalPeer, producer: Source) -> None:
        assert isinstance(producer, Producer)  # an MCU room has no external peers
        # Called before aiortc starts the receiver, so undoing the SFU's "no decoding" still takes effect.
        track = producer.decoded_track()
        if producer.kind == "audio":
            self._audio.add_source(producer, track)
        else:
            self._video.add_source(producer, track, (self._join_order[peer.id], next(self._sequence)))
        self._log.info("mcu source added", peer=peer.id, producer=producer.id, kind=producer.kind)
        self._watch_levels(producer)
        self._tell_watchers(producer, True)
        self._observer.source_added(track_info(producer))

    def source_closed(self, peer: Peer | ExternalPeer, producer: Source) -> None:
        if producer.kind == "audio":
            self._audio.remove_source(producer.id)
        else:
            self._video.remove_source(producer.id)
        super().source_closed(peer, producer)

    def _speakers_changed(self, peer_ids: list[str]) -> None:
        if peer_ids:
            self._video.set_speaker(peer_ids[0])  # kept through silences: the last one who spoke stays large
        super()._speakers_changed(peer_ids)

    async def remove_peer(self, peer_id: str) -> bool:
        """Close and remove a participant: it leaves the mix and the grid. Whether it was here."""
        removed = await super().remove_peer(peer_id)
        if removed:
            self._audio.remove_output(peer_id)
            self._join_order.pop(peer_id, None)
        return removed

    async def close(self) -> None:
        """Close every peer and stop mixing. Idempotent."""
        if self.closed:
            return
        await super().close()
        await self._audio.close()
        await self._video.aclose()

    def describe(self) -> dict[str, Any]:
        """Participants, settings and mixer counters, for the admin API: the video is encoded once per composite
        frame (``mcu.video.frames``), whatever the number of subscribers (``mcu.video.subscribers``)."""
        return {**super().describe(), "mcu": self._describe_mixers()}

    def _describe_mixers(self) -> dict[str, Any]:
        video = self._video
        return {
            **asdict(self.options),
            "video": {
                **snapshot(video.stats),
                "ticks": video.ticks,
                "skipped_ticks": video.skipped_ticks,
                "sources": len(video.sources),
                "subscribers": video.sink_count,
                "speaker": video.speaker,
            },
            "audio": {
                **snapshot(self._audio.stats),
                "sources": len(self._audio.sources),
                "outputs": len(self._audio.outputs),
                "underruns": sum(s.underruns for s in self._audio.sources.values()),
            },
        }
