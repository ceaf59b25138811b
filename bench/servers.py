"""The servers under test as processes (pinned to a core), and what /proc says about them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import janus

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], cpu: int | None) -> tuple[list[str], Callable[[], None] | None]:
    """``cmd`` started on ``cpu`` only (taskset when present, else sched_setaffinity before exec)."""
    if cpu is None:
        return cmd, None
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *cmd], None
    return cmd, lambda: os.sched_setaffinity(0, {cpu})


# --- /proc --------------------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process, by ``"<tid> <name>"``."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[f"{tid} {name}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def process_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                v = [int(x) for x in values]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                total = sum(v[:8])
                out[int(name[3:])] = (total - idle, total)
    return out


def core_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], core: int) -> float | None:
    if core not in before or core not in after:
        return None
    busy = after[core][0] - before[core][0]
    total = after[core][1] - before[core][1]
    return busy / total if total > 0 else None


# --- servers ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    kind: str  # "chorus" | "janus" | "relay"
    proc: subprocess.Popen[bytes]
    url: str  # websocket URL clients use
    log_path: Path
    workdir: Path | None = None

    @property
    def pid(self) -> int:
        """The server's own process (not taskset, which execs it anyway)."""
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return process_rss_mb(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start ({url})") from None
            time.sleep(0.1)


def start_chorus(cpu: int | None, logdir: Path) -> Server:
    port = free_port()
    log_path = logdir / f"chorus-{port}.log"
    cmd, preexec = pinned([sys.executable, "-m", "chorus.signaling", "serve", "--host", "127.0.0.1",
                           "--port", str(port)], cpu)
    env = {
        **os.environ,
        "CHORUS_LOG_LEVEL": os.environ.get("CHORUS_BENCH_LOG_LEVEL", "warning"),
        "CHORUS_DEV_MODE": "1",
        # Every generator client comes from 127.0.0.1: lift the per-address join and connection limits, and
        # room size.
        "CHORUS_JOIN_RATE_PER_IP": "100000",
        "CHORUS_JOIN_BURST_PER_IP": "100000",
        "CHORUS_MAX_CONNECTIONS": "100000",
        "CHORUS_MAX_CONNECTIONS_PER_IP": "100000",
        "CHORUS_MAX_PEERS_PER_ROOM": "10000",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=preexec)
    server = Server("chorus", proc, f"ws://127.0.0.1:{port}/ws", log_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except RuntimeError:
        server.stop()
        raise RuntimeError(f"chorus did not start:\n{server.log_tail()}") from None
    return server


def start_relay(cpu: int | None, logdir: Path) -> Server:
    port = free_port()
    log_path = logdir / f"relay-{port}.log"
    cmd, preexec = pinned([sys.executable, "-m", "chorus.bench.relay_server", "--port", str(port)], cpu)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=preexec)
    server = Server("relay", proc, f"ws://127.0.0.1:{port}/ws", log_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except RuntimeError:
        server.stop()
        raise RuntimeError(f"relay server did not start:\n{server.log_tail()}") from None
    return server


def start_janus(cpu: int | None, logdir: Path) -> Server:
    binary = janus.janus_binary()
    if binary is None:
        raise RuntimeError("janus is not installed (apt-get install -y janus)")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="chorus-bench-janus-"))
    config = janus.write_config(workdir, port)
    log_path = logdir / f"janus-{port}.log"
    cmd, preexec = pinned([binary, "-F", str(workdir), "-C", str(config), "-o"], cpu)
    env = {**os.environ, "LD_PRELOAD": str(janus.loopback_shim())}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=preexec)
    server = Server("janus", proc, f"ws://127.0.0.1:{port}", log_path, workdir)
    try:
        asyncio.run(janus.wait_ready(server.url))
    except RuntimeError:
        server.stop()
        raise RuntimeError(f"janus did not start:\n{server.log_tail()}") from None
    return server


STARTERS = {"chorus": start_chorus, "janus": start_janus, "relay": start_relay}
