"""
``python -m chorus.bench.ingest``: glass-to-glass latency RTMP → Chromium viewer, and the CPU one ingested
stream costs, passthrough against re-encoding. About two minutes; prints a Markdown table and writes JSON to
``bench/results/ingest-<timestamp>.json``.

How: a publisher process draws each 640x360 frame with the wall-clock time (ms) as a 32-block barcode, encodes it
with libx264 (PyAV) and pushes it over RTMP (FFmpeg's RTMP muxer) with AAC audio. A Chorus process (dev mode,
RTMP on) puts it in a room; headless Debian Chromium joins the room page as a viewer and, for every frame it
presents (``requestVideoFrameCallback``), reads the barcode back and subtracts it from its own clock — the same
machine, so the same clock. Latency therefore covers capture → encoder → RTMP → Chorus → WebRTC → jitter
buffer → decode → presentation. The encodes:

* ``passthrough``: constrained baseline, ``tune=zerolatency`` (no B-frames, no lookahead) — forwarded as is;
* ``reencode (B-frames)``: x264 ``veryfast`` defaults (High, 3 B-frames, lookahead) — what OBS sends by default;
  Chorus re-encodes it (the encoder's own lookahead is part of the figure);
* ``reencode (High, no lookahead)``: High profile with ``tune=zerolatency``: Chorus re-encodes it only for the
  profile (the viewer is Chromium, which takes no High over WebRTC), so the difference with ``passthrough`` is
  the re-encoder's own latency.

CPU: with no viewer, the Chorus process's CPU time (the RTMP parsing, packetizing, AAC→Opus thread) and its
re-encode worker's, over a steady window, per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from fractions import Fraction
from pathlib import Path
from typing import Any

from .servers import CLK_TCK, ROOT, free_port

WIDTH, HEIGHT, FPS = 640, 360, 30
COLS, ROWS = 8, 4  # 32 blocks: the low 32 bits of the capture time in ms

ENCODES: dict[str, dict[str, Any]] = {
    "passthrough": {"profile": "baseline", "bframes": 0, "tune": "zerolatency"},
    "reencode (B-frames)": {"profile": "high", "bframes": 3, "tune": None},
    "reencode (High, no lookahead)": {"profile": "high", "bframes": 0, "tune": "zerolatency"},
}


# --- the publisher (a child process) ------------------------------------------------------------------------------


def publish(url: str, encode: str, seconds: float) -> None:
    """Draw, encode and push frames in real time (runs in its own process)."""
    import av
    import numpy as np

    options = ENCODES[encode]
    out = av.open(url, mode="w", format="flv")
    video = out.add_stream("libx264", rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.codec_context.gop_size = FPS
    video.codec_context.max_b_frames = options["bframes"]
    x264 = {"profile": options["profile"], "preset": "veryfast", "threads": "1"}
    if options["tune"]:
        x264["tune"] = options["tune"]
    video.codec_context.options = x264
    audio = out.add_stream("aac", rate=48000)
    audio.layout = "stereo"
    block_w, block_h = WIDTH // COLS, HEIGHT // ROWS
    t = np.arange(1024) / 48000
    start = time.monotonic()
    n = samples = 0
    while time.monotonic() - start < seconds:
        due = start + n / FPS
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        stamp = int(time.time() * 1000) & 0xFFFFFFFF
        planes = np.full((HEIGHT * 3 // 2, WIDTH), 128, dtype=np.uint8)  # yuv420p: luma, then chroma at grey
        planes[:HEIGHT] = 16
        for bit in range(32):
            if stamp >> bit & 1:
                row, col = divmod(bit, COLS)
                planes[row * block_h:(row + 1) * block_h, col * block_w:(col + 1) * block_w] = 235
        frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
        frame.pts, frame.time_base = n, Fraction(1, FPS)
        for packet in video.encode(frame):
            out.mux(packet)
        n += 1
        while samples < n * 48000 // FPS:  # keep audio up with video
            tone = (0.2 * np.sin(2 * np.pi * 440 * (samples / 48000 + t))).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(np.vstack([tone, tone]), format="fltp", layout="stereo")
            chunk.sample_rate, chunk.pts, chunk.time_base = 48000, samples, Fraction(1, 48000)
            for packet in audio.encode(chunk):
                out.mux(packet)
            samples += 1024
    out.close()


# --- the measuring side -------------------------------------------------------------------------------------------

READER = """(() => {
  const COLS = __COLS__, ROWS = __ROWS__;
  window.latencies = [];
  const canvas = document.createElement('canvas');
  const context = canvas.getContext('2d', { willReadFrequently: true });
  function watch(video) {
    const onFrame = (now) => {
      if (video.videoWidth) {
        canvas.width = video.videoWidth; canvas.height = video.videoHeight;
        context.drawImage(video, 0, 0);
        const bw = canvas.width / COLS, bh = canvas.height / ROWS;
        let stamp = 0;
        for (let bit = 31; bit >= 0; bit--) {
          const row = Math.floor(bit / COLS), col = bit % COLS;
          const px = context.getImageData(Math.floor((col + 0.5) * bw), Math.floor((row + 0.5) * bh), 1, 1).data;
          stamp = stamp * 2 + (px[0] + px[1] + px[2] > 384 ? 1 : 0);
        }
        const shown = (performance.timeOrigin + now) % 4294967296;
        const latency = (shown - stamp + 4294967296) % 4294967296;
        if (latency < 10000) window.latencies.push(latency);
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }
  const seen = new Set();
  setInterval(() => document.querySelectorAll('.tile.remote video').forEach((v) => {
    if (!seen.has(v)) { seen.add(v); watch(v); }
  }), 100);
})()""".replace("__COLS__", str(COLS)).replace("__ROWS__", str(ROWS))

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
]
#: The remote video's jitter buffer: (total delay s, frames emitted), from getStats.
JITTER = """async () => { let d = 0, n = 0; (await window.chorus.subscribePc.getStats()).forEach(r => {
  if (r.type === 'inbound-rtp' && r.kind === 'video') {
    d += r.jitterBufferDelay || 0; n += r.jitterBufferEmittedCount || 0;
  }
}); return [d, n]; }"""
NO_CAMERA = "navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('viewer', 'NotAllowedError'));"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def admin(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(base + "/api" + path, method=method,
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
        return json.loads(raw) if raw else None


class Server:
    def __init__(self, folder: Path) -> None:
        self.port, self.rtmp = free_port(), free_port()
        self.log = open(folder / "chorus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chorus.signaling", "serve", "--dev", "--port", str(self.port),
             "--rtmp-port", str(self.rtmp)], cwd=folder, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "CHORUS_INGRESS_STORE": str(folder / "ingresses.json"), "CHORUS_LOG_LEVEL": "warning"})
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chorus did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def start_publisher(url: str, encode: str, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "chorus.bench.ingest", "--publish", url, "--encode", encode,
                             "--seconds", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def latency(server: Server, encode: str, seconds: float) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    room = f"lat-{abs(hash(encode)) % 10000}"
    created = admin(server.base, "POST", "/ingress", {"kind": "rtmp", "room": room, "name": "encoder"})
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = await browser.new_context()
        await context.add_init_script(NO_CAMERA)
        page = await context.new_page()
        await page.goto(f"{server.base}/?room={room}&name=viewer")
        await page.wait_for_function("window.chorusReady === true", timeout=20000)
        await page.evaluate(READER)
        publisher = start_publisher(created["publish_url"], encode, seconds + 8)
        try:
            await asyncio.sleep(6)  # start-up: the first keyframe, the jitter buffer settling
            await page.evaluate("window.latencies = []")
            before = await page.evaluate(JITTER)
            await asyncio.sleep(seconds)
            values = sorted(await page.evaluate("window.latencies"))
            after = await page.evaluate(JITTER)
            mode = admin(server.base, "GET", f"/ingress/{created['id']}").get("media", {}).get("video", {}).get("mode")
        finally:
            publisher.kill()
            publisher.wait()
            await browser.close()
    admin(server.base, "DELETE", f"/ingress/{created['id']}")
    if not values:
        return {"encode": encode, "mode": mode, "frames": 0}
    emitted = after[1] - before[1]
    jitter_ms = round((after[0] - before[0]) / emitted * 1000) if emitted else None
    return {"encode": encode, "mode": mode, "frames": len(values), "fps": round(len(values) / seconds, 1),
            "jitter_buffer_ms": jitter_ms,
            "median_ms": round(statistics.median(values)), "p95_ms": round(values[int(len(values) * 0.95)]),
            "min_ms": round(values[0])}


async def cpu(server: Server, encode: str, seconds: float) -> dict[str, Any]:
    room = f"cpu-{abs(hash(encode)) % 10000}"
    created = admin(server.base, "POST", "/ingress", {"kind": "rtmp", "room": room, "name": "encoder"})
    publisher = start_publisher(created["publish_url"], encode, seconds + 8)
    try:
        await asyncio.sleep(5)
        kids0 = {k: cpu_seconds(k) for k in children(server.proc.pid)}
        main0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        aac0 = aac_seconds(admin(server.base, "GET", f"/ingress/{created['id']}"))
        await asyncio.sleep(seconds)
        kids1 = {k: cpu_seconds(k) for k in children(server.proc.pid)}
        main1, t1 = cpu_seconds(server.proc.pid), time.monotonic()
        described = admin(server.base, "GET", f"/ingress/{created['id']}")
        media = described.get("media", {})
        aac1 = aac_seconds(described)
    finally:
        publisher.kill()
        publisher.wait()
    admin(server.base, "DELETE", f"/ingress/{created['id']}")
    await asyncio.sleep(2)
    wall = t1 - t0
    return {"encode": encode, "mode": media.get("video", {}).get("mode"),
            "server_pct": round((main1 - main0) / wall * 100, 1),
            "reencoder_pct": round(sum(v - kids0.get(k, 0.0) for k, v in kids1.items()) / wall * 100, 1),
            "aac_to_opus_pct": round((aac1 - aac0) / wall * 100, 1),
            "bitrate": media.get("bitrate")}


def aac_seconds(ingress: dict[str, Any]) -> float:
    return float(((ingress.get("media") or {}).get("audio") or {}).get("transcode_cpu_seconds") or 0.0)


async def idle_cpu(server: Server, seconds: float) -> float:
    before, t0 = cpu_seconds(server.proc.pid), time.monotonic()
    await asyncio.sleep(seconds)
    return round((cpu_seconds(server.proc.pid) - before) / (time.monotonic() - t0) * 100, 1)


async def run(seconds: float, *, cpu_runs: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chorus-bench-ingest-") as folder:
        server = Server(Path(folder))
        try:
            result: dict[str, Any] = {"idle_server_pct": await idle_cpu(server, 3), "latency": [], "cpu": []}
            for encode in ENCODES:
                print(f"latency: {encode} …", file=sys.stderr, flush=True)
                result["latency"].append(await latency(server, encode, seconds))
            for encode in ENCODES if cpu_runs else ():
                print(f"cpu: {encode} …", file=sys.stderr, flush=True)
                result["cpu"].append(await cpu(server, encode, seconds))
        finally:
            server.stop()
    result["machine"] = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| stream | Chorus | frames/s | glass-to-glass median | p95 | min | Chromium's jitter buffer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["latency"]:
        lines.append(f"| {row['encode']} | {row['mode']} | {row.get('fps', 0)} | {row.get('median_ms', '–')} ms "
                     f"| {row.get('p95_ms', '–')} ms | {row.get('min_ms', '–')} ms "
                     f"| {row.get('jitter_buffer_ms')} ms |")
    lines += ["", "| stream (no viewer) | Chorus | Chorus process | of which AAC→Opus | re-encode worker | total |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in result["cpu"]:
        total = round(row["server_pct"] - result["idle_server_pct"] + row["reencoder_pct"], 1)
        lines.append(f"| {row['encode']} | {row['mode']} | {row['server_pct']} % | {row['aac_to_opus_pct']} % "
                     f"| {row['reencoder_pct']} % | {total} % of one core |")
    lines.append(f"\nidle Chorus process: {result['idle_server_pct']} %; machine: {result['machine']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m chorus.bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="measurement window per run (default 12)")
    parser.add_argument("--no-cpu", action="store_true", help="measure latency only")
    parser.add_argument("--publish", help=argparse.SUPPRESS)
    parser.add_argument("--encode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        publish(args.publish, args.encode, args.seconds)
        return
    result = asyncio.run(run(args.seconds, cpu_runs=not args.no_cpu))
    out = ROOT / "bench" / "results" / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\n(written to {out})", file=sys.stderr)


if __name__ == "__main__":
    main()
