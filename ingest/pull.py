"""
URL pull: Chorus opens a stream itself — an IP camera's ``rtsp://``, an ``rtmp://`` server, an HLS playlist
(``http(s)://….m3u8``), or a file inside the configured media folder — with PyAV in a worker thread, and
delivers the same :mod:`.media` objects as the RTMP and SRT listeners.

Safety: only those schemes are accepted, and each is opened with an FFmpeg ``protocol_whitelist`` limited to
what it needs, so that a playlist or an SDP cannot make FFmpeg read local files or other protocols. File paths
are resolved (symlinks included) and must lie inside the media folder.

Resilience: when the source cannot be opened or drops, the puller waits and tries again with exponential
backoff and jitter (delay drawn from ``[c/2, c]`` with ``c = min(cap, base * 2**(attempt-1))``, the "equal
jitter" of AWS's "Exponential Backoff And Jitter": spread out, never a hot loop); the attempt count resets once
a connection has delivered media. A file is
played in real time and starts over at its end. Timestamps stay monotonic across reconnections (the new
connection continues after the old one, plus the wall-clock gap), so consumers never see time go backwards.

Lifecycle: *new* → *connecting* ⇄ *streaming* → (*backoff* → *connecting* …) → *stopped* (:meth:`PullSource.stop`)
or *failed* (``max_attempts`` consecutive failures, or a permanent error such as a forbidden path or an
unsupported codec). The sink gets ``ended`` once, at *stopped* or *failed*.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import av

from chorus.sfu.logs import PeerLogger

from .demux import run_demux
from .errors import ForbiddenPathError, IngestError, SourceError, UnsupportedMediaError
from .media import AudioFrame, EndReason, MediaItem, MediaSink, VideoAccessUnit

logger = logging.getLogger("chorus.ingest.pull")

#: scheme → FFmpeg protocols the source may use
_WHITELISTS = {
    "rtsp": "rtsp,rtp,udp,tcp",
    "rtsps": "rtsps,rtsp,rtp,udp,tcp,tls",
    "rtmp": "rtmp,tcp",
    "rtmps": "rtmps,rtmp,tcp,tls",
    "http": "http,tcp,hls,crypto",
    "https": "https,http,tcp,tls,hls,crypto",
    "file": "file",
}


@dataclass(frozen=True, slots=True)
class PullSettings:
    """
    :param media_root: the only folder files may be pulled from; ``None`` refuses every file.
    :param open_timeout, read_timeout: seconds one open / one read may block (also bounds how long
        :meth:`PullSource.stop` waits).
    :param max_attempts: consecutive failed attempts before giving up; ``None`` retries for ever.
    """

    media_root: Path | None = None
    open_timeout: float = 10.0
    read_timeout: float = 5.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    max_attempts: int | None = None
    rtsp_transport: str = "tcp"


@dataclass(frozen=True, slots=True)
class Source:
    """A checked source: what to hand to PyAV and with which options."""

    url: str
    scheme: str
    options: dict[str, str]

    @property
    def is_file(self) -> bool:
        return self.scheme == "file"


def resolve_source(url: str, media_root: Path | None) -> Source:
    """
    Check ``url`` and turn it into a :class:`Source`. A bare path or ``file:`` URL is resolved against
    ``media_root``.

    :raises ForbiddenPathError: a file outside ``media_root`` (``..``, absolute paths elsewhere, symlinks out),
        not a regular file, or files disabled.
    :raises SourceError: a scheme other than rtsp(s), rtmp(s), http(s) with an ``.m3u8`` path, or file.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if media_root is None:
            raise ForbiddenPathError("file sources are disabled (no media folder configured)")
        raw = parts.path if scheme == "file" else url
        root = media_root.resolve()
        path = (root / raw.lstrip("/")) if not Path(raw).is_absolute() else Path(raw)
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise ForbiddenPathError(f"{raw!r} is outside the media folder")
        if not resolved.is_file():
            raise ForbiddenPathError(f"{raw!r} is not a file in the media folder")
        return Source(str(resolved), "file", {"protocol_whitelist": _WHITELISTS["file"]})
    if scheme not in _WHITELISTS:
        raise SourceError(f"scheme {scheme!r} is not supported (rtsp, rtmp, http(s) .m3u8, file)")
    if scheme in ("http", "https") and not parts.path.lower().endswith(".m3u8"):
        raise SourceError("http(s) sources must be HLS playlists (.m3u8)")
    if not parts.hostname:
        raise SourceError(f"{url!r} has no host")
    options = {"protocol_whitelist": _WHITELISTS[scheme]}
    return Source(url, scheme, options)


