"""
A load-generator process: ``python -m chorus.bench.worker``. It runs participants (publishers, subscribers) on
its own event loop and obeys JSON-line commands on stdin, answering on stdout (one JSON object per line,
``{"id": <same>, "ok": true, ...}``). The orchestrator (``bench.run``) starts several of these, pinned to
the generator core, and reuses them for every run.

Commands (``op``):

* ``publish`` ``{server, url, room, clients: [{name, audio, video, receive, simulcast?}]}`` →
  ``{feeds: {name: id}}``; ``simulcast``: the video as three layers (:mod:`.simulcast`).
* ``subscribe`` ``{server, url, room, clients: [{name, feeds: [...], layer?}]}`` — new participants that only
  receive, or (same name) publishers that now also receive (a meeting); ``layer``: the simulcast layer wanted
  (0 = lowest). Returns once signaling is done.
* ``status`` → ``{tracks_ready, tracks, errors}`` (a track is ready once its first frame arrived)
* ``mark`` — start the measurement window; ``collect`` → per-track counts since ``mark`` (and what simulcast
  publishers sent)
* ``close`` — close every participant; ``exit``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

from chorus.sfu import aiortc_adapter
from chorus.sfu.tasks import Tasks

from .drivers import DRIVERS, Participant
from .media import SimulcastClip, load_clip, load_simulcast_clip

#: Participants connecting at once in one process (signaling + ICE + DTLS are CPU bursts).
CONCURRENCY = 6


class Worker:
    def __init__(self) -> None:
        self.clip = load_clip()
        self.simulcast_clip: SimulcastClip | None = None  # loaded on first use (encoded by the orchestrator)
        self.participants: dict[str, Participant] = {}
        self.errors: list[str] = []
        self.marked_at: float | None = None

    def _participant(self, server: str, url: str, room: str, name: str) -> Participant:
        participant = self.participants.get(name)
        if participant is None:
            participant = DRIVERS[server](url, room, name, self.clip)
            self.participants[name] = participant
        return participant

    async def _guarded(self, name: str, coro: Any, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            try:
                await asyncio.wait_for(coro, 30)
            except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                logging.getLogger("bench.worker").debug("%s failed\n%s", name, traceback.format_exc())

    async def op_publish(self, server: str, url: str, room: str, clients: list[dict[str, Any]]) -> dict[str, Any]:
        # One after the other: a meeting's publishers join in order, like people do.
        semaphore = asyncio.Semaphore(1)
        for c in clients:
            p = self._participant(server, url, room, c["name"])
            simulcast = bool(c.get("simulcast"))
            if simulcast:
                if self.simulcast_clip is None:
                    self.simulcast_clip = await asyncio.to_thread(load_simulcast_clip)
                p.simulcast_clip = self.simulcast_clip
            await self._guarded(c["name"], p.publish(c["audio"], c["video"], receive=c["receive"],
                                                     simulcast=simulcast), semaphore)
        return {"feeds": {c["name"]: self.participants[c["name"]].feed_id for c in clients}}

    async def op_subscribe(self, server: str, url: str, room: str, clients: list[dict[str, Any]]) -> dict[str, Any]:
        semaphore = asyncio.Semaphore(CONCURRENCY)
        await asyncio.gather(*(
            self._guarded(c["name"], self._participant(server, url, room, c["name"]).subscribe(
                c["feeds"], c.get("layer")), semaphore)
            for c in clients
        ))
        return {}

    def _records(self) -> list[Any]:
        return [r for p in self.participants.values() if p.receiving for r in p.records]

    async def op_status(self) -> dict[str, Any]:
        records = self._records()
        return {
            "tracks": len(records),
            "tracks_ready": sum(r.first_frame is not None for r in records),
            "errors": self.errors[-5:],
            "error_count": len(self.errors),
        }

    async def op_mark(self) -> dict[str, Any]:
        self.marked_at = time.time()
        for record in self._records():
            record.mark()
        return {"t": self.marked_at}

    async def op_collect(self) -> dict[str, Any]:
        now = time.time()
        return {
            "seconds": now - (self.marked_at or now),
            "tracks": [r.window() for r in self._records()],
            "errors": self.errors,
            "simulcast_sent": {p.name: p.simulcast.stats() for p in self.participants.values()
                               if p.simulcast is not None},
        }

    async def op_close(self) -> dict[str, Any]:
        await asyncio.gather(*(p.close() for p in self.participants.values()))
        self.participants.clear()
        self.errors = []
        self.marked_at = None
        return {}


async def serve() -> None:
    aiortc_adapter.set_host_addresses(["127.0.0.1"])  # all traffic stays on loopback
    worker = Worker()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    def reply(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    async def handle(request: dict[str, Any]) -> None:
        op = request.pop("op")
        request_id = request.pop("id", None)
        try:
            result = await getattr(worker, f"op_{op}")(**request)
            reply({"id": request_id, "ok": True, **result})
        except Exception as exc:  # noqa: BLE001
            reply({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc()})

    reply({"id": 0, "ok": True, "ready": True, "pid": os.getpid()})
    tasks = Tasks("bench worker requests")
    while line := await reader.readline():
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        tasks.spawn(handle(request))
    await tasks.close()
    await worker.op_close()


def main() -> None:
    logging.basicConfig(level=os.environ.get("BENCH_WORKER_LOG", "WARNING"), stream=sys.stderr)
    asyncio.run(serve())


if __name__ == "__main__":
    main()
