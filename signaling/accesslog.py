"""
The access log: one structured line per HTTP request, with secrets left out.

Query strings carry secrets (a room token opened as ``/?room=demo&token=...``, stream keys), and so does the
``Referer`` of every request a page makes. Only the values of :data:`SHOWN_PARAMETERS` are logged; every
other value is replaced by ``***``. Headers that carry credentials (``Authorization``, cookies) are never
logged at all.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .forwarded import client_address

#: Query parameters whose values are logged as they are (everything else is redacted).
SHOWN_PARAMETERS = frozenset({"room", "name", "scope", "ice", "simulcast", "mode", "v"})
REDACTED = "***"


def redact_query(query: str) -> str:
    """``room=r&token=abc`` → ``room=r&token=***`` (parameter names are kept, values outside the allow list
    are not)."""
    parts = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        shown = value if key in SHOWN_PARAMETERS else (REDACTED if value else "")
        parts.append(f"{quote(key, safe='')}={quote(shown, safe='*')}")
    return "&".join(parts)


def redact_url(url: str) -> str:
    """A path or absolute URL with its query redacted, and any user:password@ removed."""
    try:
        split = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = split.netloc.rsplit("@", 1)[-1]
    return urlunsplit((split.scheme, netloc, split.path, redact_query(split.query), ""))


class AccessLogger(AbstractAccessLogger):
    """``chorus.access`` lines: method, path (query redacted), status, size, duration, client, referer, agent."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logging.getLogger("chorus.access"), log_format)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        fields = {
            "method": request.method,
            "path": redact_url(request.path_qs),
            "status": response.status,
            "bytes": response.body_length,
            "ms": round(time * 1000, 1),
            "remote": client_address(request),
        }
        referer = request.headers.get("Referer")
        if referer:
            fields["referer"] = redact_url(referer)
        agent = request.headers.get("User-Agent")
        if agent:
            fields["agent"] = agent[:200]
        self.logger.info("request", extra={"chorus": fields})
