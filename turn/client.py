"""
A small STUN/TURN client (RFC 8489, RFC 8656) over UDP or TCP, for checking a TURN server: Binding,
Allocate with long-term credentials, CreatePermission, ChannelBind, ChannelData and Send/Data indications.

It speaks to one server and holds at most one allocation. Messages are parsed with aioice's STUN codec
(:func:`aioice.stun.parse_message`); requests are encoded here because TURN needs attributes aioice does not
know (REQUESTED-ADDRESS-FAMILY) and repeated ones (several XOR-PEER-ADDRESS in one CreatePermission).

Example::

    async with TurnClient("127.0.0.1", 3478, username=u, password=p) as client:
        allocation = await client.allocate()
        await client.create_permission("198.51.100.7")
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import enum
import hashlib
import hmac
import ipaddress
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from aioice import stun

Transport = Literal["udp", "tcp"]
Address = tuple[str, int]

_COOKIE = 0x2112A442
_UDP_TRANSPORT = 17 << 24  # REQUESTED-TRANSPORT: UDP (protocol number 17)
_FIRST_CHANNEL = 0x4000


class Attr(enum.IntEnum):
    """STUN/TURN attribute types this client sends."""

    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    REQUESTED_ADDRESS_FAMILY = 0x0017
    REQUESTED_TRANSPORT = 0x0019
    FINGERPRINT = 0x8028


class TurnError(Exception):
    """The server answered a request with an error response (``code`` e.g. 401, 403, 437, 486)."""

    def __init__(self, method: str, code: int, reason: str) -> None:
        super().__init__(f"{method} failed: {code} {reason}")
        self.method = method
        self.code = code
        self.reason = reason


class TurnTimeout(TimeoutError):
    """No answer from the server in time."""


@dataclass(frozen=True)
class Allocation:
    """A granted allocation."""

    relayed: Address
    mapped: Address
    lifetime: int


def integrity_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key: ``MD5(username ":" realm ":" password)`` (RFC 8489 section 9.2.2)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def encode(
    method: stun.Method,
    message_class: stun.Class,
    transaction_id: bytes,
    attributes: Sequence[tuple[int, bytes]],
    key: bytes | None = None,
) -> bytes:
    """Encode a STUN message; with ``key``, add MESSAGE-INTEGRITY. FINGERPRINT is always added."""

    def header(length: int) -> bytes:
        return struct.pack("!HHI12s", method | message_class, length, _COOKIE, transaction_id)

    body = b"".join(_attribute(t, v) for t, v in attributes)
    if key is not None:  # the HMAC covers the header with the length as if MESSAGE-INTEGRITY were present
        mac = hmac.new(key, header(len(body) + 24) + body, hashlib.sha1).digest()
        body += _attribute(Attr.MESSAGE_INTEGRITY, mac)
    crc = binascii.crc32(header(len(body) + 8) + body) ^ 0x5354554E
    body += _attribute(Attr.FINGERPRINT, struct.pack("!I", crc))
    return header(len(body)) + body


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)


def xor_address(address: Address, transaction_id: bytes) -> bytes:
    """An XOR-…-ADDRESS value. An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) stays IPv6 (family 2)."""
    return stun.pack_xor_address((str(ipaddress.ip_address(address[0])), address[1]), transaction_id)


class _XorAddress:
    """An XOR-…-ADDRESS attribute value, encoded once the request's transaction id is known."""

    def __init__(self, address: Address) -> None:
        self.address = address

    def encode(self, transaction_id: bytes) -> bytes:
        return xor_address(self.address, transaction_id)


AttributeValue = bytes | _XorAddress


def _error_text(message: stun.Message) -> tuple[int, str]:
    code, reason = message.attributes.get("ERROR-CODE", (0, "error response without ERROR-CODE"))
    return int(code), str(reason)


