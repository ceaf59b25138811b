"""
Structured logging: every media-plane log line names its room and peer.

A :class:`PeerLogger` binds ``room`` and ``peer`` once; each call adds more fields. Fields travel in the
record's ``chorus`` attribute, which :class:`KeyValueFormatter` and :class:`JsonFormatter` render.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any


class PeerLogger:
    """A logger bound to a room and (optionally) a peer."""

    __slots__ = ("_logger", "fields")

    def __init__(self, logger: logging.Logger | str, **fields: Any) -> None:
        self._logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.fields = fields

    def bind(self, **fields: Any) -> PeerLogger:
        return PeerLogger(self._logger, **{**self.fields, **fields})

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"chorus": {**self.fields, **fields}}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc_info=exc_info)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "chorus", {})


class KeyValueFormatter(logging.Formatter):
    """``2026-11-24T18:00:00Z INFO chorus.sfu.peer peer joined room=r1 peer=p-1a2b``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={v}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"ts", "level", "logger", "event", ...fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Install a stderr handler on the root logger with the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiortc/aioice are chatty at INFO about every ICE check.
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
