"""What this process holds right now: the figures leak and churn checks compare."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_stats() -> dict[str, int]:
    """glibc's view of the C heap: bytes in use, free inside the heap, and in separate mmaps (empty elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"malloc_in_use_bytes": info.uordblks, "malloc_free_bytes": info.fordblks, "malloc_mmap_bytes": info.hblkhd}


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
        # Python's own allocator: blocks in use (every object, tracked by the collector or not)
        "python_blocks": sys.getallocatedblocks(),
        **_malloc_stats(),
    }
