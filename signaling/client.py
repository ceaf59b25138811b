"""
A Python client for Chorus, built on aiortc: join a room, publish tracks, receive everyone else's.

Example::

    client = ChorusClient("ws://127.0.0.1:8080/ws")
    await client.connect()
    await client.join("r1", "bot")
    await client.publish(audio_track, video_track)

    @client.on_track
    def on_track(track, info):  # info: {"peer_id", "track_id", "kind", "mid"}
        ...

    client.on_chat(lambda message: print(message["name"], message["text"]))
    await client.send_chat("hello")          # to the room; to="p-…" for one participant
    print(client.active_speakers)            # peer ids speaking now, loudest first

    await client.close()

Requests return the response ``data`` or raise :class:`RequestError` with the server's error ``code``.

With ``reconnect=True`` the client rejoins by itself (same identity, so the server replaces the stale
session) after any failure: the websocket closing, a peer connection's ICE or DTLS failing
(``connectionState == "failed"``), or the server dropping it (``left``, unless kicked or replaced). Attempts
follow :class:`Backoff`; :attr:`ChorusClient.state` says where it is, and it gives up (state ``failed``,
:attr:`ChorusClient.gave_up` set) after ``Backoff.max_attempts`` consecutive failures. A ``draining``
notification with a ``url`` moves it to that node at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)

from chorus.sfu import aiortc_adapter
from chorus.sfu.tasks import Tasks

logger = logging.getLogger("chorus.client")

TrackCallback = Callable[[MediaStreamTrack, dict[str, Any]], Any]
EventCallback = Callable[[dict[str, Any]], Any]


#: ``left`` reasons after which the client does not rejoin by itself.
FINAL_LEAVE_REASONS = frozenset({"kicked", "replaced", "closed by admin"})


class Backoff:
    """
    Reconnection schedule: exponential backoff with jitter, as the browser client's (web/chorus-client.js).

    The n-th consecutive failure waits a random time in [½, 1] × min(``max_delay``, ``initial_delay`` × 2^n);
    after ``max_attempts`` consecutive failures :meth:`next` returns ``None`` (give up). :meth:`reset` (the
    client calls it after ``stable_after`` seconds of media flowing) starts again from the first step.
    Defaults: 1, 2, 4, 8, 16, then 20 s; giving up after 12 attempts (about three minutes).
    """

    def __init__(self, initial_delay: float = 1.0, max_delay: float = 20.0, max_attempts: int = 12,
                 stable_after: float = 10.0, *, rng: random.Random | None = None) -> None:
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.stable_after = stable_after
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float | None:
        """The delay before the next attempt (seconds), or ``None``: give up."""
        if self.attempt >= self.max_attempts:
            return None
        ceiling = min(self.max_delay, self.initial_delay * 2**self.attempt)
        self.attempt += 1
        return float(ceiling / 2 + self._rng.random() * ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


class RequestError(Exception):
    """The server answered a request with an error (``url``: where to go, for ``redirect``)."""

    def __init__(self, code: str, reason: str, url: str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.url = url


def ice_servers_from(entries: list[dict[str, Any]]) -> list[RTCIceServer]:
    """Convert ``ice_servers`` from a join response into aiortc's type."""
    return [
        RTCIceServer(urls=e["urls"], username=e.get("username"), credential=e.get("credential")) for e in entries
    ]


