"""
Chorus media plane: a selective forwarding unit on top of aiortc.

``Router`` (one per room) → ``Peer`` (one per participant, owning a ``PublishTransport`` and a
``SubscribeTransport``) → ``Producer`` (a published track, one kind of ``Source``) → ``Consumer`` (a source
forwarded to one subscriber, one kind of ``Sink``). An ``ExternalPeer`` is a participant whose sources are fed
from inside the process (ingest); a ``Viewer`` (WHEP) watches chosen sources over a ``PlaybackTransport``.
Events go up through one ``RouterObserver``. This package never imports ``chorus.signaling``.
"""

from .consumer import Consumer
from .errors import (
    ChorusError,
    InvalidSdpError,
    InvalidStateError,
    LimitError,
    NotFoundError,
    UnsupportedCodecError,
)
from .external import ExternalPeer
from .ids import new_id
from .mcu import MODES, McuOptions, McuRouter
from .observer import OfferedTrack, RouterObserver, SubscribeOffer, TrackInfo
from .peer import Peer
from .playback import PlaybackTransport
from .producer import Producer
from .router import Router, RouterCounts, SourceWatcher
from .source import PacketMeta, Sink, Source
from .viewer import Viewer

__all__ = [
    "MODES",
    "ChorusError",
    "Consumer",
    "ExternalPeer",
    "InvalidSdpError",
    "InvalidStateError",
    "LimitError",
    "McuOptions",
    "McuRouter",
    "NotFoundError",
    "OfferedTrack",
    "PacketMeta",
    "Peer",
    "PlaybackTransport",
    "Producer",
    "Router",
    "RouterCounts",
    "RouterObserver",
    "Sink",
    "Source",
    "SourceWatcher",
    "SubscribeOffer",
    "TrackInfo",
    "UnsupportedCodecError",
    "Viewer",
    "new_id",
]
