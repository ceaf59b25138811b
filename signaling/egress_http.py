"""
HTTP routes of egress (see docs/egress.md): HLS and DASH of rooms, the viewer page, recording downloads.

- ``GET /hls/{room}/index.m3u8`` — the master playlist of the room's HLS egress (its newest running one);
  ``/hls/{room}/{rendition}/index.m3u8`` its media playlists (LL-HLS blocking reload with ``_HLS_msn`` and
  ``_HLS_part``), ``/hls/{room}/{rendition}/init.mp4``, ``…/seg{N}.m4s``, ``…/seg{N}.{i}.m4s``. Another egress of
  the same room: ``/hls/{room}/{egress_id}/…``.
- ``GET /dash/{room}/index.mpd`` and ``/dash/{room}/{egress_id}/index.mpd`` — the MPD of the same files (its
  ``BaseURL`` points at ``/hls/…``).
- ``GET /recordings/{room}/{folder}/{file}`` — a recording, with HTTP range requests (``206 Partial Content``).
- ``GET /live?room=R`` — the viewer page (hls.js, served from ``/vendor/hls.js/``).

Every path segment a request names is checked (safe names only: ``..``, ``.``, separators and anything
URL-encoded are refused with 400) and nothing is read from disk but recordings, resolved inside their folder.
Access: an egress that is ``public`` is readable by anyone; otherwise a room token (``?token=`` or
``Authorization: Bearer``) granting the room, or an admin token, is needed, and playlists served to a request
with ``?token=`` carry it on every URI they list, so a player needs no configuration. Responses carry CORS
headers and ``Cache-Control`` a CDN honours: playlists and manifests for one second (a blocking request's URL is
unique, so its answer may be cached), segments and parts for a day (they never change); errors are never cached.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from chorus.egress.errors import EgressError
from chorus.egress.manager import EgressManager, HlsEgress
from chorus.egress.playlist import (
    CONTENT_TYPES,
    INIT_NAME,
    PLAYLIST_NAME,
    Rendition,
    cache_control,
    parse_blocking_query,
    parse_media_name,
)
from chorus.sfu.errors import ChorusError
from chorus.sfu.ids import is_safe_name

from .auth import Verify, forbidden

EGRESS = web.AppKey("egress", EgressManager)
EGRESS_VERIFY: web.AppKey[Verify] = web.AppKey("egress_verify")

STATUS = {"bad_input": 400, "bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
          "invalid_state": 409, "unsupported_codec": 415, "limit_exceeded": 429, "worker_failed": 502,
          "timeout": 503, "unavailable": 503, "io_error": 507}
#: How long a blocking playlist request may wait, in target durations (rfc8216bis §6.2.5.2 suggests 3).
BLOCK_TARGETS = 3
_EGRESS_ID = re.compile(r"eg-[0-9a-f]{12}")
_URI_LINE = re.compile(r'(URI=")([^"]+)(")')

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Range",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range, Accept-Ranges",
    "Access-Control-Max-Age": "86400",
}


def error_response(code: str, reason: str) -> web.Response:
    """A JSON error that no cache keeps (a segment that does not exist *yet* must not stay a 404 in a CDN)."""
    return web.json_response({"error": {"code": code, "reason": reason}}, status=STATUS.get(code, 500),
                             headers={**CORS, "Cache-Control": "no-store"})


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header.removeprefix("Bearer ").strip()
    return request.query.get("token")


def check_access(request: web.Request, room: str) -> None:
    """A room token for ``room`` (able to subscribe) or an admin token. :raises AuthError:"""
    grants = request.app[EGRESS_VERIFY](_token(request))
    if grants.admin:
        return
    grants.check_room(room)
    if not grants.can_subscribe:
        raise forbidden("the token does not grant viewing this room")


def _with_token(text: str, token: str | None, *, mpd: bool = False) -> str:
    """Every URI a playlist or MPD lists, with ``?token=`` appended (relative URIs drop the page's query)."""
    if not token:
        return text
    suffix = "token=" + quote(token, safe="")
    if mpd:
        for attr in ('initialization="', 'media="'):
            text = re.sub(rf'({attr})([^"]+)(")', lambda m: f"{m.group(1)}{m.group(2)}?{suffix}{m.group(3)}", text)
        return text
    lines = []
    for line in text.split("\n"):
        if line and not line.startswith("#"):
            line = f"{line}{'&' if '?' in line else '?'}{suffix}"
        elif "URI=" in line:
            line = _URI_LINE.sub(lambda m: f"{m.group(1)}{m.group(2)}?{suffix}{m.group(3)}", line)
        lines.append(line)
    return "\n".join(lines)


def _respond(body: bytes, name: str, *, cache: str | None = None) -> web.Response:
    suffix = name[name.rfind("."):] if "." in name else ""
    return web.Response(body=body, content_type=CONTENT_TYPES.get(suffix, "application/octet-stream"),
                        headers={**CORS, "Cache-Control": cache or cache_control(name)})


def _split(tail: str) -> list[str]:
    """The path segments after the room, each checked. :raises EgressError: ``bad_input``."""
    parts = tail.split("/") if tail else []
    if not parts or len(parts) > 3 or not all(is_safe_name(p) for p in parts):
        raise EgressError("bad_input", "not a valid HLS path")
    return parts


async def hls(request: web.Request) -> web.StreamResponse:
    """``/hls/{room}/…``: playlists, init segments, segments and parts of the room's egresses."""
    try:
        room = request.match_info["room"]
        if not is_safe_name(room):
            raise EgressError("bad_input", "not a valid room name")
        parts = _split(request.match_info["tail"])
        egress_id = parts[0] if _EGRESS_ID.fullmatch(parts[0]) else None
        if egress_id is not None:
            parts = parts[1:]
        egress = request.app[EGRESS].hls(room, egress_id)
        if egress is None:
            raise EgressError("not_found", f"room {room!r} has no HLS egress" + (f" {egress_id}" if egress_id else ""))
        if not egress.public:
            check_access(request, room)
        token = request.query.get("token")
        if parts == [PLAYLIST_NAME]:
            master = egress.output.master()
            if master is None:
                raise EgressError("not_found", "the stream has not started yet")
            return _respond(_with_token(master, token).encode(), PLAYLIST_NAME)
        if len(parts) != 2:
            raise EgressError("not_found", "no such file")
        rendition = egress.output.rendition(parts[0])
        if rendition is None:
            raise EgressError("not_found", f"no rendition {parts[0]!r}")
        if parts[1] == PLAYLIST_NAME:
            return await _media_playlist(request, egress, rendition, token)
        return await _media_file(egress, rendition, parts[1])
    except ChorusError as exc:
        return error_response(exc.code, exc.reason)


async def _media_playlist(request: web.Request, egress: HlsEgress, rendition: Rendition,
                          token: str | None) -> web.Response:
    msn, part = parse_blocking_query(request.query)
    cache = None
    if msn is not None:
        if rendition.part_duration is None and part is not None:
            raise EgressError("bad_request", "_HLS_part on a playlist without parts")
        await rendition.reload.wait(msn, part, BLOCK_TARGETS * egress.settings.segment)
        # The URL names the playlist version: a CDN may keep it (rfc8216bis §6.2.5.2, "Caching").
        cache = f"public, max-age={max(1, round(6 * egress.settings.segment))}"
    return _respond(_with_token(rendition.playlist(), token).encode(), PLAYLIST_NAME, cache=cache)


async def _media_file(egress: HlsEgress, rendition: Rendition, name: str) -> web.Response:
    if name != INIT_NAME and parse_media_name(name) is None:
        raise EgressError("not_found", "no such file")
    try:
        data = await rendition.get_blocking(name, BLOCK_TARGETS * egress.settings.segment)
    except EgressError as exc:
        if exc.code != "bad_request":
            raise
        data = None  # far beyond the live edge: it does not exist
    if data is None:
        raise EgressError("not_found", f"{rendition.name}/{name} does not exist")
    return _respond(data, name)


async def dash(request: web.Request) -> web.StreamResponse:
    """``/dash/{room}/index.mpd`` and ``/dash/{room}/{egress_id}/index.mpd``."""
    try:
        room = request.match_info["room"]
        if not is_safe_name(room):
            raise EgressError("bad_input", "not a valid room name")
        parts = _split(request.match_info["tail"])
        egress_id = parts[0] if len(parts) == 2 and _EGRESS_ID.fullmatch(parts[0]) else None
        if parts[-1] != "index.mpd" or len(parts) != (2 if egress_id else 1):
            raise EgressError("not_found", "the MPD is index.mpd")
        egress = request.app[EGRESS].hls(room, egress_id)
        if egress is None:
            raise EgressError("not_found", f"room {room!r} has no HLS/DASH egress")
        if not egress.public:
            check_access(request, room)
        mpd = egress.output.mpd()
        if mpd is None:
            raise EgressError("not_found", "the stream has not started yet")
        return _respond(_with_token(mpd, request.query.get("token"), mpd=True).encode(), "index.mpd")
    except ChorusError as exc:
        return error_response(exc.code, exc.reason)


async def recording(request: web.Request) -> web.StreamResponse:
    """``/recordings/{room}/{folder}/{file}``: a recording file, range requests answered with 206."""
    try:
        room, folder, name = (request.match_info[k] for k in ("room", "folder", "name"))
        if not all(is_safe_name(p) for p in (room, folder, name)):
            raise EgressError("bad_input", "not a valid recording path")
        check_access(request, room)
        path = request.app[EGRESS].store.resolve(room, folder, name)
    except ChorusError as exc:
        return error_response(exc.code, exc.reason)
    content_type = {".webm": "video/webm", ".mp4": "video/mp4", ".mkv": "video/x-matroska"}[path.suffix.lower()]
    return web.FileResponse(path, headers={**CORS, "Cache-Control": "private, max-age=0",
                                           "Content-Type": content_type})


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS)


def live_page(web_root: Callable[[], Path]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(web_root() / "live.html")

    return handler


def add_routes(app: web.Application, manager: EgressManager, verify: Verify, web_root: Callable[[], Path]) -> None:
    """Mount the egress routes on ``app``."""
    app[EGRESS] = manager
    app[EGRESS_VERIFY] = verify
    app.router.add_get("/hls/{room}/{tail:.*}", hls)
    app.router.add_get("/dash/{room}/{tail:.*}", dash)
    app.router.add_get("/recordings/{room}/{folder}/{name}", recording)
    for prefix in ("/hls/{room}/{tail:.*}", "/dash/{room}/{tail:.*}", "/recordings/{room}/{folder}/{name}"):
        app.router.add_route("OPTIONS", prefix, preflight)
    app.router.add_get("/live", live_page(web_root))


__all__ = ["EGRESS", "add_routes", "check_access", "error_response"]
