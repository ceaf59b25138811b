"""
An SRT ingest listener: a ctypes binding to Debian's libsrt (``libsrt-gnutls.so.1.5``; PyAV's FFmpeg has no
SRT) that accepts live-mode callers sending MPEG-TS, checks the key carried in ``streamid`` before the
connection exists, and demuxes H.264 + AAC with PyAV into the same :mod:`.media` objects as RTMP.

Keys: ``streamid`` is either the bare key, or SRT's access-control syntax (SRT ``docs/features/access-control.md``)
``#!::r=<key>,m=publish`` (other keys such as ``u``, ``s``, ``t`` are allowed and ignored; ``m`` other than
``publish`` is refused). The check runs in libsrt's own thread, inside ``srt_listen_callback``, so it must be a
fast synchronous function — :meth:`.keys.StreamKeys.check` is built for this. A refusal sets an access-control
reject reason (``SRT_REJX_*``, 1400s) that the caller sees, and no socket is ever handed to Chorus.

Threads: one *accept* thread per listener (``srt_epoll_wait`` with a short timeout, so that :meth:`close` is
prompt) and one *connection* thread per publisher, which reads SRT messages and runs the PyAV demuxer over them
(one hop: bytes never cross to the event loop). Media objects are handed to the loop with
``call_soon_threadsafe``; ``on_publish`` runs on the loop.

Connection lifecycle: *handshake* (callback: key, caps) → *accepted* (``on_publish`` gives a sink) → *streaming*
→ *closed* (sink ``ended`` once: ``disconnected`` when the caller leaves, ``timeout`` after
:attr:`SrtLimits.idle_timeout` without data, ``stopped`` by :meth:`SrtServer.close`, or a typed error).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import av

from chorus.sfu.logs import PeerLogger

from .demux import run_demux
from .errors import (
    IngestError,
    IngestTimeoutError,
    LimitError,
    ProtocolError,
    SourceError,
    UnauthorizedError,
)
from .media import EndReason, MediaItem, MediaSink, OnPublish, PublishSession, RefusedConnection

logger = logging.getLogger("chorus.ingest.srt")

LIBRARY = "libsrt-gnutls.so.1.5"

# srt/srt.h (1.5.1): socket options, transport type, states, errors; srt/access_control.h: reject reasons
SRTO_RCVSYN, SRTO_RCVTIMEO, SRTO_RCVLATENCY, SRTO_STREAMID = 2, 14, 43, 46
SRTO_TRANSTYPE, SRTO_PEERIDLETIMEO = 50, 55
SRTT_LIVE = 0
SRT_EPOLL_IN, SRT_EPOLL_ERR = 0x1, 0x8
SRT_EASYNCRCV, SRT_ETIMEOUT = 6002, 6003
SRT_REJX_BAD_REQUEST, SRT_REJX_FORBIDDEN, SRT_REJX_OVERLOAD, SRT_REJX_BAD_MODE = 1400, 1403, 1402, 1405
SRT_LIVE_MAX_PLSIZE = 1456
_LOG_CRIT = 2

SyncAuthorize = Callable[[str, tuple[str, int]], Any]
"""``authorize(key, remote) -> grant``, called in libsrt's thread: must be quick, thread-safe and not block on the
event loop (use :meth:`.keys.StreamKeys.check`). ``None``/``False`` refuses."""

_LISTEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_char_p)


class _Lib:
    """The few libsrt functions used, with their C signatures (srt/srt.h)."""

    _instance: _Lib | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBRARY)
        except OSError as e:
            raise SourceError(f"{LIBRARY} is not installed (apt-get install libsrt1.5-gnutls): {e}") from None
        c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "srt_startup": (c_int, []),
            "srt_create_socket": (c_int, []),
            "srt_setsockflag": (c_int, [c_int, c_int, c_void_p, c_int]),
            "srt_bind": (c_int, [c_int, c_void_p, c_int]),
            "srt_listen": (c_int, [c_int, c_int]),
            "srt_listen_callback": (c_int, [c_int, _LISTEN_CALLBACK, c_void_p]),
            "srt_accept": (c_int, [c_int, c_void_p, ctypes.POINTER(c_int)]),
            "srt_recvmsg": (c_int, [c_int, ctypes.c_char_p, c_int]),
            "srt_close": (c_int, [c_int]),
            "srt_getlasterror": (c_int, [ctypes.POINTER(c_int)]),
            "srt_getlasterror_str": (ctypes.c_char_p, []),
            "srt_setrejectreason": (c_int, [c_int, c_int]),
            "srt_epoll_create": (c_int, []),
            "srt_epoll_add_usock": (c_int, [c_int, c_int, ctypes.POINTER(c_int)]),
            "srt_epoll_release": (c_int, [c_int]),
            "srt_epoll_wait": (c_int, [c_int, ctypes.POINTER(c_int), ctypes.POINTER(c_int), c_void_p, c_void_p,
                                       ctypes.c_int64, c_void_p, c_void_p, c_void_p, c_void_p]),
            "srt_setloglevel": (None, [c_int]),
        }
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
        self.lib = lib
        if lib.srt_startup() < 0:
            raise SourceError(f"srt_startup failed: {self.error()}")
        lib.srt_setloglevel(_LOG_CRIT)  # libsrt logs every rejected handshake to stderr at LOG_ERR

    @classmethod
    def get(cls) -> _Lib:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def error(self) -> str:
        return (self.lib.srt_getlasterror_str() or b"").decode(errors="replace")

    def error_code(self) -> int:
        return int(self.lib.srt_getlasterror(None))

    def set_int(self, sock: int, option: int, value: int) -> None:
        v = ctypes.c_int(value)
        if self.lib.srt_setsockflag(sock, option, ctypes.byref(v), ctypes.sizeof(v)) < 0:
            raise SourceError(f"srt_setsockflag({option}) failed: {self.error()}")


def _sockaddr_in(host: str, port: int) -> bytes:
    return struct.pack("<H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)


def _parse_sockaddr(pointer: int | None) -> tuple[str, int]:
    if not pointer:
        return ("", 0)
    family = ctypes.c_uint16.from_address(pointer).value
    if family == socket.AF_INET:
        raw = ctypes.string_at(pointer, 16)
        return socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    if family == socket.AF_INET6:
        raw = ctypes.string_at(pointer, 28)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]
    return ("", 0)


def parse_streamid(streamid: str) -> tuple[str, str]:
    """
    (key, mode) of a ``streamid``: ``#!::r=KEY,m=publish`` (access-control syntax) or a bare ``KEY`` (mode
    ``publish``). A missing ``m`` means ``request`` in the SRT syntax, which Chorus takes as ``publish`` too
    (an ingest listener has nothing to play).

    :raises ProtocolError: malformed access-control syntax, or no resource.
    """
    if not streamid.startswith("#!::"):
        return streamid, "publish"
    fields: dict[str, str] = {}
    for item in streamid[4:].split(","):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ProtocolError("streamid: expected key=value pairs after #!::")
        fields[name.strip()] = value
    if not fields.get("r"):
        raise ProtocolError("streamid: no r= resource (the stream key)")
    mode = fields.get("m", "publish")
    return fields["r"], "publish" if mode == "request" and "m" not in fields else mode


@dataclass(frozen=True, slots=True)
class SrtLimits:
    max_connections: int = 32
    max_connections_per_address: int = 4
    #: receiver latency (ms), SRTO_RCVLATENCY: how long SRT waits for retransmissions
    latency_ms: int = 120
    #: seconds without data before a publisher is dropped (also SRT's peer-idle timeout)
    idle_timeout: float = 5.0
    #: seconds the demuxer may spend finding the streams
    probe_timeout: float = 10.0


class _Pending:
    """Grants decided in the listen callback, picked up by the accept thread (keyed by the new socket id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.grants: dict[int, tuple[str, Any, str, float]] = {}  # socket → key, grant, address, when
        self.per_address: Counter[str] = Counter()
        self.active = 0


class SrtServer:
    """
    Listens for SRT callers (live mode, MPEG-TS payload) on ``host:port`` (UDP).

    :param authorize: the key check, run in libsrt's thread (see :data:`SyncAuthorize`).
    :param on_publish: gives the sink for an accepted publisher, run on the event loop.
    :param on_refused: told (on the event loop) about connections refused or failed before they had a sink.

    Lifecycle: *new* → *listening* (:meth:`start`) → *closed* (:meth:`close`: no new callers, every publisher
    ended with ``stopped``, every thread joined). ``close`` is idempotent.
    """

    def __init__(self, *, authorize: SyncAuthorize, on_publish: OnPublish, host: str = "127.0.0.1",
                 port: int = 9000, limits: SrtLimits | None = None,
                 on_refused: Callable[[RefusedConnection], None] | None = None) -> None:
        self.authorize = authorize
        self.on_publish = on_publish
        self.on_refused = on_refused
        self.host = host
        self.port = port
        self.limits = limits or SrtLimits()
        self.log = PeerLogger(logger, ingress="srt")
        self.lib_handle: _Lib | None = None
        self._listener = -1
        self._callback = _LISTEN_CALLBACK(self._on_handshake)  # referenced for as long as libsrt may call it
        self._pending = _Pending()
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self.by_socket: dict[int, _SrtConnection] = {}
        self.connections_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)

    @property
    def connections(self) -> int:
        with self.connections_lock:
            return len(self.by_socket)

    async def start(self) -> None:
        """Bind and listen. With ``port=0`` a free UDP port is picked first (libsrt cannot report one)."""
        self.loop = asyncio.get_running_loop()
        self.lib_handle = lib = await asyncio.to_thread(_Lib.get)
        if self.port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((self.host, 0))
                self.port = int(probe.getsockname()[1])
        sock = lib.lib.srt_create_socket()
        if sock < 0:
            raise SourceError(f"srt_create_socket failed: {lib.error()}")
        try:
            lib.set_int(sock, SRTO_TRANSTYPE, SRTT_LIVE)
            lib.set_int(sock, SRTO_RCVLATENCY, self.limits.latency_ms)
            lib.set_int(sock, SRTO_PEERIDLETIMEO, int(self.limits.idle_timeout * 1000))
            lib.set_int(sock, SRTO_RCVSYN, 0)  # accept through epoll, never blocking
            address = _sockaddr_in(self.host, self.port)
            if lib.lib.srt_bind(sock, address, len(address)) < 0:
                raise SourceError(f"SRT cannot bind {self.host}:{self.port}: {lib.error()}")
            if lib.lib.srt_listen_callback(sock, self._callback, None) < 0:
                raise SourceError(f"srt_listen_callback failed: {lib.error()}")
            if lib.lib.srt_listen(sock, 16) < 0:
                raise SourceError(f"srt_listen failed: {lib.error()}")
        except BaseException:
            lib.lib.srt_close(sock)
            raise
        self._listener = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"srt accept :{self.port}", daemon=True)
        self._accept_thread.start()
        self.log.info("srt listening", host=self.host, port=self.port, latency_ms=self.limits.latency_ms)

    async def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._accept_thread is not None:
            await asyncio.to_thread(self._accept_thread.join)
        with self.connections_lock:
            connections = list(self.by_socket.values())
        for connection in connections:
            connection.stop()
        for connection in connections:
            await asyncio.to_thread(connection.thread.join)
        if self.lib_handle is not None and self._listener >= 0:
            self.lib_handle.lib.srt_close(self._listener)
            self._listener = -1

    def stop(self, connection_id: str) -> bool:
        """End one publisher (its sink gets ``ended("stopped")`` within the receive timeout); whether it was here."""
        with self.connections_lock:
            found = [c for c in self.by_socket.values() if c.id == connection_id]
        for connection in found:
            connection.stop()
        return bool(found)

    # --- libsrt's thread ------------------------------------------------------------------------------------------

    def _on_handshake(self, _opaque: Any, ns: int, _version: int, peer: int | None, streamid: bytes | None) -> int:
        """``srt_listen_callback``: 0 accepts the caller, -1 refuses it (with a reason set on ``ns``)."""
        assert self.lib_handle is not None
        remote = _parse_sockaddr(peer)
        raw = (streamid or b"").decode(errors="replace")
        error: IngestError
        reason = SRT_REJX_FORBIDDEN
        key = ""
        try:
            key, mode = parse_streamid(raw)
            if mode != "publish":
                reason = SRT_REJX_BAD_MODE
                raise UnauthorizedError(f"streamid mode {mode!r}: this listener only takes publishers")
            with self._pending.lock:
                if self._stop.is_set():
                    raise LimitError("the listener is closing")
                if self._pending.active + len(self._pending.grants) >= self.limits.max_connections:
                    reason = SRT_REJX_OVERLOAD
                    raise LimitError(f"more than {self.limits.max_connections} SRT connections")
                if self._pending.per_address[remote[0]] >= self.limits.max_connections_per_address:
                    reason = SRT_REJX_OVERLOAD
                    raise LimitError(f"more than {self.limits.max_connections_per_address} SRT connections "
                                     f"from {remote[0]}")
            grant = self.authorize(key, remote)
            if grant is None or grant is False:
                raise UnauthorizedError("unknown or revoked stream key")
            with self._pending.lock:
                self._pending.grants[ns] = (key, grant, remote[0], time.monotonic())
                self._pending.per_address[remote[0]] += 1
            return 0
        except ProtocolError as e:
            reason, error = SRT_REJX_BAD_REQUEST, e
        except IngestError as e:
            error = e
        except Exception as e:  # the authorize callback failed: refuse, and say so
            error = IngestError(f"authorize failed: {e!r}")
            self.log.error("srt authorize failed", exc_info=True)
        self.lib_handle.lib.srt_setrejectreason(ns, reason)
        self.log.warning("srt caller refused", remote=f"{remote[0]}:{remote[1]}", error=error.code,
                         detail=error.reason)
        self.refused(RefusedConnection(remote, "", key, error))
        return -1

    def _accept_loop(self) -> None:
        assert self.lib_handle is not None
        lib = self.lib_handle.lib
        eid = lib.srt_epoll_create()
        events = ctypes.c_int(SRT_EPOLL_IN | SRT_EPOLL_ERR)
        lib.srt_epoll_add_usock(eid, self._listener, ctypes.byref(events))
        ready = (ctypes.c_int * 4)()
        try:
            while not self._stop.is_set():
                count = ctypes.c_int(len(ready))
                self._expire_grants()
                if lib.srt_epoll_wait(eid, ready, ctypes.byref(count), None, None, 200, None, None, None, None) <= 0:
                    continue
                address = ctypes.create_string_buffer(128)
                size = ctypes.c_int(len(address))
                sock = lib.srt_accept(self._listener, address, ctypes.byref(size))
                if sock < 0:
                    continue
                self._accepted(sock, _parse_sockaddr(ctypes.addressof(address)))
        finally:
            lib.srt_epoll_release(eid)

    def _expire_grants(self) -> None:
        """Forget grants whose handshake never completed (the caller vanished between callback and accept)."""
        limit = time.monotonic() - 10.0
        with self._pending.lock:
            for sock, (_, _, address, when) in list(self._pending.grants.items()):
                if when < limit:
                    del self._pending.grants[sock]
                    self._pending.per_address[address] -= 1
                    if self._pending.per_address[address] <= 0:
                        del self._pending.per_address[address]

    def _accepted(self, sock: int, remote: tuple[str, int]) -> None:
        assert self.lib_handle is not None
        with self._pending.lock:
            pending = self._pending.grants.pop(sock, None)
            if pending is not None:
                self._pending.active += 1
        if pending is None:  # the callback's grant expired, or it was bypassed: nothing was counted
            self.lib_handle.lib.srt_close(sock)
            return
        key, grant, _, _ = pending
        if self._stop.is_set():
            self.lib_handle.lib.srt_close(sock)
            self.release(remote[0])
            return
        connection = _SrtConnection(self, sock, remote, key, grant, f"srt-{next(self._ids)}")
        with self.connections_lock:
            self.by_socket[sock] = connection
        connection.thread.start()

    def release(self, address: str) -> None:
        with self._pending.lock:
            self._pending.active -= 1
            self._pending.per_address[address] -= 1
            if self._pending.per_address[address] <= 0:
                del self._pending.per_address[address]

    def refused(self, refused: RefusedConnection) -> None:
        if self.on_refused is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.on_refused, refused)