class ChorusClient:
    """
    One participant, seen from aiortc.

    :param url: the server's websocket URL, ``ws://host:port/ws``.
    :param ice_transport_policy: ``"all"`` or ``"relay"`` (only TURN-relayed candidates).
    :param decode: decode received media (``False`` for bots that only count or record packets: the
        tracks then never yield frames, and no CPU goes to decoding).
    :param reconnect: when the websocket drops after a join, join again (same identity, so the server
        replaces the stale session), trying this node and then the other nodes of the cluster, with backoff;
        :attr:`republish` supplies fresh tracks to publish again (aiortc ends a track with its connection).
    """

    MAX_REDIRECTS = 3

    def __init__(self, url: str, *, ice_transport_policy: str = "all", decode: bool = True,
                 reconnect: bool = False, backoff: Backoff | None = None, local_address: str | None = None,
                 ssl: bool | None = None) -> None:
        self.url = url
        #: bind the websocket's TCP connection to this local address (e.g. another loopback address)
        self.local_address = local_address
        #: ``False``: do not verify the server's certificate (self-signed trials)
        self.ssl = ssl
        self.decode = decode
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        #: ``new`` → ``connected`` ⇄ ``reconnecting`` → ``failed`` (gave up) / ``closed``
        self.state = "new"
        #: (monotonic time, state, reason) of every change
        self.state_changes: list[tuple[float, str, str]] = []
        #: set when reconnection gave up
        self.gave_up = asyncio.Event()
        self._reconnecting = False
        self._stable: asyncio.Task[None] | None = None
        #: returns the tracks to publish again after a reconnection
        self.republish: Callable[[], list[MediaStreamTrack]] | None = None
        #: set each time a reconnection completed (join and republish)
        self.reconnected = asyncio.Event()
        self.nodes: list[str] = []
        self._join_args: dict[str, Any] | None = None
        self._closing = False
        self._tasks = Tasks("chorus client")
        self.peer_id: str | None = None
        self.room: str | None = None
        self.joined: dict[str, Any] = {}
        self.tracks: dict[str, dict[str, Any]] = {}  # our published tracks by id
        self.publish_pc: RTCPeerConnection | None = None
        self.subscribe_pc: RTCPeerConnection | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._policy = ice_transport_policy
        self._ice_servers: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._offers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._offer_task: asyncio.Task[None] | None = None
        self._consumers: dict[str, dict[str, Any]] = {}  # mid -> consumer info
        self._track_callbacks: list[TrackCallback] = []
        #: Chat messages seen in this room, oldest first: the join response's history, then each ``chat``
        #: notification and each message we sent (``{id, from, name, to, text, ts}``).
        self.chat: list[dict[str, Any]] = []
        #: The peers speaking now, loudest first (``active_speakers`` notifications).
        self.active_speakers: list[str] = []
        self._chat_callbacks: list[EventCallback] = []
        self._speaker_callbacks: list[Callable[[list[str]], Any]] = []
        self._event_waiters: list[tuple[str, Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]] = []

    # --- connection ------------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._session is None:
            local = (self.local_address, 0) if self.local_address else None
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=local))
        self._ws = await self._session.ws_connect(self.url, heartbeat=15.0,
                                                  ssl=self.ssl if self.ssl is not None else True)
        self._reader = self._tasks.spawn(self._read(self._ws), name="chorus client reader")

    async def _disconnect(self) -> None:
        """Drop the websocket and both peer connections (the session object stays usable)."""
        for task in (self._offer_task, self._reader):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._offer_task = self._reader = None
        for pc in (self.publish_pc, self.subscribe_pc):
            if pc is not None:
                await pc.close()
        self.publish_pc = self.subscribe_pc = None
        self._consumers.clear()
        self._offers = asyncio.Queue()
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    def _set_state(self, state: str, reason: str = "") -> None:
        if state != self.state:
            self.state = state
            self.state_changes.append((time.monotonic(), state, reason))
            logger.info("chorus client %s%s", state, f" ({reason})" if reason else "")

    async def close(self) -> None:
        """Close both peer connections and the websocket (no ``leave``: the server notices the close)."""
        self._closing = True
        self._set_state("closed")
        await self._tasks.close()
        for pc in (self.publish_pc, self.subscribe_pc):
            if pc is not None:
                await pc.close()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, data: dict[str, Any] | None = None, *, timeout: float = 15.0
    ) -> dict[str, Any]:
        assert self._ws is not None, "connect() first"
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._ws.send_str(json.dumps({"type": "req", "id": request_id, "method": method, "data": data or {}}))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(message.data)
            if msg.get("type") == "res":
                future = self._pending.get(msg.get("id"))
                if future is not None and not future.done():
                    if msg.get("ok"):
                        future.set_result(msg.get("data", {}))
                    else:
                        err = msg.get("error", {})
                        future.set_exception(RequestError(err.get("code", "?"), err.get("reason", ""),
                                                          err.get("url")))
            elif msg.get("type") == "evt":
                self._on_event(msg["method"], msg.get("data", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("websocket closed"))
        if ws is self._ws:
            self._failed(f"websocket closed ({ws.close_code})")

    def _failed(self, reason: str, *, immediate: bool = False) -> None:
        """Something broke (or the node drains): reconnect if enabled and not already doing so."""
        if (self.reconnect and self._join_args is not None and not self._closing and not self._reconnecting
                and self.state in ("connected", "new")):
            self._reconnecting = True
            self._tasks.spawn(self._reconnect(reason, immediate=immediate), name="chorus client reconnect")

    async def _reconnect(self, reason: str, *, immediate: bool = False) -> None:
        """Join again: this node first, then the others, on the backoff schedule, until joined or giving up."""
        assert self._join_args is not None
        self._set_state("reconnecting", reason)
        try:
            await self._disconnect()
            first = True
            while True:
                delay = 0.0 if first and immediate else self.backoff.next()
                first = False
                if delay is None:
                    self._set_state("failed", f"gave up after {self.backoff.attempt} attempts")
                    self.gave_up.set()
                    return
                await asyncio.sleep(delay)
                for url in dict.fromkeys([self.url, *self.nodes]):
                    self.url = url
                    try:
                        await self.connect()
                        await self.join(**self._join_args)
                        if self.republish is not None:
                            await self.publish(*self.republish())
                        logger.info("reconnected to %s", self.url)
                        self._set_state("connected")
                        self.reconnected.set()
                        return
                    except (TimeoutError, OSError, aiohttp.ClientError, RequestError, ConnectionError) as exc:
                        logger.info("reconnection to %s failed: %s", url, exc)
                        await self._disconnect()
        finally:
            self._reconnecting = False

    def _watch(self, pc: RTCPeerConnection, name: str) -> None:
        """Reconnect when ``pc``'s ICE or DTLS fails; reset the backoff after media flowed long enough."""

        @pc.on("connectionstatechange")
        def changed() -> None:
            if pc not in (self.publish_pc, self.subscribe_pc):
                return
            if pc.connectionState == "failed":
                self._failed(f"{name} connection failed")
            self._check_stable()

    def _check_stable(self) -> None:
        pcs = [pc for pc in (self.publish_pc, self.subscribe_pc) if pc is not None]
        flowing = self.state == "connected" and bool(pcs) and all(pc.connectionState == "connected" for pc in pcs)
        if not flowing:
            if self._stable is not None:
                self._stable.cancel()
                self._stable = None
        elif self._stable is None and self.backoff.attempt:
            async def stable() -> None:
                await asyncio.sleep(self.backoff.stable_after)
                self._stable = None
                self.backoff.reset()

            self._stable = self._tasks.spawn(stable(), name="chorus client backoff reset")

    def _on_event(self, method: str, data: dict[str, Any]) -> None:
        self.events.append((method, data))
        if method == "offer":
            self._offers.put_nowait(data)
        elif method == "left" and data.get("reason") not in FINAL_LEAVE_REASONS:
            self._failed(f"left: {data.get('reason')}")
        elif method == "draining" and data.get("url"):
            self.url = str(data["url"])
            self._failed("server draining", immediate=True)
        elif method == "chat":
            self._chat_arrived(data)
        elif method == "active_speakers":
            self.active_speakers = list(data.get("peers", []))
            for speakers_callback in self._speaker_callbacks:
                speakers_callback(self.active_speakers)
        for waiter in list(self._event_waiters):
            name, predicate, future = waiter
            if name == method and not future.done() and predicate(data):
                future.set_result(data)
                self._event_waiters.remove(waiter)

    def expect_event(
        self, method: str, predicate: Callable[[dict[str, Any]], bool] = lambda d: True, *, timeout: float = 10.0
    ) -> asyncio.Future[dict[str, Any]]:
        """
        Start waiting, now, for the next notification ``method`` whose data satisfies ``predicate``; await
        the returned future after doing what should cause it (so an early notification is not missed). It fails
        with ``TimeoutError`` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        waiter = (method, predicate, future)
        self._event_waiters.append(waiter)

        def expire() -> None:
            if not future.done():
                future.set_exception(TimeoutError(f"no {method!r} notification within {timeout} s"))

        timer = loop.call_later(timeout, expire)

        def forget(_: asyncio.Future[dict[str, Any]]) -> None:
            timer.cancel()
            if waiter in self._event_waiters:
                self._event_waiters.remove(waiter)

        future.add_done_callback(forget)
        return future

    async def wait_for_event(
        self, method: str, predicate: Callable[[dict[str, Any]], bool] = lambda d: True, *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Wait for the next notification ``method`` (from now on) whose data satisfies ``predicate``."""
        return await self.expect_event(method, predicate, timeout=timeout)

    # --- room --------------------------------------------------------------------------------------------

    def _configuration(self) -> RTCConfiguration:
        from aiortc.rtcconfiguration import RTCBundlePolicy, RTCIceTransportPolicy  # enums, not strings

        policy = RTCIceTransportPolicy.RELAY if self._policy == "relay" else RTCIceTransportPolicy.ALL
        # max-bundle: with aiortc's default ("balanced"), a second m-section of the same kind in one offer is
        # left on a transport that BUNDLE then stops, and its receiver never gets media.
        return RTCConfiguration(
            iceServers=ice_servers_from(self._ice_servers),
            iceTransportPolicy=policy,
            bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
        )

    async def join(self, room: str, name: str, *, token: str | None = None, identity: str | None = None,
                   mode: str | None = None, mcu: dict[str, int] | None = None) -> dict[str, Any]:
        """
        Join ``room``; returns the join response (``peer_id``, ``mode``, ``peers``, ``ice_servers``).

        :param identity: who this is across reconnections (dev mode; a token carries its own): joining again
            with the same identity replaces the earlier session instead of adding a duplicate.
        :param mode: ``"sfu"`` or ``"mcu"`` for a room this join creates (an existing room keeps its mode;
            asking another one is ``invalid_state``).
        :param mcu: composite options of a new MCU room, e.g. ``{"width": 320, "height": 240, "fps": 15}``.
        """
        if identity is None and self.reconnect:
            identity = f"py-{secrets.token_hex(6)}"  # so that rejoining replaces our stale session
        self._join_args = {"room": room, "name": name, "token": token, "identity": identity, "mode": mode,
                           "mcu": mcu}
        data: dict[str, Any] = {"v": 1, "room": room, "name": name}
        for key, value in (("token", token), ("identity", identity), ("mode", mode), ("mcu", mcu)):
            if value is not None:
                data[key] = value
        for _ in range(self.MAX_REDIRECTS):
            try:
                self.joined = await self.request("join", data)
                break
            except RequestError as exc:
                if exc.code != "redirect" or not exc.url:
                    raise
                # The room lives on another node of the cluster: join it there.
                await self._disconnect()
                self.url = exc.url
                await self.connect()
        else:
            raise RequestError("redirect", f"more than {self.MAX_REDIRECTS} redirects")
        self.nodes = list(self.joined.get("nodes", []))
        self.peer_id = self.joined["peer_id"]
        known = {m["id"] for m in self.chat}
        for message in self.joined.get("chat", []):
            if message["id"] not in known:  # a rejoin gives the history again
                self.chat.append(message)
        self.active_speakers = list(self.joined.get("active_speakers", []))
        self.room = room
        self._ice_servers = self.joined.get("ice_servers", [])
        self._offer_task = self._tasks.spawn(self._answer_offers(), name="chorus client offers")
        if self.state == "new":
            self._set_state("connected")
        return self.joined

    def on_track(self, callback: TrackCallback) -> TrackCallback:
        """Register ``callback(track, info)`` for every remote track (usable as a decorator)."""
        self._track_callbacks.append(callback)
        return callback

    async def publish(self, *tracks: MediaStreamTrack, video_codec: str | None = None) -> list[dict[str, Any]]:
        """
        Publish tracks on the publish connection (one offer/answer).

        :param video_codec: e.g. ``"video/H264"`` to prefer that codec over VP8.
        :returns: the server's track descriptions ``{"id", "kind", "mid"}``.
        """
        if self.publish_pc is None:
            self.publish_pc = RTCPeerConnection(self._configuration())
            self._watch(self.publish_pc, "publish")
        pc = self.publish_pc
        for track in tracks:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            if video_codec and track.kind == "video":
                codecs = RTCRtpSender.getCapabilities("video").codecs
                transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() == video_codec.lower()])
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self.request("publish", {"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        for track in answer["tracks"]:
            self.tracks[track["id"]] = track
        return list(answer["tracks"])

    # --- chat and active speakers -------------------------------------------------------------------------

    async def send_chat(self, text: str, to: str | None = None) -> dict[str, Any]:
        """
        Send a chat message to the room, or to the participant ``to`` (a peer id); returns it as delivered
        (``{id, from, name, to, text, ts}``). Plain text, at most 4 kB.

        :raises RequestError: ``limit_exceeded`` (too long, or too many too fast), ``not_found`` (no such ``to``).
        """
        data: dict[str, Any] = {"text": text}
        if to is not None:
            data["to"] = to
        message: dict[str, Any] = (await self.request("chat", data))["message"]
        self.chat.append(message)
        return message

    def on_chat(self, callback: EventCallback) -> EventCallback:
        """Register ``callback(message)`` for every chat message others send (usable as a decorator)."""
        self._chat_callbacks.append(callback)
        return callback

    def on_active_speakers(self, callback: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
        """Register ``callback(peer_ids)`` for each change of who speaks, loudest first."""
        self._speaker_callbacks.append(callback)
        return callback

    def _chat_arrived(self, message: dict[str, Any]) -> None:
        self.chat.append(message)
        for callback in self._chat_callbacks:
            callback(message)

    async def set_muted(self, track_id: str, muted: bool) -> None:
        await self.request("mute", {"track_id": track_id, "muted": muted})

    async def set_preferences(self, track_id: str, *, max_height: int | None = None, paused: bool = False) -> None:
        """Say how a received track is shown: ``max_height`` pixels tall (``None``: no limit), or not at all
        (``paused``); the server sends the simulcast layer that fits (see docs/signaling.md)."""
        await self.request("set_preferences", {"track_id": track_id, "max_height": max_height, "paused": paused})

    async def leave(self) -> None:
        await self.request("leave")

    # --- subscribe ---------------------------------------------------------------------------------------

    async def _answer_offers(self) -> None:
        while True:
            offer = await self._offers.get()
            if offer.get("restart") and self.subscribe_pc is not None:
                # The server moved our tracks to a new connection: answer it on a fresh one.
                old, self.subscribe_pc = self.subscribe_pc, None
                self._consumers.clear()
                await old.close()
            if self.subscribe_pc is None:
                self.subscribe_pc = RTCPeerConnection(self._configuration())
                self.subscribe_pc.on("track", self._on_remote_track)
                self._watch(self.subscribe_pc, "subscribe")
            pc = self.subscribe_pc
            for consumer in offer.get("consumers", []):
                self._consumers[consumer["mid"]] = consumer
            await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            try:
                await self.request("answer", {"type": "answer", "sdp": pc.localDescription.sdp})
            except RequestError as exc:
                logger.warning("answer rejected: %s", exc)

    def _on_remote_track(self, track: MediaStreamTrack) -> None:
        assert self.subscribe_pc is not None
        transceiver = next(t for t in self.subscribe_pc.getTransceivers() if t.receiver.track is track)
        if not self.decode:
            aiortc_adapter.disable_decoding(transceiver.receiver)
        mid = transceiver.mid
        info = dict(self._consumers.get(mid or "", {}), mid=mid)
        for callback in self._track_callbacks:
            callback(track, info)
