"""
The signaling envelope (see docs/signaling.md): parsing requests, building responses and notifications,
and validating request data. Everything a client can get wrong becomes a :class:`ProtocolError` with a
stable code.
"""

from __future__ import annotations

import json
import re
from typing import Any

from chorus.sfu.errors import ChorusError
from chorus.sfu.ids import SAFE_NAME

PROTOCOL_VERSION = 1
MAX_ID = 2**53 - 1
#: Room names are safe path segments (rooms name HLS URLs and recording folders): never ``.``, ``..`` or a name
#: starting with a dot, nothing that needs URL encoding (``chorus.sfu.ids.SAFE_NAME``).
ROOM_RE = re.compile(rf"{SAFE_NAME.pattern}\Z")


class ProtocolError(ChorusError):
    """A request the server cannot accept; ``code`` is one of the documented error codes."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def bad_request(reason: str) -> ProtocolError:
    return ProtocolError("bad_request", reason)


class Request:
    __slots__ = ("id", "method", "data")

    def __init__(self, request_id: int, method: str, data: dict[str, Any]) -> None:
        self.id = request_id
        self.method = method
        self.data = data


def parse_request(text: str | bytes) -> Request:
    """
    Parse one websocket message as a request.

    :raises ProtocolError: with ``.request_id`` set when the id could be read (so the error can echo it).
    """
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"message is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise bad_request("message must be a JSON object")
    request_id = message.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_ID:
        raise bad_request("'id' must be an integer from 0 to 2^53-1")
    try:
        if message.get("type") != "req":
            raise bad_request("'type' must be \"req\"")
        method = message.get("method")
        if not isinstance(method, str) or not method:
            raise bad_request("'method' must be a non-empty string")
        data = message.get("data", {})
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise bad_request("'data' must be an object")
    except ProtocolError as exc:
        exc.request_id = request_id  # type: ignore[attr-defined]
        raise
    return Request(request_id, method, data)


_ID_RE = re.compile(r'"id"\s*:\s*(\d{1,16})\b')


def peek_id(text: str) -> int | None:
    """The request id of a message too big to parse, if it can be read from its first 256 characters."""
    match = _ID_RE.search(text[:256])
    return int(match.group(1)) if match and int(match.group(1)) <= MAX_ID else None


def response(request_id: int | None, data: dict[str, Any]) -> str:
    return json.dumps({"type": "res", "id": request_id, "ok": True, "data": data})


def error_response(request_id: int | None, code: str, reason: str, extra: dict[str, Any] | None = None) -> str:
    error = {"code": code, "reason": reason, **(extra or {})}
    return json.dumps({"type": "res", "id": request_id, "ok": False, "error": error})


def notification(method: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": "evt", "method": method, "data": data})


# --- field validation ------------------------------------------------------------------------------


def get_str(data: dict[str, Any], key: str, *, max_len: int, pattern: re.Pattern[str] | None = None) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{key}' must be a non-empty string")
    if len(value) > max_len:
        raise bad_request(f"'{key}' is longer than {max_len} characters")
    if pattern is not None and not pattern.match(value):
        raise bad_request(f"'{key}' has characters outside {pattern.pattern}")
    return value


def get_optional_str(data: dict[str, Any], key: str, *, max_len: int) -> str | None:
    if data.get(key) is None:
        return None
    return get_str(data, key, max_len=max_len)


def get_bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false")
    return value


def get_metadata(data: dict[str, Any], key: str, *, max_bytes: int) -> dict[str, Any]:
    """A metadata value: a JSON object whose JSON text is at most ``max_bytes`` long.

    :raises ProtocolError: ``bad_request`` (not an object) or ``limit_exceeded`` (too big)."""
    value = data.get(key)
    if not isinstance(value, dict):
        raise bad_request(f"'{key}' must be a JSON object")
    if len(json.dumps(value).encode()) > max_bytes:
        raise ProtocolError("limit_exceeded", f"'{key}' is larger than {max_bytes} bytes of JSON")
    return value


def get_sdp(data: dict[str, Any], expected_type: str, *, max_len: int = 64 * 1024, max_lines: int = 2000) -> str:
    if data.get("type", expected_type) != expected_type:
        raise bad_request(f"'type' must be \"{expected_type}\"")
    sdp = data.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise bad_request("'sdp' must be a non-empty string")
    if len(sdp) > max_len:
        raise ProtocolError("limit_exceeded", f"'sdp' is longer than {max_len} characters")
    if sdp.count("\n") > max_lines:
        raise ProtocolError("limit_exceeded", f"'sdp' has more than {max_lines} lines")
    if not sdp.startswith("v=0"):
        raise ProtocolError("invalid_sdp", "SDP must start with 'v=0'")
    return sdp
