"""
Egress: media leaving Chorus for HTTP streaming (HLS, DASH) and for recordings.

The media-level pieces, each usable alone and wired into rooms by the signaling plane:

- :mod:`~chorus.egress.depacketize` — RTP packets → encoded access units (VP8, H.264, Opus), no decoding.
- :mod:`~chorus.egress.fmp4` — a CMAF fragmented-MP4 writer: init segments, parts and segments.
- :mod:`~chorus.egress.playlist` — HLS (with LL-HLS) media and master playlists, a DASH MPD, blocking reload.
- :mod:`~chorus.egress.ladder` — the bitrate ladder: passthrough top rung, lower rungs encoded in a worker
  process with keyframes aligned across rungs, Opus → AAC.
- :mod:`~chorus.egress.recorder` — per-track recording without transcoding (WebM, fragmented MP4, MKV).

This package speaks only to the media plane's seams (a sink of forwarded RTP packets, a keyframe request
callable, the publisher's RTCP sender-report mapping); it never imports ``chorus.signaling``.
"""

from __future__ import annotations

from chorus.egress.errors import EgressError

__all__ = ["EgressError"]
