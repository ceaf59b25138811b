"""
Sampling profile of the server under load, with py-spy (``pip install py-spy``): collapsed stacks are kept
(``*.folded``: feed them to flamegraph.pl or speedscope) and summarised as the functions with the most
on-CPU samples, by self time and by inclusive time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


async def record(pid: int, seconds: float, out: Path, rate: int = 250) -> Path:
    """Sample ``pid`` for ``seconds`` into collapsed-stack file ``out``."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    proc = await asyncio.create_subprocess_exec(
        binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
        "--format", "raw", "--nonblocking", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    return out


def _short(file: str) -> str:
    """py-spy already shows paths relative to sys.path; shorten any absolute one that is left."""
    for marker in ("site-packages/", "/sfu/", "/signaling/", "/bench/"):
        if marker in file:
            return (marker.strip("/") + "/" if marker.startswith("/") else "") + file.split(marker, 1)[1]
    match = re.search(r"/lib/python3\.\d+/(.*)$", file)
    return match.group(1) if match else file


def _frame_key(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match.group('func')} ({_short(match.group('file'))})"


#: Frames every stack goes through (process start, the event loop turning): left out of "inclusive".
_PLUMBING = re.compile(
    r"^(_run_module_as_main|_run_code|<module>|main|run_app|run|Runner\.run|BaseEventLoop\.(run_forever|"
    r"run_until_complete|_run_once)|Handle\._run|Thread\.(_bootstrap|_bootstrap_inner|run)) "
)

#: Where a sample's leaf is, by file.
_COMPONENTS = (
    ("sfu (Chorus forwarding)", ("(sfu/",)),
    ("signaling (Chorus)", ("(signaling/",)),
    ("aiortc (RTP/RTCP/DTLS objects)", ("(aiortc/",)),
    ("aioice (ICE send/receive)", ("(aioice/",)),
    ("pylibsrtp (SRTP)", ("(pylibsrtp/",)),
    ("event loop + sockets (asyncio, selectors)", ("(asyncio/", "(selectors.py")),
    ("threads (queue, threading)", ("(threading.py", "(queue.py")),
)


def _component(frame: str) -> str:
    for name, markers in _COMPONENTS:
        if any(m in frame for m in markers):
            return name
    return "other"


def summarize(folded: Path, top: int = 15) -> dict[str, Any]:
    """Top functions by self and inclusive samples, as fractions of all samples; self time by component."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_key(f) for f in stack.split(";")]
        # py-spy puts process/thread names first; real frames carry "(file:line)".
        frames = [f for f in frames if f.endswith(")")]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        components[_component(frames[-1])] += count
        for key in set(frames):
            if not _PLUMBING.match(key):
                inclusive[key] += count
    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": k, "samples": v, "share": round(v / total, 4) if total else 0.0}
                for k, v in counter.most_common(top)]
    return {"samples": total, "self": rows(self_time), "inclusive": rows(inclusive),
            "components": rows(components)}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['samples']} on-CPU samples"]
    if summary.get("threads"):
        lines += ["", "CPU by thread (from /proc, CPU-s per s):"]
        lines += [f"  {t['cpu']:.3f}  {t['thread']}" for t in summary["threads"]]
    lines += ["", "self time by component:"]
    lines += [f"  {r['share'] * 100:5.1f}%  {r['function']}" for r in summary.get("components", [])]
    lines += ["", "self time (where the CPU is):"]
    lines += [f"  {r['share'] * 100:5.1f}%  {r['function']}" for r in summary["self"]]
    lines += ["", "inclusive time (what calls it):"]
    lines += [f"  {r['share'] * 100:5.1f}%  {r['function']}" for r in summary["inclusive"]]
    return "\n".join(lines)
