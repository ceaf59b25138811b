"""
Several Chorus nodes sharing one Redis: a node registry, room placement, and where to send a client.

Keys (all under ``chorus:``):

* ``node:<id>`` — hash ``{ws, http, rooms, peers, cpu, at}``, expires ``ttl`` seconds after the last
  heartbeat: a dead node disappears by itself.
* ``room:<room>`` — the id of the node hosting the room; renewed by that node's heartbeat, so it expires
  with its node. Deleted when the room closes (only by its owner).
* ``load`` — sorted set node id → rooms hosted, written absolutely on every heartbeat and incremented at
  placement, so rooms created in a burst spread out before the next heartbeat.

Placement is one Lua script, so two nodes can never both take a room: it returns the current owner if the
room has a live one, else sets the least-loaded live candidate (ties broken by node id). A room whose owner
node expired is taken over.

Routing is by redirect: a join for a room hosted elsewhere is answered with error ``redirect`` and the
hosting node's websocket URL, and the client joins there. The media of a room lives on its node (its ICE
candidates are that node's addresses), so the client must talk to that node anyway; relaying signaling
over Redis would add a hop, and per-session state on two nodes, for nothing.

A draining node (see drain.py) marks itself ``draining`` in its hash and leaves ``load``: nobody places a
room on it any more, its heartbeat stops renewing its rooms, and :meth:`Cluster.drain` hands each of its rooms
to the least-loaded other node at once (so a room's participants all move to the same node).

When Redis is unreachable the node stays live (``/healthz``), reports not ready (``/readyz`` 503), keeps
serving the rooms it hosts (joins to those keep working), refuses rooms it cannot place (``unavailable``),
and re-registers itself and its rooms once Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chorus.sfu import ChorusError
from chorus.sfu.logs import PeerLogger

logger = PeerLogger(logging.getLogger("chorus.cluster"))

PREFIX = "chorus:"

# KEYS: room key, load key. ARGV: node ttl (ms), then candidate node ids (live, least loaded first
# decided here). Returns the owner node id.
PLACE_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if owner and redis.call('EXISTS', 'chorus:node:' .. owner) == 1 then
  return owner
end
local best, best_load = nil, nil
for i = 2, #ARGV do
  local node = ARGV[i]
  if redis.call('EXISTS', 'chorus:node:' .. node) == 1 then
    local load = tonumber(redis.call('ZSCORE', KEYS[2], node) or '0')
    if best == nil or load < best_load or (load == best_load and node < best) then
      best, best_load = node, load
    end
  end
end
if best == nil then return false end
redis.call('SET', KEYS[1], best, 'PX', ARGV[1])
redis.call('ZINCRBY', KEYS[2], 1, best)
return best
"""

# KEYS: room key. ARGV: node id. Deletes the room key only if this node owns it.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: room key. ARGV: node id, ttl ms. Renews the key if we own it or nobody does; returns the owner.
RENEW_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return owner
"""


class Redirect(ChorusError):
    """The room is hosted by another node: join there."""

    code = "redirect"

    def __init__(self, room: str, url: str) -> None:
        super().__init__(f"room {room!r} is hosted by another node: join at {url}")
        self.url = url


class Unavailable(ChorusError):
    """The cluster registry cannot be reached, so a new room cannot be placed."""

    code = "unavailable"


def http_base(ws_url: str) -> str:
    """``ws://h:p/ws`` → ``http://h:p``."""
    base = ws_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
    return base[: -len("/ws")] if base.endswith("/ws") else base


