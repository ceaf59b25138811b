"""
Known media for the egress tests: small encoded streams made here with PyAV (libx264, libvpx, libopus), and
the same streams as RTP packets, packetized by aiortc's own public ``Encoder.pack`` (what a WebRTC publisher's
packetizer does: FU-A, STAP-A, VP8 descriptors).

Everything is cached per process: encoding is the expensive part and the machine has two shared cores.
"""

from __future__ import annotations

import fractions
import functools
import math
from dataclasses import dataclass

import av
import numpy as np
from aiortc.codecs import get_encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

H264_CODEC = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                                   parameters={"packetization-mode": "1", "profile-level-id": "42e01f"})
VP8_CODEC = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
OPUS_CODEC = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


@dataclass(frozen=True)
class Encoded:
    """One encoded frame: bitstream bytes, pts in the clock rate (90 kHz video, 48 kHz audio), key frame."""

    data: bytes
    pts: int
    keyframe: bool


def picture(i: int, width: int, height: int) -> av.VideoFrame:
    """A moving textured pattern, flat white when ``i % 30 == 15`` (a flash to find in the output)."""
    y = np.add.outer(np.arange(height, dtype=np.uint16), np.arange(width, dtype=np.uint16) + 4 * i) % 200
    y = (y + np.roll(_noise(width, height), 2 * i, axis=1)).astype(np.uint8)
    if i % 30 == 15:
        y[:] = 235
    frame = av.VideoFrame.from_ndarray(np.dstack([y, y, y]), format="rgb24").reformat(format="yuv420p")
    frame.pts = i
    frame.time_base = fractions.Fraction(1, 30)
    return frame


@functools.lru_cache(maxsize=4)
def _noise(width: int, height: int) -> np.ndarray:
    """A fixed texture: key frames of it are large enough for FU-A fragmentation."""
    return np.random.default_rng(0).integers(0, 40, (height, width), dtype=np.uint16)


@functools.lru_cache(maxsize=8)
def encode_video(codec: str, frames: int, width: int = 320, height: int = 180, gop: int = 30) -> tuple[Encoded, ...]:
    """``frames`` frames at 30 fps (3000 ticks of 90 kHz each) with a key frame every ``gop``."""
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = fractions.Fraction(1, 30)
    ctx.framerate = fractions.Fraction(30, 1)
    ctx.gop_size = gop
    if codec == "libx264":
        ctx.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline", "bf": "0",
                       "sc_threshold": "0", "keyint_min": str(gop)}
    else:
        ctx.bit_rate = 500_000
        ctx.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    out: list[Encoded] = []
    for i in range(frames):
        f = picture(i, width, height)
        f.pict_type = av.video.frame.PictureType.I if i % gop == 0 else av.video.frame.PictureType.NONE
        for p in ctx.encode(f):
            out.append(Encoded(bytes(p), int(p.pts) * 3000, bool(p.is_keyframe)))
    for p in ctx.encode(None):
        out.append(Encoded(bytes(p), int(p.pts) * 3000, bool(p.is_keyframe)))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def encode_opus(seconds: float, freq: float = 440.0, beep_every: int = 0) -> tuple[Encoded, ...]:
    """Stereo 48 kHz Opus, 20 ms packets, a sine tone (or silence with a beep each ``beep_every`` frames)."""
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format = 48000, "stereo", "s16"
    ctx.time_base = fractions.Fraction(1, 48000)
    ctx.options = {"frame_duration": "20"}
    out: list[Encoded] = []
    n = int(seconds * 50)
    for i in range(n):
        t = (np.arange(960) + i * 960) / 48000
        tone = np.sin(2 * math.pi * freq * t) * 8000
        if beep_every and i % beep_every >= 3:
            tone = tone * 0
        s = np.repeat(tone.astype(np.int16), 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(s, format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i * 960, fractions.Fraction(1, 48000)
        for p in ctx.encode(frame):
            out.append(Encoded(bytes(p), int(p.pts), True))
    for p in ctx.encode(None):
        out.append(Encoded(bytes(p), int(p.pts), True))
    return tuple(out)


def packetize(codec: RTCRtpCodecParameters, frames: tuple[Encoded, ...], *, seq0: int = 1000, ts0: int = 0,
              ssrc: int = 0x1234) -> list[RtpPacket]:
    """RTP packets for ``frames`` as aiortc's packetizer makes them; the marker bit on each frame's last packet."""
    encoder = get_encoder(codec)
    packets: list[RtpPacket] = []
    seq = seq0
    for frame in frames:
        packet = av.Packet(frame.data)
        packet.pts = frame.pts
        packet.time_base = fractions.Fraction(1, codec.clockRate)
        payloads, _ = encoder.pack(packet)
        for k, payload in enumerate(payloads):
            packets.append(RtpPacket(payload_type=codec.payloadType, marker=int(k == len(payloads) - 1),
                                     sequence_number=seq & 0xFFFF, timestamp=(ts0 + frame.pts) & 0xFFFFFFFF,
                                     ssrc=ssrc, payload=payload))
            seq += 1
    return packets
