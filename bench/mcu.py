"""
Server CPU of an MCU room: N participants (4 by default) each publish VP8 640x480@30 and Opus, and each
receives its N-1 audio mix and the grid composite (640x480@15 by default). Prints the server's CPU use.

    .venv/bin/python -m chorus.bench.mcu [--participants 4] [--seconds 20] [--compare-sfu]

The server is a real ``chorus serve`` process; its CPU is read from ``/proc/<pid>/stat`` (all threads,
decoder threads included). Publishers send a VP8 clip encoded once at start-up (so the load generator does
not encode video), and a sine tone encoded by aiortc. The participants decode what they receive (to check
that it arrives), in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import AudioStreamTrack, MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from chorus.sfu import aiortc_adapter
from chorus.sfu.tasks import Tasks
from chorus.signaling.client import ChorusClient

from .media import PacedTrack

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
VIDEO_FPS = 30


# --- media ---------------------------------------------------------------------------------------------------


def encode_clip(width: int, height: int, seconds: int = 2) -> list[bytes]:
    """A VP8 clip with motion, a keyframe every second (so a looping clip restarts on a keyframe)."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuv420p"
    codec.time_base = fractions.Fraction(1, VIDEO_FPS)
    codec.framerate = fractions.Fraction(VIDEO_FPS, 1)
    codec.bit_rate = 600_000
    codec.gop_size = VIDEO_FPS
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    y, x = np.mgrid[0:height, 0:width]
    frames: list[bytes] = []
    for i in range(seconds * VIDEO_FPS):
        t = i / VIDEO_FPS
        image = np.stack([
            (127 + 120 * np.sin(x / 37 + t * 2.1)).astype(np.uint8),
            (127 + 120 * np.sin(y / 23 - t * 1.7)).astype(np.uint8),
            (127 + 120 * np.sin((x + y) / 51 + t * 3.3)).astype(np.uint8),
        ], axis=-1)
        bx = int((width - 80) * (0.5 + 0.5 * math.sin(t * 1.3)))
        image[height // 3 : height // 3 + 80, bx : bx + 80] = 255
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        frames += [bytes(p) for p in codec.encode(frame)]
    frames += [bytes(p) for p in codec.encode(None)]
    return frames


class ClipTrack(PacedTrack):
    """Sends the pre-encoded clip in real time (aiortc packetizes it without encoding), looping."""

    kind = "video"

    def __init__(self, frames: list[bytes]) -> None:
        super().__init__(frames, VIDEO_FPS, fractions.Fraction(1, VIDEO_FPS), 1)


class ToneTrack(AudioStreamTrack):
    """A sine tone, 48 kHz mono, 20 ms frames, in real time."""

    def __init__(self, frequency: float) -> None:
        super().__init__()
        self._frequency = frequency
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.time()
        wait = self._start + self._pts / 48000 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(960) + self._pts) / 48000
        samples = (0.3 * 32767 * np.sin(2 * math.pi * self._frequency * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 48000)
        self._pts += 960
        return frame


# --- the server ----------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def start_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chorus.signaling", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "CHORUS_DEV_MODE": "1", "CHORUS_LOG_LEVEL": "warning",
             "CHORUS_MAX_CONNECTIONS_PER_IP": "100000", "CHORUS_MAX_CONNECTIONS": "100000"},
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chorus did not start, see {log}") from None
            time.sleep(0.1)


