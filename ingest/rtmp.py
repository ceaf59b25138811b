"""
An RTMP ingest server on asyncio: encoders (OBS, ffmpeg, hardware boxes) publish H.264 + AAC to
``rtmp://HOST:PORT/APP/KEY``; the key is checked at ``publish`` and the media comes out as :mod:`.media` objects.

Implements the publishing side of "Adobe RTMP Specification 1.0" (2012): the plain handshake (§5.2; no digest,
which neither ffmpeg nor librtmp-based OBS needs for ``rtmp://``), the chunk stream (§5.3: basic header forms,
message header formats 0–3, extended timestamps, also on format-3 chunks as ffmpeg and librtmp send them),
protocol control messages (§5.4: Set Chunk Size, Abort, Acknowledgement, Window Acknowledgement Size, Set Peer
Bandwidth), User Control (§6.2: Stream Begin, Ping), and the AMF0 commands of §7.2 a publisher sends
(``connect``, ``releaseStream``, ``FCPublish``, ``createStream``, ``publish``, ``FCUnpublish``,
``deleteStream``). Aggregate messages (§7.1.6) are unpacked. Media bodies are FLV tags (:mod:`.flv`).

A connection's life: *handshake* → *connected* (``connect`` answered) → *publishing* (key accepted, a sink
receives media) → *closed*. Before publishing, the whole exchange must finish within
:attr:`RtmpLimits.handshake_timeout`; while publishing, a silence longer than :attr:`RtmpLimits.idle_timeout` ends
it. Any :class:`.IngestError` closes that connection only; the sink, if there is one, gets
:meth:`.MediaSink.ended` exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

from . import amf0
from .errors import (
    IngestError,
    IngestTimeoutError,
    LimitError,
    ProtocolError,
    UnauthorizedError,
)
from .flv import FlvDepacketizer
from .media import EndReason, MediaSink, Metadata, OnPublish, PublishSession, RefusedConnection

logger = logging.getLogger("chorus.ingest.rtmp")

# Message type ids (§5.4, §6.2, §7.1)
SET_CHUNK_SIZE, ABORT, ACKNOWLEDGEMENT, USER_CONTROL, WINDOW_ACK_SIZE, SET_PEER_BANDWIDTH = 1, 2, 3, 4, 5, 6
AUDIO, VIDEO, DATA_AMF3, COMMAND_AMF3, DATA_AMF0, COMMAND_AMF0, AGGREGATE = 8, 9, 15, 17, 18, 20, 22
# User Control event types (§7.1.7)
STREAM_BEGIN, STREAM_EOF, PING_REQUEST, PING_RESPONSE = 0, 1, 6, 7

HANDSHAKE_SIZE = 1536
RTMP_VERSION = 3
DEFAULT_CHUNK_SIZE = 128
OUT_CHUNK_SIZE = 4096
WINDOW = 2_500_000
# chunk stream ids of what we send: protocol control (§5.4), commands, stream messages
_CS_CONTROL, _CS_COMMAND, _CS_STREAM = 2, 3, 5

Authorize = Callable[[str, str, tuple[str, int]], Awaitable[Any]]
"""``authorize(app, stream_name, remote) -> grant``: a grant (anything but ``None``/``False``) accepts the publish
and is handed on in :attr:`.PublishSession.grant`; ``None``/``False`` or an :class:`.IngestError` refuses it."""

@dataclass(frozen=True, slots=True)
class RtmpLimits:
    max_connections: int = 64
    max_connections_per_address: int = 4
    #: seconds from TCP accept until ``publish`` is accepted (handshake, ``connect``, key check)
    handshake_timeout: float = 10.0
    #: seconds of silence allowed while publishing
    idle_timeout: float = 15.0
    #: largest message accepted (the length field allows 16 MiB); a 1080p keyframe is well under 1 MiB
    max_message_size: int = 4 << 20
    #: bytes of incomplete messages held over all chunk streams of a connection
    max_buffered: int = 8 << 20
    max_chunk_streams: int = 16
    #: seconds the ``authorize`` callback may take
    authorize_timeout: float = 5.0


class RtmpServer:
    """
    Listens for RTMP publishers.

    :param authorize: checks the key at ``publish`` (see :data:`Authorize`).
    :param on_publish: gives the sink for an accepted publisher (see :data:`.media.OnPublish`).
    :param on_refused: told about every connection that ended without a sink (optional).

    Lifecycle: *new* → *listening* (:meth:`start`) → *closed* (:meth:`close` stops listening and ends every
    connection, sinks getting ``ended("stopped")``). ``close`` is idempotent.
    """

    def __init__(self, *, authorize: Authorize, on_publish: OnPublish, host: str = "127.0.0.1", port: int = 1935,
                 limits: RtmpLimits | None = None, on_refused: Callable[[RefusedConnection], None] | None = None
                 ) -> None:
        self.authorize = authorize
        self.on_publish = on_publish
        self.on_refused = on_refused
        self.host = host
        self.port = port
        self.limits = limits or RtmpLimits()
        self.log = PeerLogger(logger, ingress="rtmp")
        self._server: asyncio.Server | None = None
        self._tasks = Tasks("rtmp server")
        self._per_address: Counter[str] = Counter()
        self._connections: set[RtmpConnection] = set()
        self.publishing: set[tuple[str, str]] = set()
        self._ids = itertools.count(1)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Start listening; :attr:`port` is then the bound port (useful when constructed with 0)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.log.info("rtmp listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._tasks.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def stop(self, connection_id: str) -> bool:
        """End one connection (its sink gets ``ended("stopped")``); whether it was connected."""
        for connection in self._connections:
            if connection.id == connection_id and connection.task is not None:
                connection.task.cancel()
                return True
        return False

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        remote = (str(peer[0]), int(peer[1]))
        limits = self.limits
        error: IngestError | None = None
        if len(self._connections) >= limits.max_connections:
            error = LimitError(f"more than {limits.max_connections} RTMP connections")
        elif self._per_address[remote[0]] >= limits.max_connections_per_address:
            error = LimitError(f"more than {limits.max_connections_per_address} RTMP connections from {remote[0]}")
        if error is not None or self._tasks.closed:
            writer.transport.abort()
            if error is not None:
                self.log.warning("rtmp connection refused", remote=f"{remote[0]}:{remote[1]}", error=error.code)
                self.refused(RefusedConnection(remote, "", "", error))
            return
        connection = RtmpConnection(self, reader, writer, remote, next(self._ids))
        self._connections.add(connection)
        self._per_address[remote[0]] += 1
        connection.task = self._tasks.spawn(self._serve(connection), name=f"rtmp connection {connection.id}")

    async def _serve(self, connection: RtmpConnection) -> None:
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            self._per_address[connection.remote[0]] -= 1
            if self._per_address[connection.remote[0]] <= 0:
                del self._per_address[connection.remote[0]]

    def refused(self, refused: RefusedConnection) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(refused)
            except Exception:
                self.log.error("on_refused failed", exc_info=True)


class _ChunkStream:
    """Receive state of one chunk stream id (§5.3.1): the last header's fields and a message being assembled."""

    __slots__ = ("timestamp", "delta", "length", "type_id", "stream_id", "extended", "buffer")

    def __init__(self) -> None:
        self.timestamp = 0
        self.delta = 0
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.extended = False
        self.buffer: bytearray | None = None