class Cluster:
    """
    This node's membership in a Redis-backed cluster.

    :param local_rooms: returns ``{room id: participant count}`` of the rooms this node hosts.
    :param on_lost_room: called with a room id when another node owns it (we lost it during an outage):
        the caller closes the local room, whose clients then rejoin through the owner.
    """

    def __init__(
        self,
        redis_url: str,
        node_id: str,
        ws_url: str,
        *,
        local_rooms: Callable[[], dict[str, int]],
        on_lost_room: Callable[[str], None],
        ttl: float = 5.0,
        heartbeat: float = 1.0,
    ) -> None:
        self.node_id = node_id
        self.ws_url = ws_url
        self.http_url = http_base(ws_url)
        self.ready = False
        #: set by :meth:`drain`: no room is placed here any more
        self.draining = False
        #: websocket URLs of the live nodes at the last heartbeat (clients fall back on them)
        self.known_nodes: list[str] = [ws_url]
        # After an outage the pool may hold several dead connections: a command that fails on one is retried
        # on a fresh connection (twice) before the error counts.
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._local_rooms = local_rooms
        self._on_lost_room = on_lost_room
        self._ttl_ms = int(ttl * 1000)
        self._heartbeat = heartbeat
        self._place = self._redis.register_script(PLACE_SCRIPT)
        self._release = self._redis.register_script(RELEASE_SCRIPT)
        self._renew = self._redis.register_script(RENEW_SCRIPT)
        self._cpu_last: tuple[float, float] | None = None
        self._log = logger.bind(node=node_id)

    # --- heartbeat ---------------------------------------------------------------------------------------

    def _cpu(self) -> float:
        """This process's CPU use (cores) since the last heartbeat."""
        now, used = time.monotonic(), time.process_time()
        last, self._cpu_last = self._cpu_last, (now, used)
        if last is None or now <= last[0]:
            return 0.0
        return round((used - last[1]) / (now - last[0]), 3)

    async def beat(self) -> None:
        """Publish this node and renew its rooms (raises RedisError when Redis is away)."""
        rooms = self._local_rooms()
        key = f"{PREFIX}node:{self.node_id}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"ws": self.ws_url, "http": self.http_url, "rooms": len(rooms),
                                    "peers": sum(rooms.values()), "cpu": self._cpu(), "at": time.time(),
                                    "pid": os.getpid(), "draining": int(self.draining)})
            pipe.pexpire(key, self._ttl_ms)
            if self.draining:
                pipe.zrem(f"{PREFIX}load", self.node_id)
            else:
                pipe.zadd(f"{PREFIX}load", {self.node_id: len(rooms)})
            await pipe.execute()
        await self.node_urls()
        if self.draining:
            return  # our rooms were handed over: never take them back
        for room in rooms:
            owner = await self._renew(keys=[f"{PREFIX}room:{room}"], args=[self.node_id, self._ttl_ms])
            if owner != self.node_id:
                self._log.warning("room taken over by another node while we were cut off", room=room, owner=owner)
                self._on_lost_room(room)

    async def run(self) -> None:
        """Heartbeat forever; flips :attr:`ready` with Redis's reachability."""
        while True:
            try:
                await self.beat()
                if not self.ready:
                    self._log.info("cluster registry reachable", redis="up")
                self.ready = True
            except (RedisError, OSError) as exc:
                if self.ready:
                    self._log.warning("cluster registry unreachable", error=f"{type(exc).__name__}: {exc}")
                self.ready = False
            await asyncio.sleep(self._heartbeat)

    async def close(self) -> None:
        """Leave the cluster: remove this node and release its rooms (best effort)."""
        try:
            for room in self._local_rooms():
                await self.release(room)
            await self._redis.delete(f"{PREFIX}node:{self.node_id}")
            await self._redis.zrem(f"{PREFIX}load", self.node_id)
        except (RedisError, OSError):
            pass
        await self._redis.aclose()

    # --- placement -----------------------------------------------------------------------------------

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """Live nodes: id → their heartbeat hash."""
        found: dict[str, dict[str, Any]] = {}
        async for key in self._redis.scan_iter(match=f"{PREFIX}node:*", count=100):
            data = await self._redis.hgetall(key)
            if data:
                found[key.removeprefix(f"{PREFIX}node:")] = cast(dict[str, Any], data)  # decode_responses
        return found

    async def node_urls(self) -> list[str]:
        """Websocket URLs of the live nodes that take rooms, read now (the last heartbeat's list if Redis is
        away). This node is always listed first, unless it drains."""
        try:
            others = sorted({str(n["ws"]) for i, n in (await self.nodes()).items()
                             if n.get("ws") and i != self.node_id and str(n.get("draining", "0")) != "1"})
            self.known_nodes = others if self.draining else [self.ws_url, *others]
        except (RedisError, OSError):
            pass
        return self.known_nodes

    async def owner(self, room: str) -> str | None:
        return cast("str | None", await self._redis.get(f"{PREFIX}room:{room}"))

    async def place(self, room: str, *, hosted_here: bool) -> str | None:
        """
        Where ``room`` lives: ``None`` for this node, else the hosting node's websocket URL.

        :raises Unavailable: Redis cannot be reached and the room is not hosted here.
        """
        try:
            return await self._place_once(room, hosted_here=hosted_here)
        except (RedisError, OSError) as exc:
            if hosted_here:
                return None  # keep serving our own rooms through an outage
            raise Unavailable(f"the cluster registry is unreachable ({type(exc).__name__})") from exc

    async def _candidates(self) -> list[str]:
        """Nodes that may take a room: live, not draining (and not this one while it drains)."""
        return [i for i, n in (await self.nodes()).items()
                if str(n.get("draining", "0")) != "1" and not (self.draining and i == self.node_id)]

    async def _place_once(self, room: str, *, hosted_here: bool) -> str | None:
        if hosted_here and not self.draining:
            owner = await self._renew(keys=[f"{PREFIX}room:{room}"], args=[self.node_id, self._ttl_ms])
        else:
            owner = await self._place(keys=[f"{PREFIX}room:{room}", f"{PREFIX}load"],
                                      args=[self._ttl_ms, *await self._candidates()])
        if owner is None:
            raise Unavailable("no live node can host the room")
        if owner == self.node_id:
            return None
        url = await self._redis.hget(f"{PREFIX}node:{owner}", "ws")
        if url is None:
            raise Unavailable(f"room {room!r} is being moved; try again")
        return str(url)

    async def drain(self, rooms: list[str]) -> dict[str, str | None]:
        """
        Stop taking rooms and hand ``rooms`` (hosted here) to other nodes now.

        :returns: room → websocket URL of the node that hosts it from now on (``None`` when no other node
            could take it, or Redis is away).
        """
        self.draining = True
        moved: dict[str, str | None] = {}
        try:
            await self.beat()  # "draining" in our hash, out of the load set: nobody places here any more
            for room in rooms:
                await self.release(room)
                moved[room] = await self._place_once(room, hosted_here=False)
        except (RedisError, OSError, Unavailable) as exc:
            self._log.warning("cannot hand rooms to other nodes", error=f"{type(exc).__name__}: {exc}")
        for room in rooms:
            moved.setdefault(room, None)
        self._log.info("draining: rooms handed over", rooms=len(rooms),
                       moved=sum(1 for url in moved.values() if url))
        return moved

    async def release(self, room: str) -> None:
        try:
            if await self._release(keys=[f"{PREFIX}room:{room}"], args=[self.node_id]) and not self.draining:
                await self._redis.zincrby(f"{PREFIX}load", -1, self.node_id)
        except (RedisError, OSError):
            pass  # it expires by itself

    async def rooms(self) -> dict[str, str]:
        """Every placed room: room id → node id."""
        found: dict[str, str] = {}
        async for key in self._redis.scan_iter(match=f"{PREFIX}room:*", count=500):
            owner = await self._redis.get(key)
            if owner:
                found[key.removeprefix(f"{PREFIX}room:")] = cast(str, owner)
        return found