class PullSource:
    """
    Pulls one URL into ``sink`` until stopped.

    :param on_state: called on the loop at each state change with the state name and the error that caused
        it (``None`` for *connecting*/*streaming*/*stopped*), for the admin API and metrics.
    :raises ForbiddenPathError, SourceError: (constructor) the URL is not acceptable.
    """

    def __init__(self, url: str, sink: MediaSink, *, settings: PullSettings | None = None, name: str = "",
                 on_state: Callable[[str, IngestError | None], None] | None = None) -> None:
        self.settings = settings or PullSettings()
        self.source = resolve_source(url, self.settings.media_root)
        if self.source.scheme.startswith("rtsp"):
            self.source = replace(self.source, options={**self.source.options,
                                                        "rtsp_transport": self.settings.rtsp_transport})
        self.sink = sink
        self.on_state = on_state
        self.name = name or url
        self.state = "new"
        self.last_error: IngestError | None = None
        self.connections = 0
        self.log = PeerLogger(logger, ingress="pull", source=self.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rng = random.Random()
        # timeline continuity across connections (see the module docstring)
        self._offset = 0
        self._last_ts: int | None = None
        self._last_wall = 0.0

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"pull {self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop pulling; returns once the worker has ended (within ``read_timeout``) and the sink has ended."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            await asyncio.sleep(0)  # let the final callbacks (state, ended) run

    # --- worker thread --------------------------------------------------------------------------------------------

    def _call(self, function: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(function, *args)

    def _set_state(self, state: str, error: IngestError | None = None) -> None:
        self.state = state
        if error is not None:
            self.last_error = error
        if self.on_state is not None:
            self._call(self.on_state, state, error)

    def _run(self) -> None:
        attempt = 0
        reason = EndReason("stopped", "pulling was stopped")
        while not self._stop.is_set():
            self._set_state("connecting")
            delivered = [False]
            try:
                self._pull_once(delivered)
                if self._stop.is_set():
                    break
                raise SourceError("the source ended" if not self.source.is_file else "end of file")
            except (ForbiddenPathError, UnsupportedMediaError) as e:
                reason = EndReason.from_error(e)
                self._set_state("failed", e)
                break
            except IngestError as e:
                error: IngestError = e
            except av.FFmpegError as e:
                error = SourceError(f"{type(e).__name__}: {e}")
            except Exception as e:  # PyAV/FFmpeg can raise plain OSError and friends
                error = SourceError(f"{type(e).__name__}: {e}")
            if self._stop.is_set():
                break
            if delivered[0]:
                attempt = 0
            attempt += 1
            if self.settings.max_attempts is not None and attempt > self.settings.max_attempts:
                reason = EndReason.from_error(error)
                self._set_state("failed", error)
                break
            delay = 0.0 if (self.source.is_file and delivered[0]) else self._backoff(attempt)
            self.log.info("pull source lost, retrying", error=error.code, detail=error.reason, attempt=attempt,
                          delay=round(delay, 2))
            self._set_state("backoff", error)
            self._stop.wait(delay)
        if reason.code == "stopped":
            self._set_state("stopped")
        self.log.info("pull ended", reason=reason.code)
        self._call(self._ended, reason)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** (attempt - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    def _ended(self, reason: EndReason) -> None:
        try:
            self.sink.ended(reason)
        except Exception:
            self.log.error("sink.ended failed", exc_info=True)

    def _pull_once(self, delivered: list[bool]) -> None:
        settings = self.settings
        wall_start = time.monotonic()
        first_ts: list[int | None] = [None]
        if self._last_ts is not None:  # continue after the previous connection, plus the time we were away
            gap = int((time.monotonic() - self._last_wall) * 1000)
            self._offset = self._last_ts + max(gap, 1)
        with av.open(self.source.url, mode="r", options=self.source.options,
                     timeout=(settings.open_timeout, settings.read_timeout)) as container:
            self.connections += 1
            self.log.info("pull connected", connection=self.connections)
            self._set_state("streaming")

            def deliver(item: MediaItem) -> None:
                item = self._shift(item)
                ts = _timestamp(item)
                if ts is not None:
                    origin = first_ts[0] = ts if first_ts[0] is None else first_ts[0]
                    # real-time pacing: never run ahead of the wall clock (files, HLS backlogs)
                    ahead = (ts - origin) / 1000 - (time.monotonic() - wall_start)
                    if ahead > 0.005:
                        self._stop.wait(ahead)
                    self._last_ts, self._last_wall = ts, time.monotonic()
                    delivered[0] = True
                self._call(self.sink.media, item)

            run_demux(container, deliver, self._stop.is_set)

    def _shift(self, item: MediaItem) -> MediaItem:
        if not self._offset:
            return item
        if isinstance(item, VideoAccessUnit):
            return replace(item, pts_ms=item.pts_ms + self._offset, dts_ms=item.dts_ms + self._offset)
        if isinstance(item, AudioFrame):
            return replace(item, pts_ms=item.pts_ms + self._offset)
        return item


def _timestamp(item: MediaItem) -> int | None:
    if isinstance(item, VideoAccessUnit):
        return item.dts_ms
    if isinstance(item, AudioFrame):
        return item.pts_ms
    return None

