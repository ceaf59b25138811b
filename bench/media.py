"""
Load-generator media: a VP8 clip and Opus packets encoded once, sent as pre-encoded ``av.Packet``s.

Every encoded frame carries its send time so that subscribers can measure one-way latency without
decoding (publisher and subscribers run on the same machine, so they share ``time.time()``):

* VP8: a 12-byte trailer ``MAGIC + float64 send time`` is appended to the frame. It falls inside the
  frame's last partition, whose length is implicit, so a decoder never reads it; the servers under test
  never look past the VP8 payload descriptor.
* Opus: each packet (code 0, one 20 ms frame) is rewritten as a code 3 packet whose *padding* is the same
  12 bytes: a standard Opus decoder skips padding (RFC 6716 §3.2.5).

The receiving side finds the trailer at the end of the last RTP packet of a frame (the marker packet),
or split over the last two packets (aiortc's VP8 packetizer can leave a tiny last packet).
"""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import math
import os
import pickle
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from chorus.sfu import aiortc_adapter

MAGIC = b"CHbt"
TRAILER = struct.Struct("!4sd")  # magic, send time (time.time(), seconds)
TRAILER_SIZE = TRAILER.size  # 12

VIDEO_WIDTH = 640
VIDEO_HEIGHT = 480
VIDEO_FPS = 30
VIDEO_BITRATE = 660_000
CLIP_SECONDS = 4  # a whole number of GOPs, so the loop boundary is a keyframe
AUDIO_RATE = 48000
AUDIO_PTIME = 0.020
AUDIO_BITRATE = 32_000


@dataclass
class Clip:
    """The encoded media every publisher sends (looping)."""

    video: list[bytes]  # one VP8 frame each, VIDEO_FPS per second; video[0] is a keyframe
    keyframes: list[int]
    audio: list[bytes]  # one 20 ms Opus packet each

    @property
    def video_kbps(self) -> float:
        return sum(map(len, self.video)) * 8 / (len(self.video) / VIDEO_FPS) / 1000

    @property
    def audio_kbps(self) -> float:
        return sum(map(len, self.audio)) * 8 / (len(self.audio) * AUDIO_PTIME) / 1000