class _Protocol(asyncio.Protocol, asyncio.DatagramProtocol):
    """Feeds received bytes (datagrams, or a TCP byte stream) to the client's handlers."""

    def __init__(self, on_datagram: Callable[[bytes], None], on_stream: Callable[[bytes], None],
                 on_failure: Callable[[Exception], None]) -> None:
        self._on_datagram = on_datagram
        self._on_stream = on_stream
        self._on_failure = on_failure

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self._on_datagram(data)

    def data_received(self, data: bytes) -> None:
        self._on_stream(data)

    def error_received(self, exc: Exception) -> None:
        self._on_failure(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_failure(exc or ConnectionResetError("connection closed by the server"))


class TurnClient:
    """
    One client transport towards a STUN/TURN server.

    :param host: the server's address or name.
    :param port: its port.
    :param transport: ``"udp"`` or ``"tcp"`` between client and server (the relay is UDP either way).
    :param username: TURN username (for ``use-auth-secret``: ``"<expiry>:<identity>"``).
    :param password: TURN password.
    :param timeout: seconds to wait for each answer (UDP requests are retransmitted meanwhile).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        transport: Transport = "udp",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 3.0,
    ) -> None:
        self.host = host
        self.port = port
        self.transport_kind: Transport = transport
        self.username = username
        self.password = password
        self.timeout = timeout
        self.realm: str | None = None  # learnt from the server's 401 challenge
        self.challenged = False  # whether the server asked for credentials (401 with REALM and NONCE)
        self.allocation: Allocation | None = None
        self._nonce: bytes | None = None
        self._key: bytes | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._pending: dict[bytes, asyncio.Future[stun.Message]] = {}
        self._data: asyncio.Queue[tuple[Address, bytes]] = asyncio.Queue()
        self._channels: dict[int, Address] = {}
        self._next_channel = _FIRST_CHANNEL
        self._buffer = b""
        self._error: Exception | None = None
        self._last_error: stun.Message | None = None  # the latest error response (a 401 carries REALM, NONCE)

    async def __aenter__(self) -> TurnClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """
        Create the socket (UDP) or connect (TCP).

        :raises OSError: e.g. ``ConnectionRefusedError`` when nothing listens on a TCP port.
        :raises TurnTimeout: a TCP connection was not established within the timeout.
        """
        loop = asyncio.get_running_loop()

        def protocol() -> _Protocol:
            return _Protocol(self._received, self._stream_received, self._failed)

        if self.transport_kind == "tcp":
            try:
                self._transport, _ = await asyncio.wait_for(
                    loop.create_connection(protocol, self.host, self.port), self.timeout
                )
            except TimeoutError:
                raise TurnTimeout(f"no TCP connection to {self.host}:{self.port} within {self.timeout:g}s") from None
        else:
            self._transport, _ = await loop.create_datagram_endpoint(
                protocol, remote_addr=(self.host, self.port)
            )

    async def close(self) -> None:
        """Delete the allocation, if any (best effort), and close the socket."""
        if self.allocation is not None and self._error is None:
            with contextlib.suppress(TurnError, TurnTimeout, OSError):
                await self.refresh(0, timeout=min(self.timeout, 1.0))
        self.allocation = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # --- requests ----------------------------------------------------------------------------------------

    async def binding(self) -> Address:
        """Send a STUN Binding request (no credentials); returns the reflexive address the server saw."""
        response = await self._request(stun.Method.BINDING, [], authenticate=False)
        mapped: Address | None = response.attributes.get("XOR-MAPPED-ADDRESS") or response.attributes.get(
            "MAPPED-ADDRESS"
        )
        if mapped is None:
            raise TurnError("Binding", 0, "response without XOR-MAPPED-ADDRESS")
        return mapped

    async def allocate(self, *, lifetime: int = 600, family: Literal[4, 6] = 4) -> Allocation:
        """
        Allocate a UDP relay: answers the server's 401 challenge with the credentials (and a 438 stale nonce
        by retrying with the new nonce).

        :param family: 6 asks for an IPv6 relayed address (REQUESTED-ADDRESS-FAMILY).
        :raises TurnError: e.g. 401 (bad credentials), 486 (quota reached), 440 (family not supported).
        """
        attributes: list[tuple[int, AttributeValue]] = [
            (Attr.LIFETIME, struct.pack("!I", lifetime)),
            (Attr.REQUESTED_TRANSPORT, struct.pack("!I", _UDP_TRANSPORT)),
        ]
        if family == 6:
            attributes.append((Attr.REQUESTED_ADDRESS_FAMILY, struct.pack("!B3x", 2)))
        response = await self._request(stun.Method.ALLOCATE, attributes)
        try:
            relayed = response.attributes["XOR-RELAYED-ADDRESS"]
            mapped = response.attributes["XOR-MAPPED-ADDRESS"]
            granted = response.attributes["LIFETIME"]
        except KeyError as exc:
            raise TurnError("Allocate", 0, f"success response without {exc.args[0]}") from None
        self.allocation = Allocation(relayed, mapped, granted)
        return self.allocation

    async def refresh(self, lifetime: int = 600, *, timeout: float | None = None) -> int:
        """Refresh the allocation; ``lifetime=0`` deletes it. Returns the granted lifetime."""
        response = await self._request(
            stun.Method.REFRESH, [(Attr.LIFETIME, struct.pack("!I", lifetime))], timeout=timeout
        )
        if lifetime == 0:
            self.allocation = None
        return int(response.attributes.get("LIFETIME", 0))

    async def create_permission(self, *hosts: str) -> None:
        """
        Install permissions for peers' IP addresses (ports do not matter). Nothing is sent to the peers.

        :raises TurnError: 403 when the server's policy forbids a peer address (coturn's ``denied-peer-ip``),
            443 when a peer's family differs from the relayed address's.
        """
        await self._request(
            stun.Method.CREATE_PERMISSION,
            [(Attr.XOR_PEER_ADDRESS, _XorAddress((host, 0))) for host in hosts],
        )

    async def channel_bind(self, peer: Address) -> int:
        """Bind the next free channel number to ``peer`` (this also installs a permission); returns it."""
        channel = self._next_channel
        await self._request(
            stun.Method.CHANNEL_BIND,
            [(Attr.CHANNEL_NUMBER, struct.pack("!H2x", channel)), (Attr.XOR_PEER_ADDRESS, _XorAddress(peer))],
        )
        self._next_channel += 1
        self._channels[channel] = peer
        return channel

    # --- data ------------------------------------------------------------------------------------------

    def send_channel_data(self, channel: int, data: bytes) -> None:
        """Send ``data`` to the peer bound to ``channel``, as a ChannelData message."""
        message = struct.pack("!HH", channel, len(data)) + data
        if self.transport_kind == "tcp":  # over TCP, ChannelData is padded to 4 bytes
            message += bytes(-len(message) % 4)
        self._send(message)

    def send_indication(self, peer: Address, data: bytes) -> None:
        """Send ``data`` to ``peer`` in a Send indication (needs a permission for the peer's IP)."""
        transaction_id = os.urandom(12)
        attributes = [(Attr.XOR_PEER_ADDRESS, xor_address(peer, transaction_id)), (Attr.DATA, data)]
        self._send(encode(stun.Method.SEND, stun.Class.INDICATION, transaction_id, attributes))

    async def receive(self, timeout: float | None = None) -> tuple[Address, bytes]:
        """The next datagram relayed from a peer (ChannelData or Data indication): ``(peer, data)``."""
        try:
            return await asyncio.wait_for(self._data.get(), timeout if timeout is not None else self.timeout)
        except TimeoutError:
            raise TurnTimeout("no relayed data") from None

    # --- internals -----------------------------------------------------------------------------------------

    async def _request(
        self,
        method: stun.Method,
        attributes: list[tuple[int, AttributeValue]],
        *,
        authenticate: bool = True,
        timeout: float | None = None,
    ) -> stun.Message:
        """One transaction, authenticated once the server has challenged us; retried once after a 401 challenge
        or a 438 (stale nonce)."""
        retried = False
        while True:
            try:
                return await self._transaction(method, attributes, authenticate=authenticate, timeout=timeout)
            except TurnError as exc:
                if retried or not authenticate or exc.code not in (401, 438) or self.password is None:
                    raise
                challenge = self._last_error
                if challenge is None or "NONCE" not in challenge.attributes:
                    raise
                if exc.code == 401:
                    if "REALM" not in challenge.attributes:
                        raise
                    self.challenged = True
                    self.realm = challenge.attributes["REALM"]
                    assert self.username is not None and self.realm is not None
                    self._key = integrity_key(self.username, self.realm, self.password)
                self._nonce = challenge.attributes["NONCE"]
                retried = True

    async def _transaction(
        self,
        method: stun.Method,
        attributes: list[tuple[int, AttributeValue]],
        *,
        authenticate: bool,
        timeout: float | None,
    ) -> stun.Message:
        if self._error is not None:
            raise self._error
        transaction_id = os.urandom(12)
        values = [
            (kind, value.encode(transaction_id) if isinstance(value, _XorAddress) else value)
            for kind, value in attributes
        ]
        key = None
        if authenticate and self._key is not None:
            assert self.username is not None and self.realm is not None and self._nonce is not None
            values += [
                (Attr.USERNAME, self.username.encode()),
                (Attr.REALM, self.realm.encode()),
                (Attr.NONCE, self._nonce),
            ]
            key = self._key
        data = encode(method, stun.Class.REQUEST, transaction_id, values, key)

        future: asyncio.Future[stun.Message] = asyncio.get_running_loop().create_future()
        self._pending[transaction_id] = future
        limit = timeout if timeout is not None else self.timeout
        deadline = time.monotonic() + limit
        rto = 0.5
        try:
            while True:
                self._send(data)
                wait = min(rto, deadline - time.monotonic())
                if self.transport_kind == "tcp":  # reliable: no retransmissions
                    wait = deadline - time.monotonic()
                try:
                    response = await asyncio.wait_for(asyncio.shield(future), max(wait, 0))
                    break
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise TurnTimeout(
                            f"no response from {self.host}:{self.port} within {limit:g}s"
                        ) from None
                    rto *= 2
        finally:
            self._pending.pop(transaction_id, None)
            future.cancel()

        name = method.name.replace("_", " ").title().replace(" ", "")
        if response.message_class == stun.Class.ERROR:
            self._last_error = response
            raise TurnError(name, *_error_text(response))
        if key is not None and not response.check_message_integrity(key):
            raise TurnError(name, 0, "response MESSAGE-INTEGRITY does not match (not the server we talk to?)")
        return response

    def _send(self, data: bytes) -> None:
        if self._transport is None:
            raise ConnectionError("client is not open")
        if self._error is not None:
            raise self._error
        if self.transport_kind == "tcp":
            cast(asyncio.WriteTransport, self._transport).write(data)
        else:
            cast(asyncio.DatagramTransport, self._transport).sendto(data)

    def _received(self, data: bytes) -> None:
        if len(data) >= 4 and data[0] & 0xC0 == 0x40:  # ChannelData: channel numbers are 0x4000–0x7FFF
            channel, length = struct.unpack("!HH", data[:4])
            peer = self._channels.get(channel)
            if peer is not None and len(data) >= 4 + length:
                self._data.put_nowait((peer, data[4 : 4 + length]))
            return
        try:
            message = stun.parse_message(data)
        except ValueError:
            return
        if message.message_class in (stun.Class.RESPONSE, stun.Class.ERROR):
            future = self._pending.get(message.transaction_id)
            if future is not None and not future.done():
                future.set_result(message)
        elif message.message_method == stun.Method.DATA and message.message_class == stun.Class.INDICATION:
            peer, payload = message.attributes.get("XOR-PEER-ADDRESS"), message.attributes.get("DATA")
            if peer is not None and payload is not None:
                self._data.put_nowait((peer, payload))

    def _stream_received(self, data: bytes) -> None:
        """Split a TCP byte stream into STUN messages and (padded) ChannelData messages."""
        self._buffer += data
        while len(self._buffer) >= 4:
            length = struct.unpack("!H", self._buffer[2:4])[0]
            if self._buffer[0] & 0xC0 == 0x40:
                size = 4 + length + (-length % 4)
            else:
                size = 20 + length
            if len(self._buffer) < size:
                return
            message, self._buffer = self._buffer[:size], self._buffer[size:]
            self._received(message)

    def _failed(self, exc: Exception) -> None:
        """The socket reported an error (e.g. ICMP port unreachable) or the TCP connection closed."""
        if self._transport is None:  # our own close()
            return
        self._error = exc
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
