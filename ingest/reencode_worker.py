"""
The re-encode worker process of :class:`.transcode.H264Reencoder`: ``python -m chorus.ingest.reencode_worker
'<settings json>'`` reads access units (Annex B) framed as described in :mod:`.transcode` on stdin, decodes them
(FFmpeg's h264, one thread), encodes constrained baseline with libx264 and writes the units back on stdout.
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from typing import Any, BinaryIO

import av
import av.video.frame

from .wire import WIRE_FLAG_KEY, WIRE_HEADER, WIRE_KIND_END, WIRE_KIND_ERROR, WIRE_KIND_UNIT, ReencodeSettings


def _worker(settings: ReencodeSettings, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The child process: decode Annex B access units, encode them again, until end or EOF."""
    decoder = av.CodecContext.create("h264", "r")
    decoder.thread_count = 1  # frame threads would add a frame of latency each
    encoder: Any = None
    time_base = Fraction(1, 1000)

    def write(kind: int, flags: int, pts: int, payload: bytes) -> None:
        stdout.write(WIRE_HEADER.pack(kind, flags, pts, pts, len(payload)) + payload)

    def encode(frame: av.VideoFrame | None, force: bool) -> None:
        nonlocal encoder
        if frame is not None and encoder is None:
            encoder = av.CodecContext.create("libx264", "w")
            encoder.width = settings.width or frame.width
            encoder.height = settings.height or frame.height
            encoder.pix_fmt = "yuv420p"
            encoder.time_base = time_base
            encoder.framerate = Fraction(settings.fps)
            encoder.bit_rate = settings.bitrate
            encoder.gop_size = settings.keyint
            encoder.max_b_frames = 0
            encoder.options = {"profile": "baseline", "preset": settings.preset, "tune": "zerolatency",
                               "forced-idr": "1", "threads": str(settings.threads),
                               "x264-params": "repeat-headers=1:aud=0"}
        if encoder is None:
            return
        if frame is not None:
            pts = frame.pts
            frame = frame.reformat(encoder.width, encoder.height, "yuv420p")
            frame.pts = pts
            frame.time_base = time_base
            frame.pict_type = av.video.frame.PictureType.I if force else av.video.frame.PictureType.NONE
        for packet in encoder.encode(frame):
            write(WIRE_KIND_UNIT, WIRE_FLAG_KEY if packet.is_keyframe else 0, int(packet.pts or 0), bytes(packet))
        stdout.flush()

    force = False
    while True:
        header = stdin.read(WIRE_HEADER.size)
        if len(header) < WIRE_HEADER.size:
            break
        kind, flags, pts, dts, length = WIRE_HEADER.unpack(header)
        if kind == WIRE_KIND_END:
            break
        data = stdin.read(length)
        if len(data) < length:
            break
        force = force or bool(flags & WIRE_FLAG_KEY)
        packet = av.Packet(data)
        packet.pts, packet.dts, packet.time_base = pts, dts, time_base
        try:
            frames = decoder.decode(packet)
        except av.FFmpegError:
            continue  # a damaged picture: skip it, the next keyframe repairs the picture
        for frame in frames:
            encode(frame, force)
            force = False
    for frame in decoder.decode(None):
        encode(frame, False)
    encode(None, False)


def main() -> None:
    settings = ReencodeSettings(**json.loads(sys.argv[1]))
    stdout = sys.stdout.buffer
    try:
        _worker(settings, sys.stdin.buffer, stdout)
    except Exception as e:
        message = f"re-encode worker failed: {e!r}".encode()
        stdout.write(WIRE_HEADER.pack(WIRE_KIND_ERROR, 0, 0, 0, len(message)) + message)
        stdout.flush()
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