class RtmpConnection:
    """One TCP connection to :class:`RtmpServer`; created and run by the server."""

    def __init__(self, server: RtmpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 remote: tuple[str, int], number: int) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.remote = remote
        self.id = f"rtmp-{number}"
        self.log = server.log.bind(connection=self.id, remote=f"{remote[0]}:{remote[1]}")
        self.app = ""
        self.stream_name = ""
        self.sink: MediaSink | None = None
        self.session: PublishSession | None = None
        self.task: asyncio.Task[None] | None = None
        self._publish_stream_id = 0
        self._streams: dict[int, _ChunkStream] = {}
        self._buffered = 0
        self._in_chunk_size = DEFAULT_CHUNK_SIZE
        self._received = 0
        self._acked = 0
        self._ack_window = WINDOW
        self._next_stream_id = 1
        self._depacketizer = FlvDepacketizer()
        self._deadline: asyncio.Timeout | None = None
        self._key: tuple[str, str] | None = None
        self._ended = False

    # --- lifecycle ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        reason: EndReason | None = None
        try:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout_at(loop.time() + self.server.limits.handshake_timeout) as deadline:
                    self._deadline = deadline
                    await self._handshake()
                    while await self._dispatch(*await self._read_message()):
                        pass
                reason = EndReason("unpublished", "the publisher deleted its stream")
            except TimeoutError:
                raise IngestTimeoutError("publisher silent" if self.sink else "handshake or publish took too long")\
                    from None
            except asyncio.IncompleteReadError as e:
                if e.partial or self._mid_message():
                    raise ProtocolError("connection closed in the middle of a message") from None
                reason = EndReason("disconnected", "the connection closed")
            except (ConnectionError, OSError) as e:
                reason = EndReason("disconnected", str(e) or type(e).__name__)
        except IngestError as e:
            reason = EndReason.from_error(e)
            self.log.info("rtmp connection failed", error=e.code, detail=e.reason)
        except asyncio.CancelledError:
            reason = EndReason("stopped", "Chorus stopped the stream")
            raise
        finally:
            self._finish(reason or EndReason("disconnected"))

    def _finish(self, reason: EndReason) -> None:
        if self._ended:
            return
        self._ended = True
        self.writer.transport.abort()
        if self._key is not None:
            self.server.publishing.discard(self._key)
        if self.sink is not None:
            self.log.info("rtmp publish ended", reason=reason.code)
            try:
                self.sink.ended(reason)
            except Exception:
                self.log.error("sink.ended failed", exc_info=True)
        elif reason.error is not None:
            self.server.refused(RefusedConnection(self.remote, self.app, self.stream_name, reason.error))

    def _mid_message(self) -> bool:
        return any(cs.buffer is not None for cs in self._streams.values())

    # --- reading --------------------------------------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self._received += n
        if self._received - self._acked >= self._ack_window:
            self._acked = self._received
            self._send(_CS_CONTROL, ACKNOWLEDGEMENT, 0, (self._received & 0xFFFFFFFF).to_bytes(4, "big"))
        return data

    async def _handshake(self) -> None:
        c0 = await self._read(1)
        if c0[0] != RTMP_VERSION:
            raise ProtocolError(f"not an RTMP handshake (version byte {c0[0]})")
        c1 = await self._read(HANDSHAKE_SIZE)
        uptime = int(time.monotonic() * 1000) & 0xFFFFFFFF
        s1 = uptime.to_bytes(4, "big") + bytes(4) + os.urandom(HANDSHAKE_SIZE - 8)
        # S2 echoes C1 (§5.2.4); librtmp compares it byte for byte with what it sent
        self.writer.write(bytes([RTMP_VERSION]) + s1 + c1)
        await self._read(HANDSHAKE_SIZE)  # C2: echo of S1, nothing to check for plain RTMP

    async def _read_message(self) -> tuple[int, int, int, bytes]:
        """The next complete message: (type id, message stream id, timestamp ms, body)."""
        limits = self.server.limits
        while True:
            first = (await self._read(1))[0]
            fmt, csid = first >> 6, first & 0x3F
            if csid == 0:
                csid = 64 + (await self._read(1))[0]
            elif csid == 1:
                extra = await self._read(2)
                csid = 64 + extra[0] + extra[1] * 256
            cs = self._streams.get(csid)
            if cs is None:
                if fmt != 0:
                    raise ProtocolError(f"chunk stream {csid} starts without a type 0 header")
                if len(self._streams) >= limits.max_chunk_streams:
                    raise LimitError(f"more than {limits.max_chunk_streams} chunk streams")
                cs = self._streams[csid] = _ChunkStream()
            if fmt < 3:
                if cs.buffer is not None:
                    raise ProtocolError(f"new message header on chunk stream {csid} before its message ended")
                header = await self._read((11, 7, 3)[fmt])
                stamp = int.from_bytes(header[0:3], "big")
                if fmt < 2:
                    cs.length = int.from_bytes(header[3:6], "big")
                    cs.type_id = header[6]
                    if fmt == 0:
                        cs.stream_id = int.from_bytes(header[7:11], "little")
                cs.extended = stamp == 0xFFFFFF
                if cs.extended:
                    stamp = int.from_bytes(await self._read(4), "big")
                cs.delta = stamp  # for a type 0 header, the delta of following type 3 chunks is its timestamp
                cs.timestamp = stamp if fmt == 0 else (cs.timestamp + stamp) & 0xFFFFFFFF
                cs.buffer = bytearray()
            else:
                if cs.extended:
                    ext = int.from_bytes(await self._read(4), "big")
                    if cs.buffer is None:
                        cs.delta = ext
                if cs.buffer is None:  # a new message with the previous header's fields
                    cs.timestamp = (cs.timestamp + cs.delta) & 0xFFFFFFFF
                    cs.buffer = bytearray()
            if cs.length > limits.max_message_size:
                raise LimitError(f"message of {cs.length} bytes exceeds {limits.max_message_size}")
            want = min(self._in_chunk_size, cs.length - len(cs.buffer))
            if self._buffered + want > limits.max_buffered:
                raise LimitError("too many bytes in incomplete messages")
            if want:
                cs.buffer += await self._read(want)
                self._buffered += want
            if len(cs.buffer) >= cs.length:
                body = bytes(cs.buffer)
                self._buffered -= len(body)
                cs.buffer = None
                return cs.type_id, cs.stream_id, cs.timestamp, body

    # --- writing --------------------------------------------------------------------------------------------------

    def _send(self, csid: int, type_id: int, stream_id: int, body: bytes, timestamp: int = 0) -> None:
        stamp = min(timestamp, 0xFFFFFF)
        ext = timestamp.to_bytes(4, "big") if stamp == 0xFFFFFF else b""
        out = bytearray([csid]) + stamp.to_bytes(3, "big") + len(body).to_bytes(3, "big") + bytes([type_id])
        out += stream_id.to_bytes(4, "little") + ext
        for offset in range(0, len(body), OUT_CHUNK_SIZE):
            if offset:
                out += bytes([0xC0 | csid]) + ext
            out += body[offset: offset + OUT_CHUNK_SIZE]
        self.writer.write(bytes(out))

    def _command(self, stream_id: int, *values: Any) -> None:
        self._send(_CS_COMMAND if stream_id == 0 else _CS_STREAM, COMMAND_AMF0, stream_id, amf0.encode(*values))

    def _on_status(self, stream_id: int, level: str, code: str, description: str) -> None:
        self._command(stream_id, "onStatus", 0, None, {"level": level, "code": code, "description": description})

    # --- dispatch -------------------------------------------------------------------------------------------------

    async def _dispatch(self, type_id: int, stream_id: int, timestamp: int, body: bytes) -> bool:
        """Handle one message; ``False`` when the publisher has said goodbye."""
        if type_id in (AUDIO, VIDEO, DATA_AMF0, DATA_AMF3, AGGREGATE):
            if self.sink is None or stream_id != self._publish_stream_id:
                raise ProtocolError("media before publish, or on a stream that is not publishing")
            assert self._deadline is not None
            self._deadline.reschedule(asyncio.get_running_loop().time() + self.server.limits.idle_timeout)
            if type_id == AGGREGATE:
                self._aggregate(timestamp, body)
            else:
                self._media(type_id, timestamp, body)
            return True
        if type_id == SET_CHUNK_SIZE:
            if len(body) < 4:
                raise ProtocolError("Set Chunk Size is truncated")
            size = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
            if not 1 <= size <= 1 << 24:
                raise ProtocolError(f"chunk size {size} out of range")
            self._in_chunk_size = size
        elif type_id == ABORT:
            if len(body) >= 4 and (cs := self._streams.get(int.from_bytes(body[:4], "big"))) and cs.buffer:
                self._buffered -= len(cs.buffer)
                cs.buffer = None
        elif type_id == WINDOW_ACK_SIZE:
            if len(body) >= 4:
                self._ack_window = max(int.from_bytes(body[:4], "big"), 4096)
        elif type_id == USER_CONTROL:
            if len(body) >= 6 and int.from_bytes(body[:2], "big") == PING_REQUEST:
                self._send(_CS_CONTROL, USER_CONTROL, 0, PING_RESPONSE.to_bytes(2, "big") + body[2:6])
        elif type_id in (COMMAND_AMF0, COMMAND_AMF3):
            if type_id == COMMAND_AMF3:
                body = body[1:]  # a format byte, then AMF0 (§7.1.1)
            return await self._on_command(stream_id, amf0.decode(body))
        # ACKNOWLEDGEMENT, SET_PEER_BANDWIDTH and unknown types carry nothing for a server receiving a publish
        return True

    def _media(self, type_id: int, timestamp: int, body: bytes) -> None:
        assert self.sink is not None
        if type_id == VIDEO:
            items = self._depacketizer.video(timestamp, body)
        elif type_id == AUDIO:
            items = self._depacketizer.audio(timestamp, body)
        else:
            values = amf0.decode(body[1:] if type_id == DATA_AMF3 else body)
            if values and values[0] == "@setDataFrame":
                values = values[1:]
            if len(values) >= 2 and values[0] == "onMetaData" and isinstance(values[1], dict):
                items = [Metadata(values[1])]
                self.log.info("rtmp metadata", **{k: values[1][k] for k in ("width", "height", "framerate",
                              "videocodecid", "audiocodecid", "encoder") if k in values[1]})
            else:
                items = []
        for item in items:
            self.sink.media(item)

    def _aggregate(self, timestamp: int, body: bytes) -> None:
        """Unpack an aggregate message: FLV tags (11-byte header, body, 4-byte back pointer), §7.1.6."""
        i, base = 0, None
        while i < len(body):
            if i + 11 > len(body):
                raise ProtocolError("aggregate sub-message header is truncated")
            kind = body[i]
            size = int.from_bytes(body[i + 1: i + 4], "big")
            stamp = int.from_bytes(body[i + 4: i + 7], "big") | (body[i + 7] << 24)
            if i + 11 + size + 4 > len(body):
                raise ProtocolError("aggregate sub-message runs past the message")
            base = stamp if base is None else base
            if kind in (AUDIO, VIDEO, DATA_AMF0):
                self._media(kind, (timestamp + stamp - base) & 0xFFFFFFFF, body[i + 11: i + 11 + size])
            i += 11 + size + 4

    async def _on_command(self, stream_id: int, values: list[Any]) -> bool:
        if len(values) < 2 or not isinstance(values[0], str) or not isinstance(values[1], float | int):
            raise ProtocolError("command without a name and transaction id")
        name, txn, args = values[0], values[1], values[3:]
        self.log.debug("rtmp command", command=name, transaction=txn)
        if name == "connect":
            if self.app:
                raise ProtocolError("connect sent twice")
            command_object = values[2] if len(values) > 2 and isinstance(values[2], dict) else {}
            self.app = str(command_object.get("app") or "").strip("/")
            self.log = self.log.bind(app=self.app)
            self._send(_CS_CONTROL, WINDOW_ACK_SIZE, 0, WINDOW.to_bytes(4, "big"))
            self._send(_CS_CONTROL, SET_PEER_BANDWIDTH, 0, WINDOW.to_bytes(4, "big") + b"\x02")  # dynamic
            self._send(_CS_CONTROL, SET_CHUNK_SIZE, 0, OUT_CHUNK_SIZE.to_bytes(4, "big"))
            self._command(0, "_result", txn, {"fmsVer": "FMS/3,5,7,7009", "capabilities": 31, "mode": 1},
                          {"level": "status", "code": "NetConnection.Connect.Success",
                           "description": "Connection succeeded.", "objectEncoding": 0})
        elif name == "FCUnpublish":
            # no reply: the publisher closes right after deleteStream, and an unread reply in its socket turns
            # that close into a reset that can overtake the deleteStream still in flight
            pass
        elif name in ("releaseStream", "FCPublish", "getStreamLength", "_checkbw"):
            if txn:
                self._command(0, "_result", txn, None, amf0.UNDEFINED_VALUE)
        elif name == "createStream":
            if not self.app:
                raise ProtocolError("createStream before connect")
            if self._next_stream_id > 8:
                raise LimitError("more than 8 message streams")
            self._command(0, "_result", txn, None, self._next_stream_id)
            self._next_stream_id += 1
        elif name == "publish":
            await self._publish(stream_id, str(args[0]) if args and args[0] is not None else "")
        elif name in ("deleteStream", "closeStream"):
            deleted = int(args[0]) if args and isinstance(args[0], float | int) else stream_id
            if self.sink is not None and deleted == self._publish_stream_id:
                return False
        elif txn:
            self._command(0, "_error", txn, None, {"level": "error", "code": "NetConnection.Call.Failed",
                                                   "description": f"{name} is not supported"})
        return True

    async def _publish(self, stream_id: int, stream_name: str) -> None:
        if not self.app or not 0 < stream_id < self._next_stream_id:
            raise ProtocolError("publish before connect/createStream")
        if self.sink is not None:
            raise ProtocolError("publish sent twice")
        self.stream_name = stream_name
        self.log = self.log.bind(stream=_redact(stream_name))
        server = self.server
        key = (self.app, stream_name)
        try:
            if not stream_name:
                raise UnauthorizedError("empty stream name")
            if key in server.publishing:
                raise UnauthorizedError("this stream is already being published")
            try:
                async with asyncio.timeout(server.limits.authorize_timeout):
                    grant = await server.authorize(self.app, stream_name, self.remote)
            except TimeoutError:
                raise IngestTimeoutError("the key check took too long") from None
            if grant is None or grant is False:
                raise UnauthorizedError("unknown or revoked stream key")
            if key in server.publishing:  # published meanwhile by another connection
                raise UnauthorizedError("this stream is already being published")
            server.publishing.add(key)
            self._key = key
            session = PublishSession("rtmp", self.app, stream_name, self.remote, grant, self.id)
            self.sink = await server.on_publish(session)
            self.session = session
        except IngestError as e:
            code = "NetStream.Publish.BadName" if isinstance(e, UnauthorizedError) else "NetStream.Publish.Rejected"
            self.log.warning("rtmp publish refused", error=e.code, detail=e.reason)
            self._on_status(stream_id, "error", code, e.reason)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
            raise
        self._publish_stream_id = stream_id
        self._send(_CS_CONTROL, USER_CONTROL, 0, STREAM_BEGIN.to_bytes(2, "big") + stream_id.to_bytes(4, "big"))
        self._on_status(stream_id, "status", "NetStream.Publish.Start", f"{stream_name} is now published.")
        assert self._deadline is not None
        self._deadline.reschedule(asyncio.get_running_loop().time() + server.limits.idle_timeout)
        self.log.info("rtmp publish started")


def _redact(key: str) -> str:
    """A stream key as logs show it: enough to recognise, not enough to reuse."""
    return key[:4] + "…" if len(key) > 6 else "…"
