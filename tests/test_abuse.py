"""Attacks during a live call: a signaling flood, UDP garbage at the media ports, a keyframe storm."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import RTCRtpSender
from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket
from calls import Received, two_person_call
from conftest import ServerProcess, connect
from media import EncodedVideoTrack, count_frames, encode_vp8_clip

from chorus.sfu import aiortc_adapter
from chorus.signaling.client import ChorusClient

HERE = Path(__file__).resolve().parent


async def fps_while(video: Any, proc: asyncio.subprocess.Process, server: ServerProcess) -> tuple[float, float]:
    """Frames/s decoded while ``proc`` runs, and the slowest /healthz answer seen meanwhile."""
    frames = 0
    started = time.monotonic()
    slowest = 0.0

    async def health() -> None:
        nonlocal slowest
        async with aiohttp.ClientSession() as http:
            while proc.returncode is None:
                t0 = time.monotonic()
                async with http.get(f"{server.http_url}/healthz") as r:
                    assert r.status == 200
                slowest = max(slowest, time.monotonic() - t0)
                await asyncio.sleep(0.2)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(health())
        while proc.returncode is None:
            frames += await count_frames(video, 0.5)
        elapsed = time.monotonic() - started
    return frames / elapsed, slowest


def log_lines(server: ServerProcess) -> list[str]:
    return server.log().splitlines()


async def test_signaling_flood_hurts_no_one(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    _, _, video = await two_person_call(server, clients, room_name)
    baseline = await count_frames(video, 3.0) / 3.0
    lines_before = len(log_lines(server))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "abuse.py"), "signaling", server.ws_url, "10000", "50",
        stdout=asyncio.subprocess.PIPE)
    started = time.monotonic()
    fps, slowest_health = await fps_while(video, proc, server)
    out, _ = await proc.communicate()
    outcomes = json.loads(out)
    print(f"10000 messages in {time.monotonic() - started:.1f} s: {outcomes}; call {fps:.1f} fps "
          f"(baseline {baseline:.1f}); slowest /healthz {slowest_health * 1000:.0f} ms")

    assert sum(outcomes.values()) == 10000
    assert outcomes.get("internal_error", 0) == 0
    assert not any(k.startswith("unexpected") for k in outcomes), outcomes
    assert outcomes.get("limit_exceeded", 0) == 10000 // 16  # every oversized message, and only those
    assert fps >= 0.9 * baseline
    assert slowest_health < 1.0
    new_lines = log_lines(server)[lines_before:]
    assert not [line for line in new_lines if "Traceback" in line or "Exception in callback" in line]


def server_media_ports(client: ChorusClient) -> list[int]:
    ports = set()
    for pc in (client.subscribe_pc, client.publish_pc):
        if pc is not None and pc.remoteDescription is not None:
            ports.update(int(p) for p in re.findall(r"a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 (\d+)",
                                                     pc.remoteDescription.sdp))
    return sorted(ports)


async def test_udp_garbage_hurts_no_one(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    _, bob, video = await two_person_call(server, clients, room_name)
    ports = server_media_ports(bob)
    assert ports
    baseline = await count_frames(video, 3.0) / 3.0
    lines_before = len(log_lines(server))

    targets = ",".join(f"127.0.0.1:{p}" for p in ports)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "abuse.py"), "udp", targets, "100000", stdout=asyncio.subprocess.PIPE)
    fps, _ = await fps_while(video, proc, server)
    out, _ = await proc.communicate()
    result = json.loads(out)
    print(f"{result['sent']} garbage datagrams at {ports}: call {fps:.1f} fps (baseline {baseline:.1f})")
    assert result["sent"] == 100000
    assert fps >= 0.9 * baseline
    assert await count_frames(video, 1.0) >= 0.9 * baseline * 1.0 - 1  # still flowing afterwards
    new_lines = log_lines(server)[lines_before:]
    assert len(new_lines) < 100, new_lines[:20]  # log volume stays bounded
    assert not [line for line in new_lines if "Traceback" in line or "Exception in callback" in line]


async def test_keyframe_storm_is_merged(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    """20 subscribers each sending 50 PLIs/s: the publisher gets at most 2 keyframe requests per second."""
    publisher = await connect(server, clients)
    await publisher.join(room_name, "pub")
    await publisher.publish(EncodedVideoTrack(encode_vp8_clip(frames=60)))
    sender: RTCRtpSender = publisher.publish_pc.getSenders()[0]  # type: ignore[union-attr]
    plis: list[float] = []
    original = aiortc_adapter.hook_sender_rtcp(sender, lambda p: None)  # type: ignore[arg-type, return-value]

    async def count_plis(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
            plis.append(time.monotonic())
        await original(packet)

    aiortc_adapter.hook_sender_rtcp(sender, count_plis)

    subscribers = []
    for i in range(20):
        sub = await connect(server, clients, decode=False)
        received = Received(sub)
        await sub.join(room_name, f"sub{i}")
        subscribers.append((sub, received))
    for _, received in subscribers:
        await received.wait(1, timeout=20)

    async def storm(sub: ChorusClient, seconds: float) -> int:
        receiver = sub.subscribe_pc.getReceivers()[0]  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while not receiver.getSynchronizationSources():
            assert time.monotonic() < deadline, "no media reached a subscriber"
            await asyncio.sleep(0.05)
        ssrc = receiver.getSynchronizationSources()[0].source
        sent = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await aiortc_adapter.send_pli(receiver, ssrc)
            sent += 1
            await asyncio.sleep(0.02)  # 50 per second
        return sent

    await asyncio.sleep(1.0)
    window_start = time.monotonic()
    sent = await asyncio.gather(*(storm(sub, 5.0) for sub, _ in subscribers))
    window = time.monotonic() - window_start
    in_window = [t for t in plis if window_start <= t <= window_start + window]
    rate = len(in_window) / window
    print(f"{sum(sent)} PLIs sent by 20 subscribers in {window:.1f} s -> publisher got {len(in_window)} "
          f"({rate:.2f}/s)")
    gaps = [b - a for a, b in zip(in_window, in_window[1:], strict=False)]
    print(f"smallest gap between keyframe requests: {min(gaps) * 1000:.0f} ms")
    assert sum(sent) >= 20 * 5 * 40  # the storm really happened (≥ 40/s each)
    assert len(in_window) >= 2
    # At most one request per 500 ms (a little timer jitter allowed): ≤ 2 per second.
    assert min(gaps) >= 0.45
    assert (len(in_window) - 1) / (in_window[-1] - in_window[0]) <= 2.0 / 0.9
