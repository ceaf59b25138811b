"""Two participants with room tokens, on the deployed server (run inside the server's network namespace by
test_deploy.py): one publishes, the other counts the frames it decodes. Prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calls import Received  # noqa: E402
from media import EncodedVideoTrack, SineTrack, count_frames, encode_vp8_clip  # noqa: E402

from chorus.sfu import aiortc_adapter  # noqa: E402
from chorus.signaling.client import ChorusClient  # noqa: E402


async def main(url: str, publisher_token: str, watcher_token: str, address: str) -> None:
    aiortc_adapter.set_host_addresses([address])
    publisher, watcher = ChorusClient(url), ChorusClient(url)
    try:
        await publisher.connect()
        joined = await publisher.join("demo", "alice", token=publisher_token)
        await publisher.publish(SineTrack(440), EncodedVideoTrack(encode_vp8_clip(frames=60)))
        await watcher.connect()
        received = Received(watcher)
        await watcher.join("demo", "bob", token=watcher_token)
        await received.wait(2, timeout=15)
        frames = await count_frames(received.tracks[(publisher.peer_id, "video")], 2.0)  # type: ignore[index]
        answer = publisher.publish_pc.remoteDescription.sdp  # type: ignore[union-attr]
        ports = sorted({int(p) for p in re.findall(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+)", answer)})
        print(json.dumps({"frames": frames, "media_ports": ports, "ice_servers": joined["ice_servers"]}), flush=True)
    finally:
        await publisher.close()
        await watcher.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
