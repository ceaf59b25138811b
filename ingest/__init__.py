"""
Chorus ingest: the protocol level of bringing encoders and cameras into rooms.

RTMP (:mod:`.rtmp`) and SRT (:mod:`.srt`) listeners and a URL puller (:mod:`.pull`) turn what arrives into the
same media objects (:mod:`.media`), handed to a :class:`~.media.MediaSink` that ``on_publish`` supplies;
:mod:`.keys` checks stream keys from any thread; :mod:`.h264` packetizes H.264 for RTP (RFC 6184) and tells
when a stream needs re-encoding; :mod:`.transcode` makes Opus from AAC and browser-safe H.264, off the event
loop. :mod:`.sources` and :mod:`.bridge` put a stream into a room as the tracks of an
:class:`~chorus.sfu.external.ExternalPeer`; :mod:`.manager` and :mod:`.store` define ingresses (stream keys,
pulls), run the listeners and report state. This package never imports ``signaling`` (it reaches rooms through
:class:`.manager.RoomAccess`); from ``sfu`` it uses the source seam, external participants, logging and tasks.
Its names are imported lazily: ``from chorus.ingest import IngressManager`` loads only what that needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # explicit re-exports for type checkers; at run time see __getattr__
    from .bridge import BridgeSettings as BridgeSettings
    from .bridge import StreamBridge as StreamBridge
    from .errors import ForbiddenPathError as ForbiddenPathError
    from .errors import IngestError as IngestError
    from .errors import IngestTimeoutError as IngestTimeoutError
    from .errors import LimitError as LimitError
    from .errors import ProtocolError as ProtocolError
    from .errors import RoomUnavailableError as RoomUnavailableError
    from .errors import SourceError as SourceError
    from .errors import TranscodeError as TranscodeError
    from .errors import UnauthorizedError as UnauthorizedError
    from .errors import UnsupportedMediaError as UnsupportedMediaError
    from .keys import StreamKeys as StreamKeys
    from .keys import key_digest as key_digest
    from .manager import IngestSettings as IngestSettings
    from .manager import IngressManager as IngressManager
    from .manager import IngressMember as IngressMember
    from .manager import LiveIngress as LiveIngress
    from .manager import RoomAccess as RoomAccess
    from .media import AudioConfig as AudioConfig
    from .media import AudioFrame as AudioFrame
    from .media import EndReason as EndReason
    from .media import MediaItem as MediaItem
    from .media import MediaSink as MediaSink
    from .media import Metadata as Metadata
    from .media import OnPublish as OnPublish
    from .media import PublishSession as PublishSession
    from .media import RefusedConnection as RefusedConnection
    from .media import VideoAccessUnit as VideoAccessUnit
    from .media import VideoConfig as VideoConfig
    from .pull import PullSettings as PullSettings
    from .pull import PullSource as PullSource
    from .rtmp import RtmpLimits as RtmpLimits
    from .rtmp import RtmpServer as RtmpServer
    from .sources import H264Source as H264Source
    from .sources import OpusSource as OpusSource
    from .srt import SrtLimits as SrtLimits
    from .srt import SrtServer as SrtServer
    from .store import KINDS as KINDS
    from .store import FileStore as FileStore
    from .store import IngressRecord as IngressRecord
    from .store import IngressStore as IngressStore
    from .store import MemoryStore as MemoryStore
    from .store import RedisStore as RedisStore
    from .transcode import AacToOpus as AacToOpus
    from .transcode import H264Reencoder as H264Reencoder
    from .transcode import OpusPacket as OpusPacket
    from .wire import ReencodeSettings as ReencodeSettings

#: public name → the submodule defining it. Imported on first use (PEP 562), so that a process that needs one
#: module (the re-encode worker imports :mod:`.wire` and PyAV only) does not pay for the listeners and the media
#: plane.
_EXPORTS = {
    "KINDS": "store",
    "AacToOpus": "transcode",
    "AudioConfig": "media",
    "AudioFrame": "media",
    "BridgeSettings": "bridge",
    "EndReason": "media",
    "FileStore": "store",
    "ForbiddenPathError": "errors",
    "H264Reencoder": "transcode",
    "H264Source": "sources",
    "IngestError": "errors",
    "IngestSettings": "manager",
    "IngestTimeoutError": "errors",
    "IngressManager": "manager",
    "IngressMember": "manager",
    "IngressRecord": "store",
    "IngressStore": "store",
    "key_digest": "keys",
    "LimitError": "errors",
    "LiveIngress": "manager",
    "MediaItem": "media",
    "MediaSink": "media",
    "MemoryStore": "store",
    "Metadata": "media",
    "OnPublish": "media",
    "OpusPacket": "transcode",
    "OpusSource": "sources",
    "ProtocolError": "errors",
    "PublishSession": "media",
    "PullSettings": "pull",
    "PullSource": "pull",
    "RedisStore": "store",
    "ReencodeSettings": "wire",
    "RefusedConnection": "media",
    "RoomAccess": "manager",
    "RoomUnavailableError": "errors",
    "RtmpLimits": "rtmp",
    "RtmpServer": "rtmp",
    "SourceError": "errors",
    "SrtLimits": "srt",
    "SrtServer": "srt",
    "StreamBridge": "bridge",
    "StreamKeys": "keys",
    "TranscodeError": "errors",
    "UnauthorizedError": "errors",
    "UnsupportedMediaError": "errors",
    "VideoAccessUnit": "media",
    "VideoConfig": "media",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
