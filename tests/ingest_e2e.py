"""
Helpers for the end-to-end ingest tests: a Chorus process with auth, RTMP and SRT on, its admin API, Chromium
pages that only watch, ffmpeg publishers in real time, and an aiortc WHEP player.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from browser import INBOUND_STATS, PER_STREAM_FRAMES
from conftest import ServerProcess
from ingest_util import FFMPEG

from chorus.signaling import auth

SECRET = "ingest-e2e-secret-" + "z" * 32


class IngestServer:
    """A ``chorus serve`` with auth, RTMP and SRT; tokens and admin calls for the tests."""

    def __init__(self, proc: ServerProcess, rtmp_port: int, srt_port: int) -> None:
        self.proc = proc
        self.rtmp_port = rtmp_port
        self.srt_port = srt_port
        self.admin_token = auth.create_token(SECRET, identity="admin", admin=True)

    @property
    def http_url(self) -> str:
        return self.proc.http_url

    def token(self, room: str, identity: str, **kwargs: Any) -> str:
        return auth.create_token(SECRET, identity=identity, room=room, **kwargs)

    async def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, f"{self.http_url}/api{path}", json=body,
                headers={"Authorization": f"Bearer {self.admin_token}"}) as response:
            text = await response.text()
            try:
                import json
                return response.status, json.loads(text) if text else None
            except ValueError:
                return response.status, text

    async def create(self, kind: str, room: str, name: str, url: str | None = None) -> dict[str, Any]:
        body = {"kind": kind, "room": room, "name": name, **({"url": url} if url else {})}
        status, data = await self.admin("POST", "/ingress", body)
        assert status == 201, data
        return dict(data)

    async def ingress(self, ingress_id: str) -> dict[str, Any]:
        status, data = await self.admin("GET", f"/ingress/{ingress_id}")
        assert status == 200, data
        return dict(data)

    async def until(self, ingress_id: str, condition: Callable[[dict[str, Any]], bool], timeout: float,
                    interval: float = 0.1) -> tuple[dict[str, Any], float]:
        """Poll an ingress until ``condition``; (its description, seconds it took)."""
        started = time.monotonic()
        while True:
            data = await self.ingress(ingress_id)
            if condition(data):
                return data, time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"ingress {ingress_id} not as expected within {timeout} s: {data}")
            await asyncio.sleep(interval)

    async def refused(self) -> list[dict[str, Any]]:
        status, data = await self.admin("GET", "/ingress")
        assert status == 200
        return list(data["refused"])


def lavfi_args(seconds: float, *, size: str = "320x240") -> list[str]:
    """A test pattern and a tone, read in real time (``-re`` applies to each input)."""
    return ["-re", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30", "-re", "-f", "lavfi", "-i",
            "sine=frequency=440:sample_rate=48000", "-t", str(seconds)]


def x264_args(*extra: str) -> list[str]:
    """libx264 at its default profile (High) and B-frames unless ``extra`` says otherwise; AAC stereo."""
    return ["-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-threads", "1", *extra, "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "64k", "-ar", "48000", "-ac", "2"]


async def push(*args: str) -> asyncio.subprocess.Process:
    """Start Debian ffmpeg (errors on stderr are discarded)."""
    return await asyncio.create_subprocess_exec(FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", *args,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


NO_CAMERA = """navigator.mediaDevices.getUserMedia = () =>
  Promise.reject(new DOMException('this page only watches', 'NotAllowedError'));"""


async def open_page(browser: Any, url: str, *, camera: bool = False) -> Any:
    context = await browser.new_context()
    if not camera:
        await context.add_init_script(NO_CAMERA)
    page = await context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    await page.goto(url)
    return page


async def track_frames(page: Any) -> dict[str, int]:
    """framesDecoded per remote video track of the room page (keyed by track id)."""
    return dict(await page.evaluate(PER_STREAM_FRAMES))


async def inbound(page: Any) -> dict[str, int]:
    return dict(await page.evaluate(INBOUND_STATS))


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> float:
    """Seconds until ``check()`` is true. :raises AssertionError: not within ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def fps(page: Any, track_id: str, seconds: float = 3.0) -> float:
    """Frames decoded per second of one remote track over ``seconds``."""
    first = (await track_frames(page)).get(track_id, 0)
    await asyncio.sleep(seconds)
    return ((await track_frames(page)).get(track_id, 0) - first) / seconds


def server_children(pid: int) -> list[str]:
    """Command lines of the processes whose parent is ``pid`` (the re-encode workers of a server)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return out


class WhepPlayer:
    """An aiortc WHEP player: a receive-only offer POSTed to ``/whep/...``, the answer applied."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        self.tracks: dict[str, Any] = {}
        self.location: str | None = None
        self.headers: dict[str, Any] = {}
        self.pc.on("track", lambda track: self.tracks.__setitem__(track.kind, track))

    async def play(self, url: str, token: str | None) -> tuple[int, dict[str, Any] | str]:
        """POST the offer; (status, answer SDP or problem document)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        headers = {"Content-Type": "application/sdp", **({"Authorization": f"Bearer {token}"} if token else {})}
        async with aiohttp.ClientSession() as http, http.post(url, data=self.pc.localDescription.sdp,
                                                                  headers=headers) as response:
            self.headers = {k: response.headers.getall(k) for k in set(response.headers.keys())}
            if response.status != 201:
                return response.status, await response.json(content_type=None)
            answer = await response.text()
            self.location = str(response.url.join(aiohttp.client.URL(response.headers["Location"])))
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        return 201, answer

    async def stop(self, token: str | None) -> int:
        status = 0
        if self.location is not None:
            async with aiohttp.ClientSession() as http, http.delete(
                    self.location, headers={"Authorization": f"Bearer {token}"} if token else {}) as response:
                status = response.status
        await self.pc.close()
        return status