def _video_image(i: int) -> np.ndarray:
    """A frame with real motion (moving gradients, a bouncing block, a little noise) so inter frames are
    not trivially small. (Each gradient depends on x, y or x + y only: computed once per row, column or
    diagonal and broadcast, the same values as over the whole grid at a fraction of the cost.)"""
    h, w = VIDEO_HEIGHT, VIDEO_WIDTH
    y, x = np.mgrid[0:h, 0:w]
    t = i / VIDEO_FPS
    xs, ys, ds = np.arange(w), np.arange(h), np.arange(w + h - 1)
    r = (127 + 120 * np.sin(xs / 37.0 + t * 2.1)).astype(np.uint8)[x]
    g = (127 + 120 * np.sin(ys / 23.0 - t * 1.7)).astype(np.uint8)[y]
    b = (127 + 120 * np.sin(ds / 51.0 + t * 3.3)).astype(np.uint8)[x + y]
    image = np.stack([r, g, b], axis=-1)
    bx = int((w - 120) * (0.5 + 0.5 * math.sin(t * 1.3)))
    by = int((h - 120) * (0.5 + 0.5 * math.cos(t * 0.9)))
    image[by : by + 120, bx : bx + 120] = (255, 255, 255)
    rng = np.random.default_rng(i // 3)
    noise = rng.integers(0, 12, size=(h // 8, w // 8, 1), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return image - np.minimum(image, noise)


def _encode_video() -> tuple[list[bytes], list[int]]:
    """The single-layer clip: VP8 640x480; its frames and the indices of its keyframes."""
    return _encode_sizes([(VIDEO_WIDTH, VIDEO_HEIGHT, VIDEO_BITRATE)])[0]


def _vp8_encoder(width: int, height: int, bitrate: int, temporal: bool) -> av.CodecContext:
    """
    libvpx for ``width`` x ``height`` at ``bitrate``, as a browser's real-time encoder; ``temporal``: three
    temporal layers in the L1T3 pattern (see :data:`L1T3`), which FFmpeg's libvpx wrapper restarts at every forced
    keyframe.
    """
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuv420p"
    codec.time_base = fractions.Fraction(1, VIDEO_FPS)
    codec.framerate = fractions.Fraction(VIDEO_FPS, 1)
    codec.bit_rate = bitrate
    codec.gop_size = VIDEO_FPS  # a keyframe every second
    options = {
        "deadline": "realtime",
        "cpu-used": "8",
        "lag-in-frames": "0",
        "auto-alt-ref": "0",
        "keyint_min": str(VIDEO_FPS),
        "minrate": str(bitrate),
        "maxrate": str(bitrate),
        "b": str(bitrate),
        "undershoot-pct": "95",
        "max-intra-rate": "2000",  # as libwebrtc: a keyframe is at most ~9 average frames
    }
    if temporal:
        # libwebrtc's split of a VP8 L1T3 stream: 40 % in TL0, 60 % up to TL1, all of it with TL2 (kbps, cumulative).
        kbps = bitrate // 1000
        options["ts-parameters"] = (f"ts_number_layers=3:ts_target_bitrate={kbps * 4 // 10},{kbps * 6 // 10},{kbps}:"
                                    "ts_rate_decimator=4,2,1:ts_periodicity=4:ts_layer_id=0,2,1,2:ts_layering_mode=3")
    codec.options = options
    return codec


def _encode_sizes(sizes: list[tuple[int, int, int]], temporal: bool = False) -> list[tuple[list[bytes], list[int]]]:
    """
    The clip's pictures (drawn once at 640x480) encoded at each ``(width, height, bitrate)`` of ``sizes``: per size,
    the frames and the indices of the keyframes.
    """
    codecs = [_vp8_encoder(width, height, bitrate, temporal) for width, height, bitrate in sizes]
    outputs: list[tuple[list[bytes], list[int]]] = [([], []) for _ in sizes]
    total = CLIP_SECONDS * VIDEO_FPS

    def collect(packets: list[av.Packet], out: tuple[list[bytes], list[int]]) -> None:
        frames, keyframes = out
        for packet in packets:
            if packet.is_keyframe:
                keyframes.append(len(frames))
            frames.append(bytes(packet))

    for i in range(total):
        picture = av.VideoFrame.from_ndarray(_video_image(i), format="rgb24")
        for codec, out in zip(codecs, outputs, strict=True):
            if (codec.width, codec.height) == (VIDEO_WIDTH, VIDEO_HEIGHT):
                frame = picture.reformat(format="yuv420p")
            else:
                frame = picture.reformat(width=codec.width, height=codec.height, format="yuv420p")
            frame.pts = i
            frame.pict_type = (av.video.frame.PictureType.I if i % VIDEO_FPS == 0
                               else av.video.frame.PictureType.NONE)
            collect(codec.encode(frame), out)
    for codec, out in zip(codecs, outputs, strict=True):
        collect(codec.encode(None), out)
    return [(frames[:total], [k for k in keyframes if k < total]) for frames, keyframes in outputs]


def _encode_audio() -> list[bytes]:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = AUDIO_RATE
    codec.layout = "stereo"
    codec.format = "s16"
    codec.bit_rate = AUDIO_BITRATE
    codec.time_base = fractions.Fraction(1, AUDIO_RATE)
    samples = int(AUDIO_RATE * AUDIO_PTIME)
    packets: list[bytes] = []
    for i in range(CLIP_SECONDS * int(1 / AUDIO_PTIME)):
        t = (np.arange(samples) + i * samples) / AUDIO_RATE
        tone = 0.3 * np.sin(2 * math.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * math.pi * 3 * t))
        pcm = (tone * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([pcm, pcm]).T.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = AUDIO_RATE
        frame.pts = i * samples
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    return packets


def clip_path() -> Path:
    key = hashlib.sha256(
        repr((VIDEO_WIDTH, VIDEO_HEIGHT, VIDEO_FPS, VIDEO_BITRATE, CLIP_SECONDS, AUDIO_BITRATE, av.__version__, 2))
        .encode()
    ).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"chorus-bench-clip-{key}.pickle"


def load_clip() -> Clip:
    """The clip, encoded on first use and cached in the temp folder."""
    path = clip_path()
    if path.exists():
        try:
            with open(path, "rb") as f:
                clip = pickle.load(f)
            if isinstance(clip, Clip):
                return clip
        except Exception:  # noqa: BLE001 - a broken cache is re-encoded
            pass
    video, keyframes = _encode_video()
    clip = Clip(video=video, keyframes=keyframes, audio=_encode_audio())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(clip, f)
    os.replace(tmp, path)
    return clip


# --- the simulcast clip ---------------------------------------------------------------------------------

#: The temporal layer (TID) of each frame of an L1T3 stream, by its place after the last keyframe (FFmpeg's
#: libvpx ``ts_layering_mode=3``: TL0 refers to TL0, TL1 to TL0, TL2 to the TL0 or TL1 before it).
L1T3 = (0, 2, 1, 2)
#: Frames that depend on TL0 only (the VP8 descriptor's Y bit, RFC 7741 §4.2).
L1T3_SYNC = (False, True, True, False)


@dataclass(frozen=True)
class LayerSpec:
    rid: str
    width: int
    height: int
    bitrate: int


#: The simulcast ladder: ¼, ½ and full size, as a browser sends (RIDs q, h, f). The full layer has the
#: single-layer clip's size and bit rate, so that forwarding it costs the same per packet.
SIMULCAST_LAYERS = (
    LayerSpec("q", VIDEO_WIDTH // 4, VIDEO_HEIGHT // 4, 110_000),
    LayerSpec("h", VIDEO_WIDTH // 2, VIDEO_HEIGHT // 2, 280_000),
    LayerSpec("f", VIDEO_WIDTH, VIDEO_HEIGHT, VIDEO_BITRATE),
)


@dataclass
class LayerClip:
    """One simulcast layer of the clip: VP8 frames with L1T3 temporal layers, keyframes every second."""

    rid: str
    width: int
    height: int
    frames: list[bytes]
    keyframes: list[int]

    @property
    def kbps(self) -> float:
        return sum(map(len, self.frames)) * 8 / (len(self.frames) / VIDEO_FPS) / 1000

    def temporal(self, index: int) -> tuple[int, bool]:
        """The TID of frame ``index`` and whether it is a layer sync frame (keyframes are TL0)."""
        since = index - max((k for k in self.keyframes if k <= index), default=0)
        return L1T3[since % 4], L1T3_SYNC[since % 4]


@dataclass
class SimulcastClip:
    """The three layers a simulcast generator publisher sends, lowest first."""

    layers: list[LayerClip]


def simulcast_clip_path() -> Path:
    key = hashlib.sha256(
        repr((SIMULCAST_LAYERS, VIDEO_FPS, CLIP_SECONDS, L1T3, av.__version__, 1)).encode()
    ).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"chorus-bench-simulcast-{key}.pickle"


def load_simulcast_clip() -> SimulcastClip:
    """The simulcast clip, encoded on first use (a few seconds) and cached in the temp folder."""
    path = simulcast_clip_path()
    if path.exists():
        try:
            with open(path, "rb") as f:
                clip = pickle.load(f)
            if isinstance(clip, SimulcastClip):
                return clip
        except Exception:  # noqa: BLE001 - a broken cache is re-encoded
            pass
    encoded = _encode_sizes([(spec.width, spec.height, spec.bitrate) for spec in SIMULCAST_LAYERS], temporal=True)
    clip = SimulcastClip([LayerClip(spec.rid, spec.width, spec.height, frames, keyframes)
                          for spec, (frames, keyframes) in zip(SIMULCAST_LAYERS, encoded, strict=True)])
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(clip, f)
    os.replace(tmp, path)
    return clip


# --- send-time trailers --------------------------------------------------------------------------------


def tag_vp8(frame: bytes, send_time: float) -> bytes:
    return frame + TRAILER.pack(MAGIC, send_time)


def tag_opus(packet: bytes, send_time: float) -> bytes:
    """Rewrite a code 0 Opus packet as code 3 with the trailer as padding; other packets get a bare trailer
    (still found by the receiver, but a decoder would read it as frame data)."""
    if packet and packet[0] & 0x03 == 0:
        # TOC with c=3, frame count byte: v=0 (CBR), p=1 (padding), M=1; padding length; frame; padding.
        return bytes((packet[0] | 0x03, 0x41, TRAILER_SIZE)) + packet[1:] + TRAILER.pack(MAGIC, send_time)
    return packet + TRAILER.pack(MAGIC, send_time)


def read_trailer(data: bytes) -> float | None:
    """The send time in the last 12 bytes of ``data``, or None."""
    if len(data) < TRAILER_SIZE:
        return None
    magic, send_time = TRAILER.unpack_from(data, len(data) - TRAILER_SIZE)
    return send_time if magic == MAGIC else None


class PacedTrack(MediaStreamTrack):
    """
    Returns pre-encoded packets in real time, looping, with monotonically increasing pts (subclasses stamp them
    with the send time in :meth:`_tag`). Given ``keyframes`` (the indices of the key frames among ``packets``),
    it answers keyframe requests (PLI/FIR) as a real encoder does: aiortc's sender records them in a flag meant
    for its encoder, which this track reads (set :attr:`sender` once the track is added) and answers by skipping
    ahead to the next key frame.
    """

    def __init__(self, packets: list[bytes], rate: float, time_base: fractions.Fraction, pts_step: int,
                 start: float | None = None, keyframes: list[int] | None = None) -> None:
        super().__init__()
        self._packets = packets
        self._rate = rate
        self._time_base = time_base
        self._pts_step = pts_step
        self._n = 0
        self._offset = 0
        self._start = start
        self._keyframes = sorted(keyframes or [])
        self.sent = 0
        self.sender: Any = None
        self.keyframes_forced = 0

    def _tag(self, data: bytes, now: float) -> bytes:
        return data

    def _answer_keyframe_request(self) -> None:
        if not self._keyframes or self.sender is None or not aiortc_adapter.take_keyframe_request(self.sender):
            return
        size = len(self._packets)
        index = (self._n + self._offset) % size
        if index not in self._keyframes:
            following = next((k for k in self._keyframes if k > index), self._keyframes[0] + size)
            self._offset += following - index
            self.keyframes_forced += 1

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        wait = self._start + self._n / self._rate - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._answer_keyframe_request()
        packet = av.Packet(self._tag(self._packets[(self._n + self._offset) % len(self._packets)], time.time()))
        packet.pts = self._n * self._pts_step
        packet.time_base = self._time_base
        self._n += 1
        self.sent += 1
        return packet


class ClipVideoTrack(PacedTrack):
    """The VP8 clip, stamped with send times, answering keyframe requests (see :class:`PacedTrack`)."""

    kind = "video"

    def __init__(self, clip: Clip) -> None:
        super().__init__(clip.video, VIDEO_FPS, fractions.Fraction(1, VIDEO_FPS), 1, keyframes=clip.keyframes or [0])

    def _tag(self, data: bytes, now: float) -> bytes:
        return tag_vp8(data, now)


class ClipAudioTrack(PacedTrack):
    kind = "audio"

    def __init__(self, clip: Clip) -> None:
        samples = int(AUDIO_RATE * AUDIO_PTIME)
        super().__init__(clip.audio, 1 / AUDIO_PTIME, fractions.Fraction(1, AUDIO_RATE), samples)

    def _tag(self, data: bytes, now: float) -> bytes:
        return tag_opus(data, now)
