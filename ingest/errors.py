"""
Errors of the ingest plane. Each carries a stable ``code`` that the admin API shows as an ingress's last error.

Every listener catches these per connection: the connection ends (its sink's ``ended`` gets the error), the
listener keeps serving.
"""

from __future__ import annotations


class IngestError(Exception):
    """Base class: what went wrong with one ingest connection or source, with a machine-readable ``code``."""

    code = "ingest_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolError(IngestError):
    """The peer broke the protocol: garbage, a malformed message, a stream cut in the middle of one."""

    code = "protocol_error"


class UnauthorizedError(IngestError):
    """The stream key (RTMP stream name, SRT streamid) is unknown or revoked."""

    code = "unauthorized"


class LimitError(IngestError):
    """A configured limit was hit: connections per address or in total, message size, buffered bytes."""

    code = "limit_exceeded"


class IngestTimeoutError(IngestError):
    """The peer was silent for too long (handshake, publish, or media)."""

    code = "timeout"


class UnsupportedMediaError(IngestError):
    """The stream carries a codec or format Chorus does not take (HEVC, AV1, MP3, ...)."""

    code = "unsupported_codec"


class SourceError(IngestError):
    """A pulled source could not be opened or read (connection refused, 404, the camera vanished)."""

    code = "source_unavailable"


class ForbiddenPathError(IngestError):
    """A file source lies outside the configured media folder (or is not a regular file)."""

    code = "forbidden_path"


class TranscodeError(IngestError):
    """A decoder or encoder failed, or its worker process died."""

    code = "transcode_failed"


class RoomUnavailableError(IngestError):
    """The stream's room cannot take it here: full, hosted by another node of the cluster, or in MCU mode."""

    code = "room_unavailable"
