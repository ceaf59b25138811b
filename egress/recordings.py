"""
The recordings folder: where recording egresses write, and what the HTTP API lists, serves and deletes.

Layout: ``{root}/{room}/{folder}/{file}``; ``folder`` is one recording egress (``20270115-080000-eg-1a2b3c4d5e6f``:
its start time in UTC and its id), ``file`` one track (``{participant}-{kind}-{n}.webm``) or the composite
(``composite.mp4``). Every part of a path that comes from a request is checked against
:data:`~chorus.sfu.ids.SAFE_NAME` (no ``.``/``..``, no separators, nothing URL-encoded) and the resolved path must
stay inside ``root``: a request can never name a file elsewhere.

Retention: files older than ``retention_days`` (0: forever) are deleted by :meth:`RecordingStore.sweep`, with the
folders they leave empty.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from chorus.egress.errors import EgressError
from chorus.egress.recorder import FORMATS, probe_duration
from chorus.sfu.ids import is_safe_name
from chorus.sfu.logs import PeerLogger

_log = PeerLogger(logging.getLogger("chorus.egress.recordings"))


@dataclass(frozen=True, slots=True)
class Recording:
    """One recording file, as the API lists it."""

    room: str
    folder: str
    name: str
    size: int
    duration: float | None
    modified: float

    @property
    def url(self) -> str:
        return f"/recordings/{self.room}/{self.folder}/{self.name}"

    def public(self) -> dict[str, object]:
        return {"room": self.room, "folder": self.folder, "name": self.name, "size": self.size,
                "duration": None if self.duration is None else round(self.duration, 3),
                "modified": self.modified, "url": self.url}


def check_name(kind: str, name: str) -> str:
    """:raises EgressError: ``bad_input`` if ``name`` is not a safe path segment."""
    if not isinstance(name, str) or not is_safe_name(name):
        raise EgressError("bad_input", f"{kind} {name!r} is not a valid name")
    return name


class RecordingStore:
    """
    The recordings folder (see the module docstring). Listing reads each file's duration (packet timestamps, no
    decoding) and caches it by size and modification time; call it off the event loop for large folders.
    """

    def __init__(self, root: Path, *, retention_days: float = 0.0, log: PeerLogger | None = None) -> None:
        self.root = root
        self.retention_days = retention_days
        self._log = log or _log
        self._durations: dict[Path, tuple[int, float, float | None]] = {}

    def folder_for(self, room: str, egress_id: str, started: float) -> Path:
        """The folder a new recording egress writes into."""
        check_name("room", room)
        check_name("egress id", egress_id)
        return self.root / room / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}-{egress_id}"

    def resolve(self, room: str, folder: str, name: str | None = None) -> Path:
        """
        The path of a recording (or of a recording folder, without ``name``), checked.

        :raises EgressError: ``bad_input`` for an unsafe name, ``not_found`` if it does not exist.
        """
        parts = [check_name("room", room), check_name("folder", folder)]
        if name is not None:
            parts.append(check_name("file", name))
        root = self.root.resolve()
        path = root.joinpath(*parts).resolve()
        if not path.is_relative_to(root) or path == root:
            raise EgressError("bad_input", "that path is outside the recordings folder")
        if not path.exists() or (name is not None and (not path.is_file() or path.suffix.lower() not in FORMATS)):
            raise EgressError("not_found", f"no recording {'/'.join(parts)}")
        return path

    def listing(self, room: str | None = None) -> list[Recording]:
        """Every recording file (of ``room``), oldest first, with size and duration."""
        if room is not None:
            check_name("room", room)
        out: list[Recording] = []
        if not self.root.is_dir():
            return out
        rooms = [self.root / room] if room is not None else sorted(p for p in self.root.iterdir() if p.is_dir())
        for room_dir in rooms:
            if not room_dir.is_dir() or not is_safe_name(room_dir.name):
                continue
            for folder in sorted(p for p in room_dir.iterdir() if p.is_dir() and is_safe_name(p.name)):
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix.lower() in FORMATS and is_safe_name(path.name):
                        stat = path.stat()
                        out.append(Recording(room_dir.name, folder.name, path.name, stat.st_size,
                                             self._duration(path, stat.st_size, stat.st_mtime), stat.st_mtime))
        return sorted(out, key=lambda r: (r.modified, r.room, r.folder, r.name))

    def _duration(self, path: Path, size: int, mtime: float) -> float | None:
        cached = self._durations.get(path)
        if cached is not None and cached[:2] == (size, mtime):
            return cached[2]
        duration = probe_duration(path)
        self._durations[path] = (size, mtime, duration)
        return duration

    def delete(self, room: str, folder: str, name: str | None = None) -> list[str]:
        """Delete one file, or a whole recording folder. Returns what was deleted (relative paths).

        :raises EgressError: ``bad_input``, ``not_found``, ``io_error``."""
        path = self.resolve(room, folder, name)
        try:
            if name is None:
                deleted = [f"{room}/{folder}/{p.name}" for p in sorted(path.iterdir())]
                shutil.rmtree(path)
            else:
                deleted = [f"{room}/{folder}/{name}"]
                path.unlink()
                self._remove_empty(path.parent)
        except OSError as exc:
            raise EgressError("io_error", f"cannot delete {room}/{folder}: {exc.strerror}") from exc
        self._log.info("recording deleted", room=room, folder=folder, name=name)
        return deleted

    def sweep(self, now: float | None = None, *, busy: set[Path] | frozenset[Path] = frozenset()) -> list[str]:
        """Delete recordings older than the retention (none when it is 0), except files in ``busy`` folders
        (egresses still writing). Returns what was deleted."""
        if self.retention_days <= 0 or not self.root.is_dir():
            return []
        limit = (now if now is not None else time.time()) - self.retention_days * 86400
        deleted: list[str] = []
        for recording in self.listing():
            folder = self.root / recording.room / recording.folder
            if recording.modified < limit and folder not in busy:
                try:
                    (folder / recording.name).unlink()
                    deleted.append(f"{recording.room}/{recording.folder}/{recording.name}")
                    self._remove_empty(folder)
                except OSError as exc:
                    self._log.warning("retention could not delete a recording", file=str(folder / recording.name),
                                      error=str(exc))
        if deleted:
            self._log.info("old recordings deleted", files=len(deleted), retention_days=self.retention_days)
        return deleted

    def _remove_empty(self, folder: Path) -> None:
        for directory in (folder, folder.parent):
            try:
                if directory != self.root and directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
            except OSError:
                return
