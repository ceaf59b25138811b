"""
Ingress management: the ingresses defined on this server (records with stream keys, kept in an
:class:`.store.IngressStore`), the listeners that accept them (RTMP, SRT), the URL pulls, and the state of each
one while it runs, for the admin API, webhooks and metrics.

An ingress is one way into one room as one participant: an RTMP or SRT publisher presenting its stream key, a
WHIP client presenting it as a Bearer token, or a URL Chorus pulls (an IP camera). While it is *publishing* its
media enters the room through a :class:`.bridge.StreamBridge` on an :class:`~chorus.sfu.external.ExternalPeer`
(WHIP: through an ordinary WebRTC peer, which signaling creates and reports here).

The manager never imports signaling: joining and leaving rooms go through :class:`RoomAccess`, which signaling
implements (room creation, cluster placement, limits), and events go up through ``on_event``
(``ingress_started``, ``ingress_ended``).

Lifecycle: *new* → *running* (:meth:`IngressManager.start`: records loaded, listeners listening, pulls started) →
*closed* (:meth:`IngressManager.close`: no new ingress starts, every running one ends with the reason given,
listeners stop). Per ingress: *idle* → *connecting* (key accepted, joining the room; for a pull: opening the URL)
→ *publishing* → *idle* again when the publisher leaves, with ``last_end`` (and ``last_error`` when it ended
abnormally); a pull goes *backoff* between attempts and *failed* when it gives up.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from chorus.sfu.external import ExternalPeer
from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

from .bridge import BridgeSettings, StreamBridge
from .errors import IngestError, LimitError, UnauthorizedError
from .keys import StreamKeys, key_digest
from .media import EndReason, MediaItem, MediaSink, PublishSession, RefusedConnection
from .pull import PullSettings, PullSource, resolve_source
from .rtmp import RtmpLimits, RtmpServer
from .srt import SrtLimits, SrtServer
from .store import KINDS, IngressRecord, IngressStore, MemoryStore

logger = logging.getLogger("chorus.ingest.manager")

#: Refused connections kept for the admin API.
REFUSED_KEPT = 50
#: Items a pull buffers while its participant joins the room.
PULL_PENDING_MAX = 2000


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """
    :param listen_host: where the RTMP and SRT listeners bind.
    :param public_host: the host put in the URLs handed out (what encoders reach).
    :param http_url: this server's HTTP base URL as clients reach it (WHIP URLs).
    :param rtmp_port, srt_port: 0 = that listener is off.
    :param max_live: ingresses publishing at once, all kinds together (WHIP included).
    :param max_records: ingresses defined at most.
    :param max_per_address: connections per client address on each listener.
    :param idle_timeout: seconds an RTMP/SRT publisher may be silent before it is dropped.
    :param node_id: this node in a cluster (``url`` ingresses are pulled by the node that created them).
    """

    listen_host: str = "127.0.0.1"
    public_host: str = "127.0.0.1"
    http_url: str = "http://127.0.0.1:8080"
    rtmp_port: int = 0
    srt_port: int = 0
    max_live: int = 16
    max_records: int = 1000
    max_per_address: int = 4
    idle_timeout: float = 5.0
    srt_latency_ms: int = 120
    media_root: Path | None = None
    bridge: BridgeSettings = field(default_factory=BridgeSettings)
    pull: PullSettings = field(default_factory=PullSettings)
    node_id: str = ""
    #: seconds between reloads of a shared store (keys created on other nodes)
    refresh_interval: float = 2.0


class RoomAccess(Protocol):
    """What the manager needs of the rooms (signaling implements it)."""

    async def join(self, room: str, name: str, member: IngressMember) -> ExternalPeer:
        """Add an external participant named ``name`` to ``room`` (created if needed).

        :raises IngestError: it cannot be added here (room full, hosted by another node, MCU room, draining)."""

    async def leave(self, room: str, peer_id: str, reason: str) -> None:
        """Remove it (others get ``peer_left``); nothing if it is already gone."""


class IngressMember:
    """
    What a room holds for an ingest participant (signaling's ``Member``) — an RTMP/SRT/pull stream, a WHIP
    session, and a WHEP viewer too: notifications are not for it, and being removed by the room (kicked, room
    closed) stops the stream or ends the session.
    """

    def __init__(self, on_removed: Callable[[str], None]) -> None:
        self._on_removed = on_removed

    def notify(self, method: str, data: dict[str, Any]) -> None:
        pass

    def removed(self, reason: str) -> None:
        self._on_removed(reason)


@dataclass(eq=False)
class LiveIngress:
    """One running ingress (a connection, a WHIP session, or one connection of a pull)."""

    record: IngressRecord
    protocol: str
    remote: tuple[str, int]
    stop: Callable[[], None]
    started_at: float = field(default_factory=time.time)
    peer: ExternalPeer | None = None
    peer_id: str | None = None
    bridge: StreamBridge | None = None
    #: WHIP: received bytes and track descriptions, read from the room
    whip_bytes: Callable[[], int] | None = None
    whip_describe: Callable[[], dict[str, Any]] | None = None
    stop_reason: EndReason | None = None
    ended: bool = False
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=8))

    def received_bytes(self) -> int:
        if self.bridge is not None:
            return self.bridge.received_bytes
        return self.whip_bytes() if self.whip_bytes is not None else 0

    def bitrate(self) -> int:
        if self.bridge is not None:
            return self.bridge.bitrate
        now, total = time.monotonic(), self.received_bytes()
        self.samples.append((now, total))
        old = next((s for s in self.samples if s[0] >= now - 5.0), self.samples[0])
        return int((total - old[1]) * 8 / (now - old[0])) if now - old[0] >= 0.5 else 0


@dataclass
class IngressState:
    """What the admin API shows of an ingress besides its definition."""

    state: str = "idle"
    since: float = field(default_factory=time.time)
    last_error: dict[str, Any] | None = None
    last_end: dict[str, Any] | None = None
    sessions: int = 0


class IngressManager:
    """
    The ingresses of this node. See the module docstring.

    :param on_event: ``on_event(name, data)`` for webhooks: ``ingress_started``, ``ingress_ended``.
    """

    def __init__(self, settings: IngestSettings, rooms: RoomAccess, *, store: IngressStore | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] = lambda event, data: None) -> None:
        self.settings = settings
        self.rooms = rooms
        self.store: IngressStore = store or MemoryStore()
        self.on_event = on_event
        self.keys = StreamKeys()
        self.records: dict[str, IngressRecord] = {}
        self.states: dict[str, IngressState] = {}
        self.live: dict[str, LiveIngress] = {}
        self.refused: deque[dict[str, Any]] = deque(maxlen=REFUSED_KEPT)
        #: (protocol, code) → refused connections; (kind, code) → ended sessions; kind → started sessions
        self.refused_counts: Counter[tuple[str, str]] = Counter()
        self.ended_counts: Counter[tuple[str, str]] = Counter()
        self.started_counts: Counter[str] = Counter()
        self.retired_bytes: Counter[str] = Counter()
        self.rtmp: RtmpServer | None = None
        self.srt: SrtServer | None = None
        self.draining = False
        self.close_reason = ""
        self.log = PeerLogger(logger)
        self._pulls: dict[str, _Pull] = {}
        self._closing: asyncio.Future[None] | None = None
        self.tasks = Tasks("ingress manager")
        self.cleanups = Tasks("ingress cleanups")

    # --- lifecycle -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records, start the listeners that are on, start the pulls of this node."""
        self._apply(await self.store.load())
        settings = self.settings
        if settings.rtmp_port:
            self.rtmp = RtmpServer(
                authorize=self.keys.authorize_rtmp, on_publish=self._on_publish, host=settings.listen_host,
                port=settings.rtmp_port, on_refused=lambda r: self._on_refused("rtmp", r),
                limits=RtmpLimits(max_connections=max(settings.max_live * 2, 8),
                                  max_connections_per_address=settings.max_per_address,
                                  idle_timeout=settings.idle_timeout))
            await self.rtmp.start()
        if settings.srt_port:
            self.srt = SrtServer(
                authorize=lambda key, remote: self.keys.check(key), on_publish=self._on_publish,
                host=settings.listen_host, port=settings.srt_port, on_refused=lambda r: self._on_refused("srt", r),
                limits=SrtLimits(max_connections=max(settings.max_live * 2, 8),
                                 max_connections_per_address=settings.max_per_address,
                                 latency_ms=settings.srt_latency_ms, idle_timeout=settings.idle_timeout))
            await self.srt.start()
        if self.store.shared:
            self.tasks.spawn(self._refresh(), name="ingress refresh")
        self._sync_pulls()

    async def close(self, reason: str = "server shutdown") -> None:
        """Stop: no new ingress starts, every running one ends with ``reason``, listeners close. Idempotent."""
        if self.draining and self.tasks.closed:
            return
        self.draining = True
        self.close_reason = reason
        for live in list(self.live.values()):
            self._stop(live, EndReason("stopped", reason))
        for pull in list(self._pulls.values()):
            await pull.stop()
        self._pulls.clear()
        if self.rtmp is not None:
            await self.rtmp.close()
        if self.srt is not None:
            await self.srt.close()
        await self.tasks.close()
        while len(self.cleanups):  # every participant leaves its room, every transcoder stops
            await asyncio.sleep(0.02)
        await self.cleanups.close()
        await self.store.close()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                self._apply(await self.store.load())
            except Exception as e:  # a store outage keeps the last known keys
                self.log.warning("ingress store unreachable", error=f"{type(e).__name__}: {e}")
                continue
            self._sync_pulls()

    def _apply(self, records: list[IngressRecord]) -> None:
        self.records = {r.id: r for r in records}
        self.keys.replace_digests({r.key_digest: r.id for r in records if r.key_digest})
        for record_id in list(self.states):
            if record_id not in self.records and record_id not in self.live:
                del self.states[record_id]
        for record_id in self.records:
            self.states.setdefault(record_id, IngressState())
        for record_id, live in list(self.live.items()):
            if record_id not in self.records:  # revoked on another node
                self._stop(live, EndReason("revoked", "the ingress was revoked"))

    # --- management (admin API, CLI) ---------------------------------------------------------------------------

    async def create(self, kind: str, room: str, name: str, url: str | None = None) -> dict[str, Any]:
        """
        Define an ingress. Returns its description plus what to give the encoder (the stream key appears only
        here: it is not stored).

        :raises ValueError: an unknown kind, a url for another kind or none for ``url``, an unacceptable URL.
        :raises LimitError: too many ingresses are defined.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if (kind == "url") != bool(url):
            raise ValueError("a url ingress needs --url, and only it takes one")
        if kind == "url":
            assert url is not None
            try:
                resolve_source(url, self.settings.pull.media_root)
            except IngestError as e:
                raise ValueError(e.reason) from None
        if len(self.records) >= self.settings.max_records:
            raise LimitError(f"at most {self.settings.max_records} ingresses may be defined")
        if self.draining:
            raise LimitError("this server is shutting down")
        key = "" if kind == "url" else "sk_" + secrets.token_urlsafe(24)
        record = IngressRecord(id="in_" + secrets.token_urlsafe(9), kind=kind, room=room, name=name,
                               created_at=round(time.time(), 3), key_digest=key_digest(key) if key else "",
                               url=url or "", node=self.settings.node_id if kind == "url" else "")
        await self.store.put(record)
        self.records[record.id] = record
        self.states[record.id] = IngressState()
        if key:
            self.keys.add(key, record.id)
        self.log.info("ingress created", ingress=record.id, kind=kind, room=room, name=name)
        self._sync_pulls()
        return {**self.describe(record.id), **self.access(record, key)}

    def access(self, record: IngressRecord, key: str) -> dict[str, Any]:
        """What an encoder is given for ``record`` (``key`` in clear: only known when it is created)."""
        host = self.settings.public_host
        if record.kind == "rtmp":
            base = f"rtmp://{host}:{self.settings.rtmp_port or 1935}/live"
            return {"url": base, "stream_key": key, "publish_url": f"{base}/{key}"}
        if record.kind == "srt":
            return {"url": f"srt://{host}:{self.settings.srt_port or 9000}?streamid={key}", "stream_key": key,
                    "publish_url": f"srt://{host}:{self.settings.srt_port or 9000}?streamid={key}"}
        if record.kind == "whip":
            url = f"{self.settings.http_url}/whip/{record.room}"
            return {"url": url, "bearer_token": key, "stream_key": key}
        return {"url": record.url}

    async def revoke(self, ingress_id: str) -> bool:
        """Delete an ingress: its key stops working, and if it is running it ends (reason ``revoked``)."""
        record = self.records.pop(ingress_id, None)
        deleted = await self.store.delete(ingress_id)
        if record is None and not deleted:
            return False
        self.keys.replace_digests({r.key_digest: r.id for r in self.records.values() if r.key_digest})
        live = self.live.get(ingress_id)
        if live is not None:
            self._stop(live, EndReason("revoked", "the ingress was revoked"))
        pull = self._pulls.pop(ingress_id, None)
        if pull is not None:
            await pull.stop()
        if ingress_id not in self.live:
            self.states.pop(ingress_id, None)
        self.log.info("ingress revoked", ingress=ingress_id)
        return True

    def describe(self, ingress_id: str) -> dict[str, Any]:
        """An ingress as the admin API shows it.

        :raises KeyError: no such ingress."""
        record = self.records[ingress_id]
        state = self.states.setdefault(ingress_id, IngressState())
        out: dict[str, Any] = {
            "id": record.id, "kind": record.kind, "room": record.room, "name": record.name,
            "created_at": record.created_at, "state": state.state, "since": round(state.since, 3),
            "sessions": state.sessions, "last_error": state.last_error, "last_end": state.last_end,
        }
        if record.kind == "url":
            out["url"] = record.url
            if record.node:
                out["node"] = record.node
        live = self.live.get(ingress_id)
        if live is not None:
            out.update(participant_id=live.peer_id, remote=f"{live.remote[0]}:{live.remote[1]}" if live.remote[0]
                       else None, started_at=round(live.started_at, 3), bitrate=live.bitrate(),
                       received_bytes=live.received_bytes())
            if live.bridge is not None:
                out["media"] = live.bridge.describe()
            elif live.whip_describe is not None:
                out["media"] = live.whip_describe()
        return out

    def list(self) -> list[dict[str, Any]]:
        ordered = sorted(self.records.values(), key=lambda r: r.created_at)
        return [self.describe(record.id) for record in ordered]

    def overview(self) -> dict[str, Any]:
        """Everything for ``GET /api/ingress``."""
        return {
            "ingresses": self.list(),
            "live": len(self.live),
            "max_live": self.settings.max_live,
            "draining": self.draining,
            "listeners": {"rtmp": self.rtmp.port if self.rtmp else None, "srt": self.srt.port if self.srt else None},
            "refused": list(self.refused),
        }

    # --- starting and ending sessions ----------------------------------------------------------------------------

    async def _on_publish(self, session: PublishSession) -> MediaSink:
        """The RTMP/SRT ``on_publish`` callback: the key was accepted; join the room."""
        record = self.records.get(str(session.grant))
        if record is None:
            raise UnauthorizedError("the ingress was revoked")
        if record.kind != session.protocol:
            raise UnauthorizedError(f"this stream key is for {record.kind}, not {session.protocol}")
        server: RtmpServer | SrtServer | None = self.rtmp if session.protocol == "rtmp" else self.srt
        connection_id = session.id

        def stop() -> None:
            if server is not None:
                server.stop(connection_id)

        live = self.reserve(record, session.protocol, session.remote, stop)
        try:
            return await self.start_bridge(live)
        except BaseException:
            self.release(live)
            raise

    def reserve(self, record: IngressRecord, protocol: str, remote: tuple[str, int],
                 stop: Callable[[], None]) -> LiveIngress:
        """Count a session in before anything is awaited (limits hold under concurrent publishers).

        :raises LimitError, UnauthorizedError: draining, at the limit, or this ingress is already running."""
        if self.draining:
            raise LimitError(f"this server is not taking new streams ({self.close_reason or 'draining'})")
        if record.id in self.live:
            raise UnauthorizedError("this ingress is already publishing")
        if len(self.live) >= self.settings.max_live:
            raise LimitError(f"this server takes at most {self.settings.max_live} streams at once")
        live = LiveIngress(record, protocol, remote, stop)
        self.live[record.id] = live
        self.set_state(record.id, "connecting")
        return live

    def release(self, live: LiveIngress) -> None:
        if self.live.get(live.record.id) is live:
            del self.live[live.record.id]
            self.set_state(live.record.id, "idle")

    async def start_bridge(self, live: LiveIngress) -> StreamBridge:
        record = live.record
        member = IngressMember(lambda reason: self._stop(live, EndReason("removed", reason)))
        peer = await self.rooms.join(record.room, record.name, member)
        try:
            bridge = StreamBridge(peer, settings=self.settings.bridge,
                                  log=PeerLogger(logger, room=record.room, peer=peer.id, ingress=record.id),
                                  on_ended=lambda reason: self._ended(live, reason),
                                  on_failed=lambda error: self._stop(live, EndReason.from_error(error)))
        except BaseException:
            self.cleanups.spawn(self.rooms.leave(record.room, peer.id, "failed"), name=f"leave {peer.id}")
            raise
        live.peer, live.peer_id, live.bridge = peer, peer.id, bridge
        self._started(live)
        return bridge

    def _started(self, live: LiveIngress) -> None:
        record = live.record
        state = self.set_state(record.id, "publishing")
        state.sessions += 1
        self.started_counts[record.kind] += 1
        self.log.info("ingress publishing", ingress=record.id, kind=record.kind, room=record.room,
                      peer=live.peer_id, remote=f"{live.remote[0]}:{live.remote[1]}")
        self.on_event("ingress_started", {"room": record.room, "ingress": self._event_data(live)})

    def _event_data(self, live: LiveIngress) -> dict[str, Any]:
        record = live.record
        return {"id": record.id, "kind": record.kind, "name": record.name, "participant_id": live.peer_id,
                "protocol": live.protocol}

    def _stop(self, live: LiveIngress, reason: EndReason) -> None:
        """End a running session with ``reason`` (what its end will report)."""
        if live.ended:
            return
        if live.stop_reason is None:
            live.stop_reason = reason
        self.log.info("ingress stopping", ingress=live.record.id, reason=reason.code, detail=reason.detail)
        live.stop()

    def _ended(self, live: LiveIngress, reason: EndReason) -> None:
        """A session is over (its sink's ``ended``, or the WHIP participant left): clean up, report."""
        if live.ended:
            return
        live.ended = True
        record = live.record
        reason = live.stop_reason or reason
        if self.live.get(record.id) is live:
            del self.live[record.id]
        self.retired_bytes[record.kind] += live.received_bytes()
        self.ended_counts[(record.kind, reason.code)] += 1
        now = time.time()
        end = {"code": reason.code, "reason": reason.detail, "at": round(now, 3)}
        abnormal = reason.error is not None or reason.code in ("disconnected", "failed")
        if record.id in self.states:
            state = self.set_state(record.id, "idle")
            state.last_end = end
            if abnormal:
                state.last_error = end
        self.log.info("ingress ended", ingress=record.id, kind=record.kind, reason=reason.code, detail=reason.detail)
        self.on_event("ingress_ended", {"room": record.room, "ingress": self._event_data(live),
                                        "reason": reason.code, "detail": reason.detail})
        self.cleanups.spawn(self._cleanup(live, reason), name=f"ingress cleanup {record.id}")

    async def _cleanup(self, live: LiveIngress, reason: EndReason) -> None:
        if live.bridge is not None:
            await live.bridge.close()
        if live.peer_id is not None and live.protocol != "whip":
            await self.rooms.leave(live.record.room, live.peer_id, f"ingress ended: {reason.code}")

    def set_state(self, record_id: str, state_name: str) -> IngressState:
        state = self.states.setdefault(record_id, IngressState())
        if state.state != state_name:
            state.state, state.since = state_name, time.time()
        return state

    def _on_refused(self, protocol: str, refused: RefusedConnection) -> None:
        """A connection ended before it had a sink: wrong key, garbage, limits."""
        record_id = self.keys.check(refused.stream_name.split("?", 1)[0]) if refused.stream_name else None
        self.refuse(protocol, refused.remote, refused.error, record_id)

    def refuse(self, protocol: str, remote: tuple[str, int], error: IngestError, record_id: str | None = None) -> None:
        """Record a refused attempt (also WHIP's, from signaling) for the admin API and metrics."""
        entry = {"protocol": protocol, "remote": f"{remote[0]}:{remote[1]}", "code": error.code,
                 "reason": error.reason, "at": round(time.time(), 3), "ingress": record_id}
        self.refused.append(entry)
        self.refused_counts[(protocol, error.code)] += 1
        if record_id is not None and record_id in self.states and record_id not in self.live:
            self.states[record_id].last_error = {k: entry[k] for k in ("code", "reason", "at")}

    # --- WHIP (signaling runs the WebRTC side) ---------------------------------------------------------------------

    def authorize_key(self, key: str, kind: str) -> IngressRecord | None:
        """The ingress whose stream key is ``key``, if it is of ``kind``."""
        record_id = self.keys.check(key)
        record = self.records.get(record_id) if record_id is not None else None
        return record if record is not None and record.kind == kind else None

    def whip_reserve(self, record: IngressRecord, remote: tuple[str, int], stop: Callable[[], None]) -> LiveIngress:
        """A WHIP client presented ``record``'s key: count the session in (before its peer is created).

        :raises LimitError, UnauthorizedError: as for RTMP/SRT."""
        return self.reserve(record, "whip", remote, stop)

    def whip_started(self, live: LiveIngress, peer_id: str, received_bytes: Callable[[], int],
                     describe: Callable[[], dict[str, Any]]) -> None:
        live.peer_id, live.whip_bytes, live.whip_describe = peer_id, received_bytes, describe
        self._started(live)

    def whip_failed(self, live: LiveIngress) -> None:
        """The WHIP offer was refused after :meth:`whip_reserve`: nothing started."""
        self.release(live)

    def whip_ended(self, live: LiveIngress, reason: EndReason) -> None:
        self._ended(live, reason)

    # --- URL pulls -------------------------------------------------------------------------------------------------

    def _sync_pulls(self) -> None:
        if self.draining:
            return
        for record in self.records.values():
            if record.kind == "url" and record.id not in self._pulls and record.node in ("", self.settings.node_id):
                try:
                    pull = _Pull(self, record)
                except IngestError as e:
                    self.states.setdefault(record.id, IngressState()).last_error = {
                        "code": e.code, "reason": e.reason, "at": round(time.time(), 3)}
                    self.set_state(record.id, "failed")
                    continue
                self._pulls[record.id] = pull
                self.tasks.spawn(pull.source.start(), name=f"start pull {record.id}")
        for record_id in [r for r in self._pulls if r not in self.records]:
            self.cleanups.spawn(self._pulls.pop(record_id).stop(), name=f"stop pull {record_id}")

    def totals(self) -> Counter[str]:
        """Bytes received per kind, ended and live sessions together (for metrics)."""
        totals = Counter(self.retired_bytes)
        for live in self.live.values():
            totals[live.record.kind] += live.received_bytes()
        return totals


class _Pull:
    """
    One ``url`` ingress: a :class:`.pull.PullSource` that keeps reconnecting, and, for each connection that
    delivers media, a session (participant + bridge) that ends when the connection is lost.
    """

    def __init__(self, manager: IngressManager, record: IngressRecord) -> None:
        self.manager = manager
        self.record = record
        self.live: LiveIngress | None = None
        self.pending: list[MediaItem] = []
        self.stopping = False
        self._end_reason: EndReason | None = None
        self.source = PullSource(record.url, self, settings=replace(manager.settings.pull,
                                                                     media_root=manager.settings.media_root),
                                 name=record.id, on_state=self._on_state)
        manager.set_state(record.id, "connecting")

    async def stop(self) -> None:
        self.stopping = True
        await self.source.stop()

    # MediaSink of the puller
    def media(self, item: MediaItem) -> None:
        live = self.live
        if live is not None and live.bridge is not None:
            live.bridge.media(item)
            return
        if len(self.pending) < PULL_PENDING_MAX:
            self.pending.append(item)
        if live is None and not self.stopping:
            self._start()

    def ended(self, reason: EndReason) -> None:
        self._end(reason)

    def _start(self) -> None:
        manager = self.manager

        def stop() -> None:  # the session is stopped (revoked, kicked, draining): so is pulling
            if not self.stopping:
                manager.cleanups.spawn(self.stop(), name=f"stop pull {self.record.id}")

        try:
            live = manager.reserve(self.record, "url", ("", 0), stop)
        except IngestError as e:
            self.pending.clear()
            manager.refuse("url", ("", 0), e, self.record.id)
            return
        self.live = live
        manager.tasks.spawn(self._join(live), name=f"pull join {self.record.id}")

    async def _join(self, live: LiveIngress) -> None:
        manager = self.manager
        try:
            bridge = await manager.start_bridge(live)
        except IngestError as e:
            manager.release(live)
            self.live = None
            self.pending.clear()
            manager.refuse("url", ("", 0), e, self.record.id)
            manager.cleanups.spawn(self.stop(), name=f"stop pull {self.record.id}")
            return
        if self.live is not live:  # the connection was lost while joining
            bridge.ended(self._end_reason or EndReason("disconnected"))
            return
        pending, self.pending = self.pending, []
        for item in pending:
            bridge.media(item)

    def _end(self, reason: EndReason) -> None:
        live, self.live = self.live, None
        self.pending.clear()
        if live is None:
            return
        if live.bridge is None:  # still joining: _join ends it once it has joined
            self._end_reason = reason
            return
        live.bridge.ended(reason)

    def _on_state(self, state: str, error: IngestError | None) -> None:
        manager = self.manager
        if state in ("backoff", "failed"):
            self._end(EndReason.from_error(error) if error is not None else EndReason("disconnected"))
        if self.record.id not in manager.states:
            return
        if state == "streaming":
            return  # "publishing" once the participant is in the room
        if state in ("backoff", "failed", "connecting"):
            manager.set_state(self.record.id, state)
            if error is not None:
                manager.states[self.record.id].last_error = {
                    "code": error.code, "reason": error.reason, "at": round(time.time(), 3)}


