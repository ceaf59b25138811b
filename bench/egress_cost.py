"""
``python -m chorus.bench.egress_cost``: what HTTP egress costs (docs/performance.md, "Egress").

1. **Passthrough HLS per stream.** N rooms, each with one publisher of pre-encoded H.264 640x480 and mono Opus, as
   a WebRTC camera and microphone send (the publishers never encode). The server's CPU is measured for a window
   without egress, then with one HLS egress per room and no lower rungs (the publisher's H.264 is the only video
   rung; its Opus becomes AAC in the worker, or with ``audio: opus`` is passed through too):
   the cost per stream is the server's extra CPU plus the workers' CPU, divided by N.
2. **Each transcoded rung, per input.** One egress with the default ladder (360p, 180p) on a 640x480 and on a
   1280x720 H.264 publisher (top rung passed through), and on a 640x480 VP8 publisher (every rung encoded): the
   worker's CPU per stage (decode, each rung, audio) as it reports it.

The server is pinned to core 0 and this process (the publishers) to core 1, as ``make bench`` does; the egress
workers are the server's children, so they share its core (at a lower priority). Prints Markdown; writes JSON to
``bench/results/egress-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack

from chorus.signaling.client import ChorusClient

from .media import ClipAudioTrack, ClipVideoTrack, PacedTrack, load_clip
from .servers import ROOT, process_cpu_seconds, start_chorus

FPS = 30


def encode_h264(width: int, height: int, seconds: float = 4.0, kbps: int = 1200) -> tuple[list[bytes], list[int]]:
    """A moving test picture as H.264 (baseline, no B-frames), a key frame every second; cached on disk."""
    cache = Path(tempfile.gettempdir()) / f"chorus-egress-h264-{width}x{height}-{kbps}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        frames, sizes, keys = data["frames"].tobytes(), data["sizes"], data["keys"]
        out, offset = [], 0
        for size in sizes:
            out.append(frames[offset:offset + size])
            offset += size
        return out, [int(k) for k in keys]
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base, ctx.framerate = fractions.Fraction(1, FPS), fractions.Fraction(FPS, 1)
    ctx.bit_rate, ctx.gop_size = kbps * 1000, FPS
    ctx.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline", "bf": "0",
                   "sc_threshold": "0", "keyint_min": str(FPS)}
    packets: list[bytes] = []
    keys: list[int] = []
    for i in range(int(seconds * FPS)):
        y = (np.add.outer(np.arange(height), np.arange(width) * 2 + 5 * i) % 220 + 16).astype(np.uint8)
        noise = np.random.default_rng(i).integers(0, 24, (height, width), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(np.dstack([y + noise, np.roll(y, i, 0), y[::-1]]), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = i
        for p in ctx.encode(frame):
            if p.is_keyframe:
                keys.append(len(packets))
            packets.append(bytes(p))
    for p in ctx.encode(None):
        packets.append(bytes(p))
    np.savez(cache, frames=np.frombuffer(b"".join(packets), np.uint8), sizes=np.array([len(p) for p in packets]),
             keys=np.array(keys))
    return packets, keys


class H264ClipTrack(PacedTrack):
    """Pre-encoded H.264 in real time; a keyframe request skips to the clip's next key frame, as an encoder would
    answer one with an IDR."""

    kind = "video"

    def __init__(self, packets: list[bytes], keys: list[int]) -> None:
        super().__init__(packets, FPS, fractions.Fraction(1, 90000), 90000 // FPS, keyframes=keys)


def encode_mono_opus(seconds: float = 4.0) -> list[bytes]:
    """Speech-like mono Opus (a call's microphone): a tone with a syllable rhythm, 20 ms packets, 32 kbit/s."""
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = 48000, "mono", "s16", 32000
    ctx.time_base = fractions.Fraction(1, 48000)
    packets: list[bytes] = []
    for i in range(int(seconds * 50)):
        t = (np.arange(960) + i * 960) / 48000
        tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
        frame = av.AudioFrame.from_ndarray((tone * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts = 48000, i * 960
        packets += [bytes(p) for p in ctx.encode(frame)]
    return packets


class OpusClipTrack(PacedTrack):
    """Pre-encoded Opus packets in real time, 20 ms each (the publisher never encodes)."""

    kind = "audio"

    def __init__(self, packets: list[bytes]) -> None:
        super().__init__(packets, 50, fractions.Fraction(1, 48000), 960)


def admin(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


async def publish(ws_url: str, room: str, video: MediaStreamTrack, codec: str,
                  audio: MediaStreamTrack | None = None) -> ChorusClient:
    client = ChorusClient(ws_url, decode=False)
    await client.connect()
    await client.join(room, "pub", identity="pub")
    await client.publish(audio or ClipAudioTrack(load_clip()), video, video_codec=codec)
    for transceiver in client.publish_pc.getTransceivers() if client.publish_pc else []:
        if transceiver.sender.track is video and hasattr(video, "sender"):
            video.sender = transceiver.sender
    return client


async def wait_segments(base: str, egress_id: str, count: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        described = await asyncio.to_thread(admin, base, "GET", f"/api/egress/{egress_id}")
        videos = [r for r in described["renditions"] if r["kind"] == "video"]
        if videos and min(r["segments"] for r in videos) >= count:
            return dict(described)
        if time.monotonic() > deadline:
            room = await asyncio.to_thread(admin, base, "GET", f"/api/rooms/{described['room']}")
            raise RuntimeError(f"egress {egress_id} made no segments: {described}; the room: {room}")
        await asyncio.sleep(0.5)


async def measure(pids: list[int], seconds: float) -> float:
    """CPU seconds per second of wall time of ``pids`` over ``seconds``."""
    before = sum(process_cpu_seconds(p) for p in pids)
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    return (sum(process_cpu_seconds(p) for p in pids) - before) / (time.monotonic() - t0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    logdir = Path(tempfile.mkdtemp(prefix="chorus-egress-cost-"))
    server = start_chorus(0 if pin else None, logdir)
    base = server.url.replace("ws://", "http://").removesuffix("/ws")
    results: dict[str, Any] = {"streams": args.streams, "duration": args.duration, "pinned": pin}
    clients: list[ChorusClient] = []
    try:
        # 1. Passthrough HLS per stream.
        packets, keys = encode_h264(640, 480)
        rooms = [f"cost-{i}" for i in range(args.streams)]
        mono = encode_mono_opus()
        for room in rooms:  # H.264 640x480 and mono Opus, as a WebRTC camera and microphone send
            clients.append(await publish(server.url, room, H264ClipTrack(packets, keys), "video/H264",
                                         OpusClipTrack(mono)))
        await asyncio.sleep(3)
        results["passthrough"] = {}
        for audio in ("aac", "opus"):
            # Rounds of (without, with) windows, back to back: the server's own CPU drifts more than the egress
            # costs, so the difference is taken within each round and the median of the rounds reported.
            rounds: list[tuple[float, float, float]] = []
            modes: set[str] = set()
            for _ in range(args.rounds):
                base_cpu = await measure([server.pid], args.duration)
                egresses = [await asyncio.to_thread(admin, base, "POST", "/api/egress", {
                    "room": room, "kind": "hls", "participant": "pub", "ladder": [], "audio": audio})
                    for room in rooms]
                for egress in egresses:
                    await wait_segments(base, egress["id"], 1)
                workers = [e["worker"]["pid"] for e in egresses]
                server_cpu, worker_cpu = await asyncio.gather(measure([server.pid], args.duration),
                                                              measure(workers, args.duration))
                for egress in egresses:
                    described = await asyncio.to_thread(admin, base, "DELETE", f"/api/egress/{egress['id']}")
                    modes.add(described["mode"])
                rounds.append((base_cpu, server_cpu, worker_cpu))
            loop = statistics.median(100 * (w - b) / args.streams for b, w, _ in rounds)
            worker = statistics.median(100 * c / args.streams for _, _, c in rounds)
            results["passthrough"][audio] = {
                "rounds": [[round(x, 4) for x in r] for r in rounds], "event_loop_percent_per_stream": round(loop, 2),
                "worker_percent_per_stream": round(worker, 2), "percent_of_core_per_stream": round(loop + worker, 2),
                "modes": sorted(modes)}
            print(f"passthrough HLS, {audio}: {loop + worker:.2f} % of a core per stream (event loop {loop:.2f} %, "
                  f"worker {worker:.2f} %; rounds {rounds})", file=sys.stderr)

        # 2. The ladder's stages, per input.
        ladders: dict[str, Any] = {}
        big, big_keys = encode_h264(1280, 720, kbps=2500)
        for name, room, track, codec in (
                ("h264-640x480", rooms[0], None, None),
                ("h264-1280x720", "cost-720p", H264ClipTrack(big, big_keys), "video/H264"),
                ("vp8-640x480", "cost-vp8", ClipVideoTrack(load_clip()), "video/VP8")):
            if track is not None:
                clients.append(await publish(server.url, room, track, str(codec)))
                await asyncio.sleep(2)
            egress = await asyncio.to_thread(admin, base, "POST", "/api/egress",
                                             {"room": room, "kind": "hls", "participant": "pub"})
            await wait_segments(base, egress["id"], 1)
            before = await asyncio.to_thread(admin, base, "GET", f"/api/egress/{egress['id']}")
            await asyncio.sleep(args.duration)
            after = await asyncio.to_thread(admin, base, "GET", f"/api/egress/{egress['id']}")
            await asyncio.to_thread(admin, base, "DELETE", f"/api/egress/{egress['id']}")
            ladders[name] = {"mode": after["mode"], "cpu_percent": after["worker"]["cpu_percent"],
                             "frames_dropped": after["worker"]["frames_dropped"],
                             "renditions": [(r["name"], r["width"], r["height"]) for r in after["renditions"]]}
            del before
            print(f"ladder {name}: {ladders[name]}", file=sys.stderr)
        results["ladders"] = ladders
    finally:
        for client in clients:
            await client.close()
        server.stop()
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| passthrough HLS, H.264 640x480 + mono Opus (% of a core per stream) | event loop | worker | total |",
             "| --- | --- | --- | --- |"]
    for audio, p in results["passthrough"].items():
        lines.append(f"| audio {audio} ({results['streams']} streams) | {p['event_loop_percent_per_stream']:.2f} | "
                     f"{p['worker_percent_per_stream']:.2f} | **{p['percent_of_core_per_stream']:.2f}** |")
    lines += ["", "| input | " + " | ".join(("decode", "source", "360p", "180p", "audio")) + " |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, ladder in results["ladders"].items():
        cpu = ladder["cpu_percent"]
        lines.append(f"| {name} ({ladder['mode']}) | " +
                     " | ".join(f"{cpu[s]:.1f}" if s in cpu else "–" for s in ("decode", "source", "360p", "180p",
                                                                            "audio")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chorus.bench.egress_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="passthrough streams (rooms) measured at once")
    parser.add_argument("--duration", type=float, default=10.0, help="each measurement window, s")
    parser.add_argument("--rounds", type=int, default=3, help="(without, with) window pairs per passthrough figure")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the publishers")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    print(markdown(results))
    out = ROOT / "bench" / "results" / f"egress-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
