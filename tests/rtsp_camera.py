"""
An IP camera for tests: Debian's ffmpeg encodes (testsrc2 + sine → H.264 + AAC) and pushes RTSP
(ANNOUNCE/RECORD, TCP interleaved) into :class:`RtspRelay`, which serves it to RTSP clients
(DESCRIBE/SETUP/PLAY, TCP interleaved) the way a camera's built-in server does (RFC 2326 §10, §10.12).

Debian has no RTSP server (ffmpeg 5.1 can only *receive* in listen mode; no mediamtx, live555 or
gst-rtsp-server binary), so this relay plays the camera's server role; it forwards interleaved frames verbatim
(RTP and RTCP), maps channels per track, and drops every player when the publisher goes away — a camera that
vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from ingest_util import FFMPEG


class RtspRelay:
    """One path (``/cam``), one publisher, any number of players; loopback only."""

    def __init__(self) -> None:
        self.port = 0
        self.sdp: bytes | None = None
        self.players: list[tuple[asyncio.StreamWriter, dict[int, int]]] = []
        self.publisher: asyncio.StreamWriter | None = None
        self.plays = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def drop_players(self) -> None:
        for writer, _ in self.players:
            writer.transport.abort()
        self.players.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        channels: dict[int, int] = {}  # this player's track index → interleaved RTP channel
        publishing = False
        try:
            while True:
                first = await reader.readexactly(1)
                if first == b"$":  # interleaved frame from the publisher: $, channel, length, data
                    head = await reader.readexactly(3)
                    data = await reader.readexactly(int.from_bytes(head[1:3], "big"))
                    track, rtcp = divmod(head[0], 2)
                    for player, mapping in list(self.players):
                        if track in mapping:
                            channel = mapping[track] + rtcp
                            player.write(b"$" + bytes([channel]) + len(data).to_bytes(2, "big") + data)
                    continue
                request = first + await reader.readuntil(b"\r\n\r\n")
                lines = request.decode(errors="replace").split("\r\n")
                method, uri = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                cseq = headers.get("cseq", "0")
                reply = f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nSession: 4242\r\n"
                content = b""
                if method == "OPTIONS":
                    reply += "Public: OPTIONS, DESCRIBE, ANNOUNCE, SETUP, RECORD, PLAY, TEARDOWN, GET_PARAMETER\r\n"
                elif method == "ANNOUNCE":
                    self.sdp = body
                elif method == "DESCRIBE":
                    if self.sdp is None:
                        reply = f"RTSP/1.0 404 Not Found\r\nCSeq: {cseq}\r\n"
                    else:
                        reply += f"Content-Base: {self.url}/\r\nContent-Type: application/sdp\r\n"
                        content = self.sdp
                elif method == "SETUP":
                    transport = headers.get("transport", "")
                    match = re.search(r"streamid=(\d+)", uri)
                    track = int(match.group(1)) if match else 0
                    interleaved = re.search(r"interleaved=(\d+)", transport)
                    if "mode=record" not in transport.lower() and "mode=\"record\"" not in transport.lower():
                        channels[track] = int(interleaved.group(1)) if interleaved else 2 * track
                    reply += f"Transport: {transport}\r\n"
                elif method == "RECORD":
                    publishing = True
                    self.publisher = writer
                elif method == "PLAY":
                    self.players.append((writer, channels))
                    self.plays += 1
                elif method == "TEARDOWN":
                    writer.write((reply + "\r\n").encode())
                    break
                writer.write((reply + f"Content-Length: {len(content)}\r\n\r\n").encode() + content)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            self._connections.discard(writer)
            self.players = [(w, m) for w, m in self.players if w is not writer]
            if publishing:  # the camera's encoder is gone: so is its stream
                self.sdp = None
                self.publisher = None
                self.drop_players()
            writer.transport.abort()


async def start_camera(relay: RtspRelay, seconds: float = 60) -> asyncio.subprocess.Process:
    """Debian ffmpeg encoding a test pattern in real time and pushing it into the relay; waits until it records."""
    proc = await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "30",
        "-threads", "1", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "48000", "-ac", "2",
        "-f", "rtsp", "-rtsp_transport", "tcp", relay.url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(10):
        while relay.publisher is None:
            if proc.returncode is not None:
                raise RuntimeError("the camera's ffmpeg exited")
            await asyncio.sleep(0.05)
    return proc


async def stop_camera(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