class _SrtReader:
    """A read-only file object over one SRT socket, for PyAV: one SRT message per read, ``b""`` at the end."""

    def __init__(self, connection: _SrtConnection) -> None:
        self.connection = connection
        self.buffer = ctypes.create_string_buffer(SRT_LIVE_MAX_PLSIZE + 44)
        self.error: IngestError | None = None
        self.bytes = 0
        self.eof = False  # sticky: after the end, every read returns b"" at once

    def read(self, size: int = -1) -> bytes:
        connection = self.connection
        lib = connection.server.lib_handle
        assert lib is not None
        idle_since = time.monotonic()
        while not self.eof and not connection.stopping.is_set():
            n = lib.lib.srt_recvmsg(connection.sock, self.buffer, len(self.buffer))
            if n > 0:
                self.bytes += n
                return self.buffer.raw[:n]
            if n < 0 and lib.error_code() in (SRT_EASYNCRCV, SRT_ETIMEOUT):
                if time.monotonic() - idle_since > connection.server.limits.idle_timeout:
                    self.error = IngestTimeoutError("publisher silent")
                    self.eof = True
                continue
            self.eof = True  # connection lost or closed by the caller
        return b""

    def readable(self) -> bool:
        return True


class _SrtConnection:
    """One accepted publisher: its socket, its thread, and the way back to the event loop."""

    def __init__(self, server: SrtServer, sock: int, remote: tuple[str, int], key: str, grant: Any,
                 connection_id: str) -> None:
        self.server = server
        self.sock = sock
        self.remote = remote
        self.key = key
        self.grant = grant
        self.id = connection_id
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"srt {connection_id}", daemon=True)
        self.log = server.log.bind(connection=connection_id, remote=f"{remote[0]}:{remote[1]}",
                                   stream=key[:4] + "…" if len(key) > 6 else "…")

    def stop(self) -> None:
        """From any thread: end the stream (the reader returns within its receive timeout)."""
        self.stopping.set()

    def _run(self) -> None:
        server = self.server
        assert server.lib_handle is not None and server.loop is not None
        loop = server.loop
        lib = server.lib_handle
        sink: MediaSink | None = None
        reason = EndReason("disconnected", "the caller left")
        reader = _SrtReader(self)
        try:
            lib.set_int(self.sock, SRTO_RCVSYN, 1)
            lib.set_int(self.sock, SRTO_RCVTIMEO, 250)
            session = PublishSession("srt", self.key, self.key, self.remote, self.grant, self.id)
            async def publish() -> MediaSink:
                return await server.on_publish(session)

            future = asyncio.run_coroutine_threadsafe(publish(), loop)
            try:
                sink = future.result(timeout=10)
            except FutureTimeout:
                future.cancel()
                raise IngestTimeoutError("on_publish took too long") from None
            self.log.info("srt publish started")
            deliver = _Deliver(loop, sink)
            try:
                with av.open(reader, mode="r", format="mpegts", timeout=server.limits.probe_timeout,
                             options={"analyzeduration": "2000000", "probesize": "2000000"}) as container:
                    run_demux(container, deliver, self.stopping.is_set)
            except av.FFmpegError as e:
                # the end of the connection surfaces as a demux error when it comes before the streams were found
                if not reader.eof and not self.stopping.is_set():
                    raise ProtocolError(f"MPEG-TS demux failed: {e}") from None
            if reader.error is not None:
                raise reader.error
            if self.stopping.is_set():
                reason = EndReason("stopped", "Chorus stopped the stream")
        except IngestError as e:
            reason = EndReason.from_error(e)
            self.log.info("srt connection failed", error=e.code, detail=e.reason)
        except Exception as e:
            reason = EndReason.from_error(IngestError(f"unexpected: {e!r}"))
            self.log.error("srt connection crashed", exc_info=True)
        finally:
            lib.lib.srt_close(self.sock)
            with server.connections_lock:
                server.by_socket.pop(self.sock, None)
            server.release(self.remote[0])
            self.log.info("srt publish ended", reason=reason.code, received_bytes=reader.bytes)
            if sink is not None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(_ended, sink, reason, self.log)
            elif reason.error is not None:
                server.refused(RefusedConnection(self.remote, "", self.key, reason.error))


class _Deliver:
    """Hands media objects from a worker thread to a sink on the event loop, in order."""

    __slots__ = ("loop", "sink")

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: MediaSink) -> None:
        self.loop = loop
        self.sink = sink

    def __call__(self, item: MediaItem) -> None:
        self.loop.call_soon_threadsafe(self.sink.media, item)


def _ended(sink: MediaSink, reason: EndReason, log: PeerLogger) -> None:
    try:
        sink.ended(reason)
    except Exception:
        log.error("sink.ended failed", exc_info=True)
