"""
A two-person call measured from its own process, so that what the test process does (spawning encoders, polling
the admin API) does not starve the measurement:

    python tests/call_watch.py WS_URL ROOM PUBLISHER_TOKEN WATCHER_TOKEN

A publisher sends pre-encoded VP8 (no encoder runs) and a watcher decodes it; prints ``ready`` once frames flow.
Then, for each line ``report START END`` on stdin (``time.monotonic()`` values: the clock is system-wide), prints
one JSON line: the frame rate over the 5 s before START, the frame rate between START and END, the longest gap
between frames there, how long this process's own event loop stalled inside it, and the longest gap once this
process's own stalls are taken out (on a loaded machine the measuring process itself may not get the CPU).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from media import EncodedVideoTrack, SineTrack, encode_vp8_clip  # noqa: E402

from chorus.sfu import aiortc_adapter  # noqa: E402
from chorus.sfu.tasks import Tasks  # noqa: E402
from chorus.signaling.client import ChorusClient  # noqa: E402


async def main(url: str, room: str, publisher_token: str, watcher_token: str) -> None:
    aiortc_adapter.set_host_addresses(["127.0.0.1"])
    publisher, watcher = ChorusClient(url), ChorusClient(url)
    arrivals: list[float] = []
    lags: list[tuple[float, float]] = []
    video: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    watcher.on_track(lambda track, info: track.kind == "video" and not video.done() and video.set_result(track))

    async def collect(track: object) -> None:
        while True:
            await track.recv()  # type: ignore[attr-defined]
            arrivals.append(time.monotonic())

    async def ticker() -> None:
        while True:
            due = time.monotonic() + 0.02
            await asyncio.sleep(0.02)
            lags.append((due, time.monotonic() - due))

    tasks = Tasks("call watch")
    await publisher.connect()
    await publisher.join(room, "pub", token=publisher_token)
    await publisher.publish(SineTrack(440), EncodedVideoTrack(encode_vp8_clip(frames=60)))
    await watcher.connect()
    await watcher.join(room, "watcher", token=watcher_token)
    tasks.spawn(collect(await asyncio.wait_for(video, 15)))
    tasks.spawn(ticker())
    while len(arrivals) < 30:
        await asyncio.sleep(0.1)
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        start, end = float(line[1]), float(line[2])
        window = [start, *[t for t in arrivals if start <= t <= end], end]
        gaps = [(b - a, a) for a, b in zip(window, window[1:], strict=False)]

        def stall(at: float, gap: float) -> float:  # this process's own longest stall inside a gap
            return max((lag for due, lag in lags if at - 0.05 <= due <= at + gap), default=0.0)

        gap, at = max(gaps)
        print(json.dumps({
            "baseline_fps": sum(1 for t in arrivals if start - 5 <= t < start) / 5,
            "fps": (len(window) - 2) / (end - start), "worst_gap": gap, "gap_at": at, "own_stall": stall(at, gap),
            # the longest gap this process did not cause by being starved of CPU itself
            "worst_unexplained_gap": max(g - min(stall(a, g), g) for g, a in gaps),
        }), flush=True)
    await tasks.close()
    await publisher.close()
    await watcher.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
