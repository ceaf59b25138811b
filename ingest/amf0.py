"""
AMF0 (Adobe Action Message Format 0, "amf0-file-format-specification.pdf" §2), as RTMP commands and FLV
``onMetaData`` use it. Decoding is bounded: nesting depth and the data length limit every structure.

Types map to Python as: number → ``float``, boolean → ``bool``, string / long string → ``str``, object / ECMA
array → ``dict``, strict array → ``list``, null / undefined → ``None``, date → ``float`` (ms since the epoch).
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import ProtocolError

NUMBER, BOOLEAN, STRING, OBJECT, NULL, UNDEFINED, REFERENCE, ECMA_ARRAY, OBJECT_END = 0, 1, 2, 3, 5, 6, 7, 8, 9
STRICT_ARRAY, DATE, LONG_STRING, UNSUPPORTED = 10, 11, 12, 13

MAX_DEPTH = 16

_DOUBLE = struct.Struct("!d")


class Undefined:
    """AMF0 ``undefined`` when it must be written (``None`` writes ``null``)."""


UNDEFINED_VALUE = Undefined()


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("AMF0 value runs past the end of its message")
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def text(self, size: int) -> str:
        return self.take(size).decode("utf-8", "replace")

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ProtocolError("AMF0 values nested too deeply")
        marker = self.u8()
        if marker == NUMBER:
            return _DOUBLE.unpack(self.take(8))[0]
        if marker == BOOLEAN:
            return self.u8() != 0
        if marker == STRING:
            return self.text(self.u16())
        if marker == LONG_STRING:
            return self.text(self.u32())
        if marker in (NULL, UNDEFINED, UNSUPPORTED):
            return None
        if marker == OBJECT:
            return self.properties(depth)
        if marker == ECMA_ARRAY:
            self.u32()  # associative-count: a hint only, the end marker ends it (§2.10)
            return self.properties(depth)
        if marker == STRICT_ARRAY:
            count = self.u32()
            if count > len(self.data) - self.pos:  # every value takes at least one byte
                raise ProtocolError("AMF0 strict array longer than its message")
            return [self.value(depth + 1) for _ in range(count)]
        if marker == DATE:
            stamp = _DOUBLE.unpack(self.take(8))[0]
            self.take(2)  # time-zone, reserved
            return stamp
        raise ProtocolError(f"AMF0 type {marker} is not supported")

    def properties(self, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while True:
            key = self.text(self.u16())
            if not key and self.pos < len(self.data) and self.data[self.pos] == OBJECT_END:
                self.pos += 1
                return result
            result[key] = self.value(depth + 1)


def decode(data: bytes) -> list[Any]:
    """
    Every value in ``data`` (an RTMP command or data message body).

    :raises ProtocolError: truncated data, unknown or unsupported (reference, XML, typed object) markers, or
        nesting deeper than :data:`MAX_DEPTH`.
    """
    reader = _Reader(data)
    values = []
    while reader.pos < len(data):
        values.append(reader.value(0))
    return values


def _encode_string_body(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("AMF0 key longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def encode_value(value: Any) -> bytes:
    """One AMF0 value. ``dict`` writes an object, ``list`` a strict array, ``None`` null."""
    if value is None:
        return bytes([NULL])
    if isinstance(value, Undefined):
        return bytes([UNDEFINED])
    if isinstance(value, bool):
        return bytes([BOOLEAN, int(value)])
    if isinstance(value, int | float):
        return bytes([NUMBER]) + _DOUBLE.pack(float(value))
    if isinstance(value, str):
        raw = value.encode()
        if len(raw) > 0xFFFF:
            return bytes([LONG_STRING]) + len(raw).to_bytes(4, "big") + raw
        return bytes([STRING]) + len(raw).to_bytes(2, "big") + raw
    if isinstance(value, dict):
        body = b"".join(_encode_string_body(str(k)) + encode_value(v) for k, v in value.items())
        return bytes([OBJECT]) + body + b"\x00\x00" + bytes([OBJECT_END])
    if isinstance(value, list | tuple):
        return bytes([STRICT_ARRAY]) + len(value).to_bytes(4, "big") + b"".join(encode_value(v) for v in value)
    raise TypeError(f"cannot encode {type(value).__name__} as AMF0")


def encode(*values: Any) -> bytes:
    """Several AMF0 values back to back (a command: name, transaction id, command object, arguments)."""
    return b"".join(encode_value(v) for v in values)
