"""
The ramp figure: how fast a real browser's encoder is allowed to reach its bit rate, publishing into Chorus and
into Janus VideoRoom, one after the other in the same run.

A Debian Chromium with a 640x480 fake camera at 30 fps (``--use-fake-device-for-media-stream=fps=30``) publishes
audio and one video encoding, driven by a small script in a blank page served on loopback by the bench (a secure
context, so the camera is allowed; a page Playwright answers itself has no address, and Chromium's local network
access checks then refuse its websocket to 127.0.0.1): for Chorus its own protocol (``join``, ``publish``,
``trickle``), for Janus its websocket API (create a session, attach the VideoRoom plugin, join as a publisher,
``configure`` with the page's offer, apply the answer, trickle, keepalive). Both negotiate transport-wide
congestion control (Janus: ``transport_wide_cc_ext``, its default, set explicitly; no room bit rate cap, so
Janus sends no REMB), so the browser's own estimator drives the encoder from the feedback each server sends.

The page samples ``outbound-rtp`` every 100 ms: ``targetBitrate``, ``qualityLimitationReason``, frame height and
rate. Time zero is ICE connected. Figures: the final target (mean over the last second), the *ramp time* — when
the target first reached 90 % of that final value — and when it first reached 1 Mbps; with, as for the load runs,
how busy other processes kept the server's core (a server that stamps arrival times late, because its core is
shared, reports queuing delay that is not on the network, and the browser backs off). A round in which the
encoder was limited by ``cpu`` at any point says more about this machine than about the server: it is void, and
repeated (at most :data:`MAX_ATTEMPTS` times per round).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from . import janus, servers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Headless Debian Chromium with a 30 fps fake camera (as tests/harness.py).
FLAGS = [
    "--headless=new", "--no-sandbox", "--use-fake-device-for-media-stream=fps=30", "--use-fake-ui-for-media-stream",
    "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
]
PAGE = "<!doctype html><title>chorus bench ramp</title>"
#: Seconds observed after ICE connected.
DURATION = 12.0
#: Rounds per run, each publishing into every server in turn; the figures are the medians.
ROUNDS = 3
#: The final target is the mean over this last part of the window (seconds).
FINAL_WINDOW = 1.0
#: Tries per round when the encoder was CPU-limited.
MAX_ATTEMPTS = 3
#: The issue's other figure: 1 Mbps.
ONE_MBPS = 1_000_000

Progress = Callable[[str], None]

DRIVER_JS = r"""
window.bench = (() => {
  const b = {series: [], connectedAt: null, startedAt: performance.now(), errors: [], pc: null};
  let ws, nextId = 1;
  const pending = new Map();

  function sample() {
    const pc = b.pc;
    if (!pc) return;
    pc.getStats().then((stats) => {
      stats.forEach((r) => {
        if (r.type === 'outbound-rtp' && r.kind === 'video') {
          b.series.push([performance.now(), r.targetBitrate || 0, r.qualityLimitationReason || '',
                         r.frameHeight || 0, r.framesPerSecond || 0, r.bytesSent || 0]);
        }
      });
    }).catch((e) => b.errors.push(String(e)));
  }

  async function camera() {
    const stream = await navigator.mediaDevices.getUserMedia(
      {audio: true, video: {width: {ideal: 640}, height: {ideal: 480}, frameRate: 30}});
    const pc = new RTCPeerConnection({bundlePolicy: 'max-bundle'});
    pc.addEventListener('iceconnectionstatechange', () => {
      if ((pc.iceConnectionState === 'connected' || pc.iceConnectionState === 'completed') && b.connectedAt === null)
        b.connectedAt = performance.now();
    });
    for (const track of stream.getTracks()) pc.addTransceiver(track, {direction: 'sendonly', streams: [stream]});
    b.pc = pc;
    setInterval(sample, 100);
    return pc;
  }

  function open(url, protocol) {
    ws = protocol ? new WebSocket(url, protocol) : new WebSocket(url);
    return new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error('ws error')); });
  }

  // Chorus: {type: 'req', id, method, data} → {type: 'res', id, ok, data | error}.
  b.chorus = async (url, room) => {
    await open(url);
    ws.onmessage = (m) => {
      const msg = JSON.parse(m.data);
      if (msg.type !== 'res') return;
      const p = pending.get(msg.id); pending.delete(msg.id);
      if (p) msg.ok ? p.resolve(msg.data) : p.reject(new Error(msg.error.code + ': ' + msg.error.reason));
    };
    const request = (method, data = {}) => new Promise((resolve, reject) => {
      const id = nextId++;
      pending.set(id, {resolve, reject});
      ws.send(JSON.stringify({type: 'req', id, method, data}));
    });
    await request('join', {v: 1, room, name: 'ramp'});
    const pc = await camera();
    pc.onicecandidate = (e) => e.candidate && request('trickle', {target: 'publish', candidate: e.candidate});
    await pc.setLocalDescription(await pc.createOffer());
    const answer = await request('publish', {type: 'offer', sdp: pc.localDescription.sdp});
    await pc.setRemoteDescription({type: 'answer', sdp: answer.sdp});
  };

  // Janus: {janus, transaction, session_id?, handle_id?}; plugin messages are acked, then answered by an event.
  b.janus = async (url, room) => {
    await open(url, 'janus-protocol');
    ws.onmessage = (m) => {
      const msg = JSON.parse(m.data);
      const p = pending.get(msg.transaction);
      if (!p) return;
      if (msg.janus === 'ack' && !p.ackIsAnswer) return;
      pending.delete(msg.transaction);
      const error = msg.error || (msg.plugindata && msg.plugindata.data && msg.plugindata.data.error);
      error ? p.reject(new Error(JSON.stringify(error))) : p.resolve(msg);
    };
    let session, handle;
    const call = (body, ackIsAnswer = false) => new Promise((resolve, reject) => {
      const transaction = 't' + nextId++;
      pending.set(transaction, {resolve, reject, ackIsAnswer});
      const msg = Object.assign({transaction}, body);
      if (session) msg.session_id = session;
      if (handle) msg.handle_id = handle;
      ws.send(JSON.stringify(msg));
    });
    session = (await call({janus: 'create'})).data.id;
    setInterval(() => call({janus: 'keepalive'}, true).catch(() => {}), 25000);
    handle = (await call({janus: 'attach', plugin: 'janus.plugin.videoroom'})).data.id;
    await call({janus: 'message', body: {request: 'join', ptype: 'publisher', room, display: 'ramp'}});
    const pc = await camera();
    pc.onicecandidate = (e) => call({janus: 'trickle', candidate: e.candidate || {completed: true}}, true)
      .catch((err) => b.errors.push(String(err)));
    await pc.setLocalDescription(await pc.createOffer());
    const answer = await call({janus: 'message', body: {request: 'configure', audio: true, video: true},
                               jsep: {type: 'offer', sdp: pc.localDescription.sdp}});
    await pc.setRemoteDescription(answer.jsep);
  };

  b.read = () => ({connectedAt: b.connectedAt, series: b.series, errors: b.errors,
                   negotiated: b.pc && b.pc.remoteDescription
                     ? b.pc.remoteDescription.sdp.includes('transport-cc') : null});
  return b;
})();
"""


def chromium_available() -> bool:
    return os.path.exists(CHROMIUM)


def analyse(connected_at: float, series: list[list[Any]], duration: float = DURATION) -> dict[str, Any]:
    """
    Figures of one round from the page's samples (``[ms, targetBitrate, limitation, height, fps, bytesSent]``,
    ``performance.now()`` times) and the time ICE connected (ms, same clock).
    """
    samples = [((s[0] - connected_at) / 1000, int(s[1]), str(s[2]), int(s[3]), float(s[4])) for s in series
               if s[0] >= connected_at - 1]
    samples = [s for s in samples if s[0] <= duration + 0.2]
    if not samples:
        return {"error": "no outbound-rtp samples after ICE connected"}
    end = samples[-1][0]
    last = [s[1] for s in samples if s[0] >= end - FINAL_WINDOW]
    final = statistics.fmean(last)
    ramp = next((s[0] for s in samples if s[1] >= 0.9 * final and final > 0), None)
    mbps = next((s[0] for s in samples if s[1] >= ONE_MBPS), None)
    cpu = [s[0] for s in samples if s[2] == "cpu"]
    # The series in JSON: every 0.5 s (s, kbps, limitation, height).
    series_out = []
    next_at = 0.0
    for s in samples:
        if s[0] >= next_at:
            series_out.append([round(s[0], 2), round(s[1] / 1000), s[2], s[3]])
            next_at = round(s[0] / 0.5 + 1) * 0.5
    reasons: dict[str, float] = {}
    for a, b in zip(samples, samples[1:], strict=False):
        reasons[a[2] or "none"] = reasons.get(a[2] or "none", 0.0) + (b[0] - a[0])
    return {
        "final_kbps": round(final / 1000),
        "ramp_s": None if ramp is None else round(max(ramp, 0.0), 2),
        "to_1mbps_s": None if mbps is None else round(max(mbps, 0.0), 2),
        "max_kbps": round(max(s[1] for s in samples) / 1000),
        "final_height": samples[-1][3],
        "final_fps": round(samples[-1][4], 1),
        "limitation_s": {k: round(v, 1) for k, v in reasons.items()},
        "cpu_limited_at_s": round(cpu[0], 2) if cpu else None,
        "observed_s": round(end, 2),
        "series": series_out,
    }


async def _round(browser: Any, page_url: str, kind: str, options: Any, logdir: Path, duration: float
                 ) -> dict[str, Any]:
    """One publish into a fresh server of ``kind``; its figures."""
    server: servers.Server | None = None
    context = None
    try:
        server = await asyncio.to_thread(servers.STARTERS[kind], options.server_cpu, logdir)
        if kind == "janus":
            room: Any = 2000 + os.getpid() % 1000
            await janus.create_room(server.url, room, 1)
        else:
            room = f"bench-ramp-{os.getpid()}-{time.monotonic_ns() % 100000}"
        context = await browser.new_context(viewport={"width": 640, "height": 480})
        page = await context.new_page()
        await page.goto(page_url)
        await page.evaluate(DRIVER_JS)
        await page.evaluate(f"bench.{kind}({json.dumps(server.url)}, {json.dumps(room)})")
        deadline = time.monotonic() + 15
        while (state := await page.evaluate("bench.read()"))["connectedAt"] is None:
            if time.monotonic() > deadline:
                return {"server": kind, "error": f"ICE not connected within 15 s ({state['errors'][:3]})"}
            await asyncio.sleep(0.1)
        cores0, cpu0, t0 = servers.core_times(), server.cpu_seconds(), time.monotonic()
        await asyncio.sleep(duration + 0.3)
        state = await page.evaluate("bench.read()")
        server_cpu = (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        result = {"server": kind, "transport_cc": state["negotiated"], **analyse(state["connectedAt"],
                                                                                 state["series"], duration)}
        # The server stamps arrival times for its feedback: other processes on its core look like queuing delay.
        busy = servers.core_busy(cores0, servers.core_times(), options.server_cpu) \
            if options.server_cpu is not None else None
        result["server_cpu"] = round(server_cpu, 3)
        if busy is not None:
            result["server_core_other_load"] = round(max(busy - server_cpu, 0.0), 3)
        if state["errors"]:
            result["page_errors"] = state["errors"][:5]
        return result
    except Exception as exc:  # noqa: BLE001 - a failed round is reported, the bench goes on
        return {"server": kind, "error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        if context is not None:
            await context.close()
        if server is not None:
            await asyncio.to_thread(server.stop)


async def run(kinds: list[str], options: Any, progress: Progress, logdir: Path, *, rounds: int = ROUNDS,
              duration: float = DURATION) -> dict[str, Any]:
    """
    ``rounds`` rounds, each publishing into every server of ``kinds`` in turn (Chorus, Janus, Chorus, …); a void
    attempt (CPU-limited encoder) is repeated. Returns the rounds and, per server, the median figures.
    """
    if not chromium_available():
        return {"skipped": f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"}
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        return {"skipped": "playwright is not installed (pip install playwright; the browser is Debian's)"}
    attempts: list[dict[str, Any]] = []
    app = web.Application()

    async def blank(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app.router.add_get("/", blank)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = servers.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    page_url = f"http://127.0.0.1:{port}/"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            for n in range(1, rounds + 1):
                for kind in kinds:
                    for attempt in range(1, MAX_ATTEMPTS + 1):
                        result = await _round(browser, page_url, kind, options, logdir, duration)
                        result.update({"round": n, "attempt": attempt})
                        result["void"] = result.get("cpu_limited_at_s") is not None
                        attempts.append(result)
                        if "error" in result:
                            progress(f"ramp {kind} round {n}: FAILED {result['error'][:200]}")
                            break
                        other = result.get("server_core_other_load")
                        line = (f"ramp {kind} round {n}: 90 % of {result['final_kbps']} kbps at {result['ramp_s']} s, "
                                f"1 Mbps at {result['to_1mbps_s']} s (transport-cc {result['transport_cc']}"
                                + ("" if other is None else f", other load on the server's core {other * 100:.0f}%")
                                + ")")
                        if not result["void"]:
                            progress(line)
                            break
                        progress(f"{line} — VOID: the encoder was CPU-limited at {result['cpu_limited_at_s']} s "
                                 f"(qualityLimitationReason 'cpu'); " + ("repeating" if attempt < MAX_ATTEMPTS
                                                                         else "no attempts left"))
        finally:
            await browser.close()
            await runner.cleanup()
    summary: dict[str, Any] = {}
    for kind in kinds:
        valid = [a for a in attempts if a["server"] == kind and "error" not in a and not a["void"]]
        ramps = [a["ramp_s"] for a in valid if a["ramp_s"] is not None]
        # A round that never reached 1 Mbps counts as slower than any that did.
        mbps = sorted(math.inf if a["to_1mbps_s"] is None else a["to_1mbps_s"] for a in valid)
        mbps_median = statistics.median(mbps) if mbps else None
        summary[kind] = {
            "rounds": len(valid),
            "void": sum(1 for a in attempts if a["server"] == kind and a.get("void")),
            "failed": sum(1 for a in attempts if a["server"] == kind and "error" in a),
            "ramp_s": round(statistics.median(ramps), 2) if ramps else None,
            "to_1mbps_s": None if mbps_median is None or math.isinf(mbps_median) else round(mbps_median, 2),
            "reached_1mbps": sum(1 for x in mbps if not math.isinf(x)),
            "final_kbps": round(statistics.median(a["final_kbps"] for a in valid)) if valid else None,
            "server_core_other_load": round(max(a.get("server_core_other_load") or 0.0 for a in valid), 3)
            if valid else None,
        }
    return {"duration_s": duration, "rounds": rounds, "attempts": attempts, "summary": summary}
