"""
What :class:`.transcode.H264Reencoder` and its worker process (:mod:`.reencode_worker`) share: the frame format
on the pipes and the encoder settings. Deliberately light (no media plane, no aiortc), so that the worker starts
quickly: it imports only this module and PyAV.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

WIRE_HEADER = struct.Struct("!BBqqI")
WIRE_KIND_UNIT, WIRE_KIND_END, WIRE_KIND_ERROR = 1, 2, 3
WIRE_FLAG_KEY = 1
WIRE_MAX_UNIT = 16 << 20


@dataclass(frozen=True, slots=True)
class ReencodeSettings:
    """
    What the re-encoder makes: libx264 constrained baseline (``profile=baseline`` → ``42c0xx``), no B-frames,
    ``tune=zerolatency``, Annex B with SPS/PPS repeated before every IDR.

    :param width, height: output size; 0 keeps the input's.
    :param keyint: frames between periodic keyframes (requested ones come on top).
    """

    bitrate: int = 1_200_000
    fps: int = 30
    width: int = 0
    height: int = 0
    preset: str = "veryfast"
    keyint: int = 120
    threads: int = 1
