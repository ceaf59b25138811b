"""
The orchestrator: starts each server pinned to one core, drives the load from worker processes pinned to
the other, measures a steady-state window, and turns the counts into figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chorus.sfu.tasks import Tasks

from . import janus, profile, servers
from .media import SIMULCAST_LAYERS
from .scenarios import Scenario
from .servers import ROOT, Server, core_busy, core_times, process_cpu_seconds, thread_cpu_seconds

Progress = Callable[[str], None]

#: A run whose generator core is busier than this is flagged invalid (the load itself was starved).
GENERATOR_BUSY_LIMIT = 0.80
#: A server whose core is busier than this is saturated (a valid result: that is its limit).
SERVER_SATURATED = 0.95
#: Other processes using more than this share of the server's core make a run "noisy" (retried if time allows).
OTHER_LOAD_LIMIT = 0.30


@dataclass
class Options:
    duration: float = 8.0  # measurement window, seconds
    settle: float = 2.0  # after every track delivered its first frame
    warmup: float = 1.0  # publishers live before receivers join
    ramp_timeout: float = 40.0
    server_cpu: int | None = 0
    gen_cpu: int | None = 1
    workers: int = 4  # receiving worker processes (plus one for publishers)
    profile: bool = False
    #: Chorus only: start an HLS egress of the first publisher (``hls``: passthrough or transcoded ladder, as its
    #: codec allows) or of the room composite (``hls-composite``) after the ramp, to see what it costs others.
    egress: str | None = None
    results_dir: Path = field(default_factory=lambda: ROOT / "bench" / "results")


# --- worker processes -------------------------------------------------------------------------------------


class WorkerProcess:
    """One ``python -m chorus.bench.worker`` child, spoken to with JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.pid = proc.pid
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: the worker's hello (its first line)
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._tasks = Tasks(f"bench worker {name}")
        self._tasks.spawn(self._read())

    @classmethod
    async def start(cls, name: str, cpu: int | None) -> WorkerProcess:
        cmd, preexec = servers.pinned([sys.executable, "-m", "chorus.bench.worker"], cpu)
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            preexec_fn=preexec, limit=1 << 26,  # type: ignore[arg-type]
        )
        worker = cls(proc, name)
        hello = await asyncio.wait_for(worker.ready, 60)
        worker.pid = hello.get("pid", proc.pid)
        return worker

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # a stray print from a library
            if msg.get("id") == 0 and not self.ready.done():
                self.ready.set_result(msg)
                continue
            future = self._pending.pop(msg.get("id"), None)
            if future is not None and not future.done():
                future.set_result(msg)
        for future in [self.ready, *self._pending.values()]:
            if not future.done():
                future.set_exception(RuntimeError(f"worker {self.name} exited"))

    async def call(self, op: str, *, timeout: float = 120.0, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self.proc.stdin.write((json.dumps({"id": request_id, "op": op, **kwargs}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(future, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"worker {self.name} {op}: {reply.get('error')}\n{reply.get('trace', '')}")
        return reply

    def cpu_seconds(self) -> float:
        try:
            return process_cpu_seconds(self.pid)
        except OSError:
            return 0.0

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "exit"}\n')
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._tasks.close()


class Pool:
    """The generator: one publisher worker and ``n`` receiver workers, reused across runs."""

    def __init__(self, publisher: WorkerProcess, receivers: list[WorkerProcess]) -> None:
        self.publisher = publisher
        self.receivers = receivers

    @property
    def all(self) -> list[WorkerProcess]:
        return [self.publisher, *self.receivers]

    @classmethod
    async def start(cls, n: int, cpu: int | None) -> Pool:
        workers = await asyncio.gather(*(WorkerProcess.start(f"w{i}", cpu) for i in range(n + 1)))
        return cls(workers[0], list(workers[1:]))

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.all))


# --- one run ----------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _admin(server: Server, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    base = server.url.replace("ws://", "http://").removesuffix("/ws")
    request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


async def _start_egress(kind: str, server: Server, room: str, options: Options, progress: Progress, label: str,
                        result: dict[str, Any]) -> str | None:
    if options.egress is None or kind != "chorus":
        return None
    body: dict[str, Any] = {"room": room, "kind": "hls"}
    if options.egress == "hls":
        body["participant"] = "p0"
    started = await asyncio.to_thread(_admin, server, "POST", "/api/egress", body)
    progress(f"{label}: egress {options.egress} started ({started['id']}, worker pid {started['worker']['pid']})")
    result["notes"].append(f"with egress {options.egress}")
    return str(started["id"])


async def _stop_egress(server: Server, egress_id: str) -> dict[str, Any]:
    described = await asyncio.to_thread(_admin, server, "GET", f"/api/egress/{egress_id}")
    await asyncio.to_thread(_admin, server, "DELETE", f"/api/egress/{egress_id}")
    return {"mode": described["mode"], "worker_cpu_percent": described["worker"]["cpu_percent"],
            "frames_dropped": described["worker"]["frames_dropped"],
            "renditions": [(r["name"], r["width"], r["height"], r["segments"]) for r in described["renditions"]]}


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


async def run_one(kind: str, scenario: Scenario, options: Options, pool: Pool, progress: Progress,
                  logdir: Path, run_tag: str = "") -> dict[str, Any]:
    """Run ``scenario`` against server ``kind``; returns the figures of its measurement window."""
    label = f"{scenario.title} · {kind}"
    result: dict[str, Any] = {"scenario": scenario.name, "title": scenario.title, "server": kind,
                              "streams": scenario.streams, "video_streams": scenario.video_streams,
                              "valid": False, "notes": []}
    if scenario.reference is not None:
        result["reference"] = scenario.reference
    t0 = time.monotonic()
    server = await asyncio.to_thread(servers.STARTERS[kind], options.server_cpu, logdir)
    progress(f"{label}: server up (pid {server.pid}, {time.monotonic() - t0:.1f} s)")
    try:
        await _load(kind, scenario, server, options, pool, progress, label, result, run_tag)
    except Exception as exc:  # noqa: BLE001 - a failed run is reported, the bench goes on
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["notes"].append("failed")
        progress(f"{label}: FAILED {result['error'][:300]}")
        if not server.alive():
            progress(f"{label}: server exited; log tail:\n{server.log_tail(1500)}")
    finally:
        await asyncio.gather(*(w.call("close", timeout=60) for w in pool.all), return_exceptions=True)
        await asyncio.to_thread(server.stop)
    log = server.log_tail(10_000_000)
    tracebacks = log.count("Traceback (most recent call last)")
    result["server_log"] = str(server.log_path)
    if tracebacks:
        result["server_log_tracebacks"] = tracebacks
        result["notes"].append(f"{tracebacks} tracebacks in server log")
        progress(f"{label}: {tracebacks} tracebacks in the server log {server.log_path}")
    result["wall_s"] = round(time.monotonic() - t0, 1)
    return result


async def _load(kind: str, scenario: Scenario, server: Server, options: Options, pool: Pool, progress: Progress,
                label: str, result: dict[str, Any], run_tag: str) -> None:
    room_number = 1000 + (os.getpid() % 1000) * 10
    room = str(room_number) if kind == "janus" else f"bench-{scenario.name}-{os.getpid()}"
    if kind == "janus":
        await janus.create_room(server.url, room_number, scenario.publishers)

    # Publishers (and meeting participants) join first, one after the other.
    t0 = time.monotonic()
    publishers = [{"name": f"p{i}", "audio": True, "video": scenario.video, "receive": scenario.meeting,
                   "simulcast": scenario.simulcast} for i in range(scenario.publishers)]
    published = await pool.publisher.call("publish", server=kind, url=server.url, room=room, clients=publishers)
    feeds: dict[str, Any] = published["feeds"]
    progress(f"{label}: {scenario.publishers} publisher(s) live ({time.monotonic() - t0:.1f} s)")
    # Receivers join a room whose media is already flowing, as people join a call in progress.
    await asyncio.sleep(options.warmup)

    # Receivers.
    t0 = time.monotonic()
    active = [pool.publisher]
    if scenario.meeting:
        clients = [{"name": name, "feeds": [f for other, f in feeds.items() if other != name]} for name in feeds]
        await pool.publisher.call("subscribe", server=kind, url=server.url, room=room, clients=clients)
    else:
        groups: list[list[dict[str, Any]]] = [[] for _ in pool.receivers]
        for j in range(scenario.subscribers):
            client: dict[str, Any] = {"name": f"s{j}", "feeds": list(feeds.values())}
            if scenario.simulcast:
                client["layer"] = j % len(SIMULCAST_LAYERS)  # lowest, middle, full, lowest, ...
            groups[j % len(groups)].append(client)
        used = [(w, g) for w, g in zip(pool.receivers, groups, strict=True) if g]
        active += [w for w, _ in used]
        await asyncio.gather(*(w.call("subscribe", server=kind, url=server.url, room=room, clients=g)
                               for w, g in used))
    expected = scenario.streams
    last_line = 0.0
    while True:
        statuses = await asyncio.gather(*(w.call("status") for w in active))
        ready = sum(s["tracks_ready"] for s in statuses)
        errors = [e for s in statuses for e in s["errors"]]
        elapsed = time.monotonic() - t0
        if ready >= expected:
            break
        if elapsed > options.ramp_timeout:
            result["notes"].append(f"ramp timeout: {ready}/{expected} tracks")
            break
        if time.monotonic() - last_line > 5:
            progress(f"{label}: ramp {ready}/{expected} tracks ({elapsed:.0f} s)")
            last_line = time.monotonic()
        await asyncio.sleep(0.25)
    if errors:
        result["notes"].append(f"{sum(s['error_count'] for s in statuses)} client errors, e.g. {errors[0][:200]}")
    result["ramp_s"] = round(time.monotonic() - t0, 2)
    result["tracks_ready"] = ready
    progress(f"{label}: ramp {ready}/{expected} tracks in {result['ramp_s']:.1f} s; settling {options.settle:g} s")
    egress_id = await _start_egress(kind, server, room, options, progress, label, result)
    await asyncio.sleep(options.settle)

    # The measurement window.
    progress(f"{label}: measuring {options.duration:g} s")
    own_pid = os.getpid()
    cores0 = core_times()
    server_cpu0 = server.cpu_seconds()
    gen_cpu0 = sum(w.cpu_seconds() for w in pool.all) + process_cpu_seconds(own_pid)
    m0 = time.monotonic()
    await asyncio.gather(*(w.call("mark") for w in active))
    profiling: asyncio.Task[Path] | None = None
    tasks = Tasks("bench profile")
    threads0 = thread_cpu_seconds(server.pid) if options.profile else {}
    if options.profile:
        out = options.results_dir / f"profile-{run_tag}{kind}-{scenario.name}.folded"
        out.parent.mkdir(parents=True, exist_ok=True)
        profiling = tasks.spawn(profile.record(server.pid, options.duration, out))
    await asyncio.sleep(options.duration)
    collected = await asyncio.gather(*(w.call("collect") for w in active))
    window = time.monotonic() - m0
    room_state = await asyncio.to_thread(_chorus_room, server, room) if scenario.simulcast and kind == "chorus" \
        else None
    server_cpu = (server.cpu_seconds() - server_cpu0) / window
    gen_cpu = (sum(w.cpu_seconds() for w in pool.all) + process_cpu_seconds(own_pid) - gen_cpu0) / window
    cores1 = core_times()
    result["rss_mb"] = round(server.rss_mb(), 1)
    if profiling is not None:
        threads1 = thread_cpu_seconds(server.pid)
        per_thread = sorted(((threads1[t] - threads0.get(t, 0.0)) / window, t) for t in threads1)
        try:
            folded = await profiling
            summary = profile.summarize(folded)
            result["profile"] = {"folded": str(folded), **summary,
                                 "threads": [{"thread": t, "cpu": round(c, 4)} for c, t in reversed(per_thread)][:6]}
        except Exception as exc:  # noqa: BLE001
            result["notes"].append(f"profile failed: {exc}")
    await tasks.close()
    if egress_id is not None:
        result["egress"] = await _stop_egress(server, egress_id)

    # Figures.
    tracks = [t for c in collected for t in c["tracks"]]
    seconds = statistics.fmean(c["seconds"] for c in collected)
    video = [t for t in tracks if t["kind"] == "video"]
    audio = [t for t in tracks if t["kind"] == "audio"]
    packets = sum(t["packets"] for t in tracks)
    expected_packets = sum(t["expected"] for t in tracks)
    received_packets = sum(t["received"] for t in tracks)
    server_busy = core_busy(cores0, cores1, options.server_cpu) if options.server_cpu is not None else None
    gen_busy = core_busy(cores0, cores1, options.gen_cpu) if options.gen_cpu is not None else None

    def lat(kind_tracks: list[dict[str, Any]]) -> list[float]:
        return [x for t in kind_tracks for x in t["latencies_ms"]]

    main = video if scenario.video else audio
    main_lat = lat(main)
    first = [t["first_frame_ms"] for t in main if t["first_frame_ms"] is not None]
    result.update({
        "window_s": round(window, 2),
        "tracks": len(tracks),
        "server_cpu": round(server_cpu, 4),  # CPU-seconds per second (1.0 = one core)
        "server_core_busy": _round(server_busy, 3),
        "cpu_pct_per_stream": round(server_cpu * 100 / scenario.streams, 4),
        "cpu_pct_per_video_stream": round(server_cpu * 100 / scenario.video_streams, 4)
        if scenario.video_streams else None,
        "packets_per_s": round(packets / seconds, 1),
        "us_per_packet": round(server_cpu / (packets / seconds) * 1e6, 2) if packets else None,
        "fps": _round(statistics.fmean(t["frames"] / seconds for t in video), 2) if video else None,
        "fps_min": _round(min(t["frames"] / seconds for t in video), 2) if video else None,
        "video_kbps": _round(statistics.fmean(t["bytes"] * 8 / seconds / 1000 for t in video), 1) if video else None,
        "audio_kbps": _round(statistics.fmean(t["bytes"] * 8 / seconds / 1000 for t in audio), 1) if audio else None,
        "audio_pps": _round(statistics.fmean(t["packets"] / seconds for t in audio), 1) if audio else None,
        "loss_pct": round(max(0.0, 1 - received_packets / expected_packets) * 100, 3) if expected_packets else None,
        "loss_pct_worst": round(max((max(0.0, 1 - t["received"] / t["expected"]) * 100 for t in tracks
                                     if t["expected"]), default=0.0), 3),
        "latency_kind": "video" if scenario.video else "audio",
        "latency_p50_ms": _round(_percentile(main_lat, 0.50), 3),
        "latency_p95_ms": _round(_percentile(main_lat, 0.95), 3),
        "audio_latency_p50_ms": _round(_percentile(lat(audio), 0.50), 3),
        "audio_latency_p95_ms": _round(_percentile(lat(audio), 0.95), 3),
        "latency_samples": len(main_lat),
        "first_frame_p50_ms": _round(_percentile(first, 0.50), 1),
        "first_frame_p95_ms": _round(_percentile(first, 0.95), 1),
        "first_frame_samples": len(first),
        "generator_cpu": round(gen_cpu, 3),
        "generator_core_busy": _round(gen_busy, 3),
        "generator_processes": len(active),
        "cores_busy": {str(c): _round(core_busy(cores0, cores1, c), 3) for c in sorted(cores1)},
    })
    if scenario.simulcast:
        result["simulcast"] = simulcast_summary(video, seconds, room_state)
        # What the publisher sent since it started, per layer (keyframes forced: PLIs it answered).
        result["simulcast"]["publisher_sent"] = next(
            (sent for c in collected for sent in c.get("simulcast_sent", {}).values()), None)
        if result["simulcast"]["mismatched"]:
            result["notes"].append(f"{result['simulcast']['mismatched']} subscriber(s) not on the layer they asked for")
    if packets == 0:
        result["notes"].append("no packets received")
    if len(tracks) < scenario.streams:
        result["notes"].append(f"only {len(tracks)}/{scenario.streams} tracks")
    busy = gen_busy if gen_busy is not None else gen_cpu
    if busy > GENERATOR_BUSY_LIMIT:
        result["notes"].append(f"INVALID: generator core {busy * 100:.0f}% busy")
    # Saturated: the server used a whole core, or its core was full and it could not keep the frame rate.
    core_full = server_busy is not None and server_busy > SERVER_SATURATED
    saturated = server_cpu > SERVER_SATURATED or (core_full and (result["fps"] or 30) < 27)
    result["saturated"] = saturated
    if saturated:
        result["notes"].append("server saturated")
    elif core_full and server_busy is not None:
        result["notes"].append(f"server core {server_busy * 100:.0f}% busy")
    # Other processes on the server's core (a shared machine) make its latency figures unreliable.
    foreign = (server_busy - server_cpu) if server_busy is not None else 0.0
    result["server_core_other_load"] = round(max(foreign, 0.0), 3)
    result["noisy"] = foreign > OTHER_LOAD_LIMIT
    if result["noisy"]:
        result["notes"].append(f"other load on server core {foreign * 100:.0f}%")
    result["valid"] = packets > 0 and busy <= GENERATOR_BUSY_LIMIT and len(tracks) >= scenario.streams
    progress(
        f"{label}: cpu {server_cpu:.3f} s/s ({result['cpu_pct_per_stream']:.3f} %/stream, "
        f"{result['us_per_packet']} µs/pkt), loss {result['loss_pct']}%, "
        f"fps {result['fps']}, latency p50 {result['latency_p50_ms']} ms, gen core "
        f"{(busy or 0) * 100:.0f}%{'' if result['valid'] else ' [INVALID]'}"
    )


# --- simulcast ----------------------------------------------------------------------------------------------


def _chorus_room(server: Server, room: str) -> dict[str, Any] | None:
    """The room as Chorus's admin API shows it (dev mode: no token), or None."""
    base = server.url.replace("ws://", "http://", 1).removesuffix("/ws")
    try:
        with urllib.request.urlopen(f"{base}/api/rooms/{room}", timeout=5) as response:
            state: dict[str, Any] = json.loads(response.read())
            return state
    except (OSError, ValueError):
        return None


def simulcast_summary(video: list[dict[str, Any]], seconds: float, room: dict[str, Any] | None) -> dict[str, Any]:
    """
    Which layer each subscriber ended on. Seen by the subscriber: the picture height of the last keyframe it
    received, mapped to a layer (both servers). Seen by Chorus (``room``, its admin API): each video consumer's
    layer and the reason for it.
    """
    rids = [spec.rid for spec in SIMULCAST_LAYERS]
    by_height = {spec.height: spec.rid for spec in SIMULCAST_LAYERS}
    per_layer: dict[str, dict[str, Any]] = {
        rid: {"wanted": 0, "ended_on": 0, "fps": [], "kbps": []} for rid in rids}
    ended: Counter[str] = Counter()
    mismatched = 0
    for track in video:
        got = by_height.get(track.get("height") or 0, "none")
        ended[got] += 1
        wanted = track.get("wanted_layer")
        if wanted is not None:
            per_layer[rids[wanted]]["wanted"] += 1
            mismatched += got != rids[wanted]
        if got in per_layer:
            per_layer[got]["ended_on"] += 1
            per_layer[got]["fps"].append(track["frames"] / seconds)
            per_layer[got]["kbps"].append(track["bytes"] * 8 / seconds / 1000)
    layers = [{"rid": rid, "height": spec.height, "wanted": row["wanted"], "ended_on": row["ended_on"],
               "fps": _round(statistics.fmean(row["fps"]), 1) if row["fps"] else None,
               "kbps": _round(statistics.fmean(row["kbps"]), 0) if row["kbps"] else None}
              for (rid, row), spec in zip(per_layer.items(), SIMULCAST_LAYERS, strict=True)]
    out: dict[str, Any] = {"subscribers": len(video), "ended_on": dict(ended), "mismatched": mismatched,
                           "layers": layers}
    if room is not None:
        consumers = [c for p in room.get("participants", []) for c in (p.get("subscribe") or {}).get("consumers", [])
                     if c.get("kind") == "video"]
        out["server_layers"] = dict(Counter("none" if c.get("layer") is None else rids[c["layer"]]
                                            for c in consumers))
        out["server_reasons"] = dict(Counter(str(c.get("reason")) for c in consumers))
        publisher = next((t for p in room.get("participants", []) for t in (p.get("publish") or {}).get("tracks", [])
                          if len(t.get("layers") or []) > 1), None)
        if publisher is not None:
            out["publisher_layers"] = [{k: layer.get(k) for k in ("rid", "active", "bitrate", "height")}
                                       for layer in publisher["layers"]]
    return out