def room_info(port: int, room: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/rooms/{room}", timeout=5) as response:
        return dict(json.loads(response.read()))


# --- the run -------------------------------------------------------------------------------------------------


class Participant:
    def __init__(self, url: str) -> None:
        self.client = ChorusClient(url)
        self.frames = {"audio": 0, "video": 0}
        self._readers = Tasks("mcu bench readers")
        self.client.on_track(self._on_track)

    def _on_track(self, track: MediaStreamTrack, info: dict[str, Any]) -> None:
        self._readers.spawn(self._drain(track))

    async def _drain(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames[track.kind] += 1

    async def join(self, room: str, name: str, mode: str, options: dict[str, int]) -> None:
        await self.client.connect()
        data = {"v": 1, "room": room, "name": name, "mode": mode, "mcu": options}
        request = self.client.request

        async def with_mode(method: str, body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
            return await request(method, data if method == "join" else body, **kwargs)

        self.client.request = with_mode  # type: ignore[method-assign]
        try:
            await self.client.join(room, name)
        finally:
            del self.client.request

    async def close(self) -> None:
        await self._readers.close()
        await self.client.close()


async def measure(port: int, pid: int, mode: str, args: argparse.Namespace, clip: list[bytes]) -> dict[str, Any]:
    room = f"bench-{mode}-{os.getpid()}"
    width, height = map(int, args.size.split("x"))
    options = {"width": width, "height": height, "fps": args.fps}
    participants = [Participant(f"ws://127.0.0.1:{port}/ws") for _ in range(args.participants)]
    try:
        for i, participant in enumerate(participants):
            await participant.join(room, f"p{i}", mode, options)
            await participant.client.publish(ToneTrack(300 + 110 * i), ClipTrack(clip))
        await asyncio.sleep(args.warmup)
        before_info = room_info(port, room) if mode == "mcu" else {}
        frames_before = [dict(p.frames) for p in participants]
        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        cpu_after, wall_after = cpu_seconds(pid), time.monotonic()
        after_info = room_info(port, room) if mode == "mcu" else {}
        elapsed = wall_after - wall_before
        received = [
            {k: (p.frames[k] - b[k]) / elapsed for k in ("audio", "video")}
            for p, b in zip(participants, frames_before, strict=True)
        ]
        result: dict[str, Any] = {
            "mode": mode,
            "cpu": (cpu_after - cpu_before) / elapsed,
            "rss_mb": rss_mb(pid),
            "received_fps": received,
        }
        if mode == "mcu":
            video = (before_info["mcu"]["video"], after_info["mcu"]["video"])
            audio = (before_info["mcu"]["audio"], after_info["mcu"]["audio"])
            result["composites_per_s"] = (video[1]["frames"] - video[0]["frames"]) / elapsed
            result["video_kbps"] = (video[1]["bytes"] - video[0]["bytes"]) * 8 / elapsed / 1000
            result["opus_encodes_per_s"] = (audio[1]["encodes"] - audio[0]["encodes"]) / elapsed
            result["skipped_ticks"] = video[1]["skipped_ticks"] + audio[1]["skipped_ticks"]
        return result
    finally:
        for participant in participants:
            await participant.close()


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    cpu = result["cpu"]
    video_fps = [round(r["video"], 1) for r in result["received_fps"]]
    audio_fps = [round(r["audio"], 1) for r in result["received_fps"]]
    print(f"{result['mode'].upper()} room, {args.participants} participants publishing VP8 640x480@30 + Opus:")
    print(f"  server CPU {cpu:.3f} CPU-s/s ({cpu * 100:.0f}% of one core), RSS {result['rss_mb']:.0f} MB")
    print(f"  each participant receives video {video_fps} frames/s, audio {audio_fps} frames/s")
    if result["mode"] == "mcu":
        print(f"  composite {args.size}@{args.fps}: {result['composites_per_s']:.1f} encodes/s for "
              f"{args.participants} subscribers, {result['video_kbps']:.0f} kbit/s; "
              f"{result['opus_encodes_per_s']:.0f} Opus encodes/s; skipped clock ticks {result['skipped_ticks']}")


async def main_async(args: argparse.Namespace) -> None:
    aiortc_adapter.set_host_addresses(["127.0.0.1"])
    clip = encode_clip(640, 480)
    log = Path(f"/tmp/chorus-bench-mcu-{os.getpid()}.log")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = start_server(port, log)
    try:
        modes = ["mcu", "sfu"] if args.compare_sfu else ["mcu"]
        for mode in modes:
            report(await measure(port, server.pid, mode, args, clip), args)
            await asyncio.sleep(1.0)
    finally:
        server.terminate()
        server.wait(10)
    print(f"  (server log: {log}; {os.cpu_count()} CPUs, load generator in this process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--size", default="640x480", help="composite size (default 640x480)")
    parser.add_argument("--fps", type=int, default=15, help="composite frame rate (default 15)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--compare-sfu", action="store_true", help="also measure the same call in SFU mode")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
