"""Helpers for the ingest tests: a sink that records, Debian ffmpeg as the encoder, and a raw RTMP client."""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import av
import pytest

from chorus.ingest import amf0, h264
from chorus.ingest.media import (
    AudioConfig,
    AudioFrame,
    EndReason,
    MediaItem,
    Metadata,
    VideoAccessUnit,
    VideoConfig,
)

FFMPEG = "/usr/bin/ffmpeg"

needs_ffmpeg = pytest.mark.skipif(not os.path.exists(FFMPEG), reason="Debian ffmpeg is not installed (make test does)")


@dataclass
class Collector:
    """A :class:`MediaSink` that keeps everything and lets a test wait for conditions."""

    items: list[MediaItem] = field(default_factory=list)
    reason: EndReason | None = None
    ended_count: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def media(self, item: MediaItem) -> None:
        assert self.reason is None, "media after ended"
        self.items.append(item)
        self.changed.set()

    def ended(self, reason: EndReason) -> None:
        self.ended_count += 1
        self.reason = reason
        self.changed.set()

    @property
    def video(self) -> list[VideoAccessUnit]:
        return [i for i in self.items if isinstance(i, VideoAccessUnit)]

    @property
    def audio(self) -> list[AudioFrame]:
        return [i for i in self.items if isinstance(i, AudioFrame)]

    @property
    def video_configs(self) -> list[VideoConfig]:
        return [i for i in self.items if isinstance(i, VideoConfig)]

    @property
    def audio_configs(self) -> list[AudioConfig]:
        return [i for i in self.items if isinstance(i, AudioConfig)]

    @property
    def metadata(self) -> list[Metadata]:
        return [i for i in self.items if isinstance(i, Metadata)]

    async def wait(self, condition: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


def ffmpeg_source_args(seconds: float, *, size: str = "320x240", rate: int = 30) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-f", "lavfi", "-i",
            "sine=frequency=440:sample_rate=48000", "-t", str(seconds)]


def ffmpeg_encode_args(*, baseline: bool = False) -> list[str]:
    """libx264 with its default profile and B-frames (veryfast keeps them; ultrafast would not), or baseline."""
    video = ["-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-threads", "1"]
    if baseline:
        video += ["-profile:v", "baseline", "-bf", "0"]
    return [*video, "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-ar", "48000", "-ac", "2"]


async def run_ffmpeg(*args: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run Debian ffmpeg to completion; (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "warning", *args,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, err.decode(errors="replace")


async def start_ffmpeg(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "warning", *args,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def decodable_frames(config: VideoConfig, units: list[VideoAccessUnit]) -> int:
    """How many pictures PyAV decodes from these units (parameter sets sent first, as a packetizer would)."""
    decoder = av.CodecContext.create("h264", "r")
    frames = 0
    head = h264.join_annexb([*config.sps, *config.pps])
    for i, unit in enumerate(units):
        data = h264.join_annexb(unit.nalus)
        frames += len(decoder.decode(av.Packet((head if i == 0 else b"") + data)))
    frames += len(decoder.decode(None))
    return frames


def have_srt_library() -> bool:
    try:
        ctypes.CDLL("libsrt-gnutls.so.1.5")
    except OSError:
        return False
    return True


class RawRtmpClient:
    """
    A deliberately small RTMP publisher for the cases ffmpeg will not produce: chosen chunk formats, extended
    timestamps, cuts in the middle of a message, silence. Reads replies with format-0/3 chunks only (what
    Chorus sends).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.in_chunk = 128
        self.out_chunk = 128
        self.txn = 0

    @classmethod
    async def connect(cls, port: int) -> RawRtmpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def handshake(self) -> None:
        c1 = struct.pack("!II", int(time.monotonic()) & 0xFFFFFFFF, 0) + os.urandom(1528)
        self.writer.write(b"\x03" + c1)
        s0 = await self.reader.readexactly(1)
        assert s0 == b"\x03"
        s1 = await self.reader.readexactly(1536)
        s2 = await self.reader.readexactly(1536)
        assert s2 == c1
        self.writer.write(s1)

    def chunk(self, fmt: int, csid: int, *, timestamp: int = 0, type_id: int = 0, stream_id: int = 0,
              length: int = 0, payload: bytes = b"", extended: bool = False) -> bytes:
        out = bytes([(fmt << 6) | csid])
        field_ts = 0xFFFFFF if extended else timestamp
        if fmt == 0:
            out += field_ts.to_bytes(3, "big") + length.to_bytes(3, "big") + bytes([type_id])
            out += stream_id.to_bytes(4, "little")
        elif fmt == 1:
            out += field_ts.to_bytes(3, "big") + length.to_bytes(3, "big") + bytes([type_id])
        elif fmt == 2:
            out += field_ts.to_bytes(3, "big")
        if extended:
            out += timestamp.to_bytes(4, "big")
        return out + payload

    def message(self, csid: int, type_id: int, stream_id: int, body: bytes, timestamp: int = 0) -> None:
        extended = timestamp >= 0xFFFFFF
        out = self.chunk(0, csid, timestamp=timestamp, type_id=type_id, stream_id=stream_id, length=len(body),
                         payload=body[: self.out_chunk], extended=extended)
        for i in range(self.out_chunk, len(body), self.out_chunk):
            out += self.chunk(3, csid, timestamp=timestamp, payload=body[i: i + self.out_chunk], extended=extended)
        self.writer.write(out)

    def command(self, name: str, *args: Any, stream_id: int = 0) -> int:
        self.txn += 1
        self.message(3 if stream_id == 0 else 8, 20, stream_id, amf0.encode(name, self.txn, *args))
        return self.txn

    async def read_message(self) -> tuple[int, int, bytes]:
        """(type id, stream id, body) of the next message from the server."""
        first = (await self.reader.readexactly(1))[0]
        assert first >> 6 == 0, "Chorus starts every message with a type 0 header"
        header = await self.reader.readexactly(11)
        length, type_id = int.from_bytes(header[3:6], "big"), header[6]
        stream_id = int.from_bytes(header[7:11], "little")
        body = b""
        while True:
            body += await self.reader.readexactly(min(self.in_chunk, length - len(body)))
            if len(body) >= length:
                break
            assert (await self.reader.readexactly(1))[0] >> 6 == 3
        if type_id == 1:
            self.in_chunk = int.from_bytes(body[:4], "big")
        return type_id, stream_id, body

    async def until_command(self, name: str) -> list[Any]:
        while True:
            type_id, _, body = await self.read_message()
            if type_id == 20:
                values = amf0.decode(body)
                if values[0] == name or (name == "onStatus" and values[0] == "onStatus"):
                    return values

    async def publish(self, app: str, key: str) -> list[Any]:
        """connect, createStream, publish; the onStatus reply."""
        await self.handshake()
        self.command("connect", {"app": app, "type": "nonprivate", "tcUrl": f"rtmp://127.0.0.1/{app}"})
        result = await self.until_command("_result")
        assert result[3]["code"] == "NetConnection.Connect.Success"
        self.command("createStream", None)
        created = await self.until_command("_result")
        self.stream_id = int(created[3])
        self.command("publish", None, key, "live", stream_id=self.stream_id)
        return await self.until_command("onStatus")

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within ``timeout`` (the client closes its end either way)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
            return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        finally:
            self.close()

    def close(self) -> None:
        self.writer.transport.abort()
