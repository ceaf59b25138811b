"""What this process holds right now: the figures leak and churn checks compare."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from chorus.sfu import census


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _udp_sockets(inodes: set[str]) -> int:
    count = 0
    for table in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        count += sum(1 for line in lines if line.split()[9] in inodes)
    return count


def snapshot() -> dict[str, Any]:
    """Counts of live media objects (after a full garbage collection), tasks, fds, UDP sockets and RSS."""
    counts = census.live_objects()
    inodes = _socket_inodes()
    rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return {
        **counts,
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
        "udp_sockets": _udp_sockets(inodes),
        "threads": len(os.listdir("/proc/self/task")),
        "rss_bytes": rss_pages * os.sysconf("SC_PAGE_SIZE"),
    }
