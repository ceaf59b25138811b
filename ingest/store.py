"""
Where ingress definitions live: a JSON file on one node (:class:`FileStore`), a Redis hash shared by the nodes of
a cluster (:class:`RedisStore`). Stream keys are never stored, only their SHA-256 digests
(:func:`.keys.key_digest`): a copy of the store cannot publish anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

#: What an ingress takes in: an RTMP or SRT publisher, a WHIP client, or a URL Chorus pulls.
KINDS = ("rtmp", "srt", "whip", "url")

_ID = re.compile(r"^in_[A-Za-z0-9_-]{6,40}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class IngressRecord:
    """
    One ingress as defined (its runtime state is the manager's).

    :param key_digest: hex SHA-256 of the stream key (rtmp, srt, whip); empty for ``url``.
    :param url: what is pulled (``url``).
    :param node: the cluster node that pulls a ``url`` ingress (the one it was created on); empty on one node.
    """

    id: str
    kind: str
    room: str
    name: str
    created_at: float
    key_digest: str = ""
    url: str = ""
    node: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> IngressRecord:
        """:raises ValueError: not a well-formed record."""
        if not isinstance(data, dict):
            raise ValueError("an ingress record is an object")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        record = cls(**values)
        if not _ID.match(str(record.id)) or record.kind not in KINDS or not isinstance(record.room, str) \
                or not isinstance(record.name, str) or not isinstance(record.created_at, int | float):
            raise ValueError(f"malformed ingress record {str(data)[:200]}")
        if record.kind == "url" and not record.url:
            raise ValueError("a url ingress needs its url")
        if record.kind != "url" and not _DIGEST.match(record.key_digest):
            raise ValueError("an rtmp/srt/whip ingress needs its key digest")
        return record


class IngressStore(Protocol):
    """Persistence of ingress records. ``shared``: other nodes write it too (reload it now and then)."""

    shared: bool

    async def load(self) -> list[IngressRecord]: ...

    async def put(self, record: IngressRecord) -> None: ...

    async def delete(self, ingress_id: str) -> bool: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Records kept in memory only (tests, or a node told not to persist)."""

    shared = False

    def __init__(self) -> None:
        self.records: dict[str, IngressRecord] = {}

    async def load(self) -> list[IngressRecord]:
        return list(self.records.values())

    async def put(self, record: IngressRecord) -> None:
        self.records[record.id] = record

    async def delete(self, ingress_id: str) -> bool:
        return self.records.pop(ingress_id, None) is not None

    async def close(self) -> None:
        pass


class FileStore:
    """
    Records in one JSON file (``{"version": 1, "ingresses": [...]}``), rewritten atomically (a temporary file in the
    same folder, then a rename) with mode 0600. A malformed entry is skipped with the others kept.
    """

    shared = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.skipped = 0
        self._records: dict[str, IngressRecord] | None = None
        self._lock = asyncio.Lock()

    async def load(self) -> list[IngressRecord]:
        async with self._lock:
            return list((await asyncio.to_thread(self._read)).values())

    def _read(self) -> dict[str, IngressRecord]:
        records: dict[str, IngressRecord] = {}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        for entry in data.get("ingresses", []) if isinstance(data, dict) else []:
            try:
                record = IngressRecord.from_dict(entry)
            except (TypeError, ValueError):
                self.skipped += 1
                continue
            records[record.id] = record
        self._records = records
        return records

    def _write(self, records: dict[str, IngressRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"version": 1, "ingresses": [json.loads(r.to_json()) for r in records.values()]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def put(self, record: IngressRecord) -> None:
        async with self._lock:
            records = self._records if self._records is not None else await asyncio.to_thread(self._read)
            updated = {**records, record.id: record}
            await asyncio.to_thread(self._write, updated)
            self._records = updated

    async def delete(self, ingress_id: str) -> bool:
        async with self._lock:
            records = self._records if self._records is not None else await asyncio.to_thread(self._read)
            if ingress_id not in records:
                return False
            updated = {k: v for k, v in records.items() if k != ingress_id}
            await asyncio.to_thread(self._write, updated)
            self._records = updated
            return True

    async def close(self) -> None:
        pass


class RedisStore:
    """Records in the Redis hash ``chorus:ingress`` (id → JSON), shared by every node of a cluster."""

    shared = True
    KEY = "chorus:ingress"

    def __init__(self, redis_url: str) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                              decode_responses=True)

    async def load(self) -> list[IngressRecord]:
        records = []
        for value in (await self._redis.hgetall(self.KEY)).values():
            try:
                records.append(IngressRecord.from_dict(json.loads(value)))
            except (TypeError, ValueError):
                continue
        return records

    async def put(self, record: IngressRecord) -> None:
        await self._redis.hset(self.KEY, record.id, record.to_json())

    async def delete(self, ingress_id: str) -> bool:
        return bool(await self._redis.hdel(self.KEY, ingress_id))

    async def close(self) -> None:
        await self._redis.aclose()
