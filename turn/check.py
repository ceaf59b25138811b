"""
Check a TURN server end to end, the way a WebRTC client uses it, and say which step fails and why:

1. *reachable* — a STUN Binding request is answered;
2. *authentication* — the server challenges (401) and accepts freshly minted TURN REST credentials;
3. *allocation* — it grants a relayed address;
4. *relay* — data sent through the relay to a local UDP echo peer comes back through the relay.

Step 4 needs the relay to be allowed to reach the echo peer. A hardened coturn refuses loopback and private
peers (403): that is reported as a warning, "relay works but peer address denied by policy", not a failure.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .client import Address, Transport, TurnClient, TurnError, TurnTimeout
from .credentials import mint

Status = Literal["pass", "fail", "warn"]

#: Lifetime of the credential the check mints, seconds.
CHECK_TTL = 300

#: What an error code of an Allocate most likely means, for the operator.
ALLOCATE_HINTS = {
    403: "forbidden by the server's policy",
    437: "allocation mismatch: this client address already has an allocation; retry",
    440: "address family not supported by the relay",
    442: "transport not supported (the server relays no UDP?)",
    486: "allocation quota reached (turn_user_quota / turn_total_quota)",
    508: "insufficient capacity: no free relay port in min-port..max-port?",
}


@dataclass(frozen=True)
class Step:
    """One step of a check: ``status`` is ``"pass"``, ``"fail"`` or ``"warn"`` (worked, with a caveat)."""

    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclass
class CheckResult:
    """Steps in the order they ran; the check stops at the first failing step."""

    host: str
    port: int
    transport: Transport
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)


class _Echo(asyncio.DatagramProtocol):
    """A UDP peer that sends back datagrams carrying the check's token (and nothing else)."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.transport: asyncio.DatagramTransport | None = None
        self.received_from: Address | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if data.startswith(self.token) and self.transport is not None:
            self.received_from = addr
            self.transport.sendto(data, addr)


async def check(
    host: str,
    port: int,
    secret: str,
    *,
    realm: str | None = None,
    identity: str = "chorus-check",
    transport: Transport = "udp",
    timeout: float = 3.0,
    echo_host: str = "127.0.0.1",
    progress: Callable[[Step], object] | None = None,
) -> CheckResult:
    """
    Run the four steps against ``host:port``.

    :param secret: coturn's ``static-auth-secret`` (Chorus ``turn_secret``), to mint a credential.
    :param realm: the expected realm; a different one is noted (credentials work with any realm).
    :param identity: the participant part of the minted username.
    :param transport: ``"udp"`` or ``"tcp"`` towards the server.
    :param timeout: seconds to wait for each answer.
    :param echo_host: local address of the echo peer the relay sends to. The relay must be allowed to reach
        it: ``127.0.0.1`` works when coturn runs on this machine with ``allow-loopback-peers``; against a
        hardened server, use an address of this machine that is not in a denied range.
    :param progress: called with each step as soon as it is done.
    """
    result = CheckResult(host, port, transport)

    def record(name: str, status: Status, detail: str) -> None:
        step = Step(name, status, detail)
        result.steps.append(step)
        if progress is not None:
            progress(step)

    credential = mint(secret, identity, CHECK_TTL)
    client = TurnClient(
        host, port, transport=transport, username=credential.username, password=credential.password, timeout=timeout
    )
    where = f"{host}:{port}"
    try:
        # 1. reachable
        started = time.monotonic()
        try:
            await client.open()
            mapped = await client.binding()
        except TurnTimeout:
            record("reachable", "fail", f"no response from {where} within {timeout:g}s")
            return result
        except ConnectionRefusedError:
            what = "connection refused" if transport == "tcp" else "port unreachable"
            record("reachable", "fail", f"no response from {where}: {what} (nothing listens on {transport} "
                   f"port {port})")
            return result
        except socket.gaierror as exc:
            record("reachable", "fail", f"cannot resolve {host!r}: {exc.strerror}")
            return result
        except (OSError, TurnError) as exc:
            record("reachable", "fail", f"no usable response from {where}: {exc}")
            return result
        record("reachable", "pass", f"STUN binding answered in {_ms(started)}; the server sees this client as "
               f"{_address(mapped)}")

        # 2. authentication and 3. allocation (one Allocate: the first is challenged, the retry authenticated)
        try:
            allocation = await client.allocate()
        except TurnTimeout:
            record("authentication", "fail", f"no answer to Allocate from {where} within {timeout:g}s")
            return result
        except TurnError as exc:
            if exc.code == 401 and client.challenged:
                record("authentication", "fail", f"401 {exc.reason}: wrong secret or expired credential "
                       f"(username {credential.username!r}, realm {client.realm!r}); is turn_secret the same as "
                       f"coturn's static-auth-secret, and is this machine's clock right?")
            elif not client.challenged:
                record("authentication", "fail", f"no 401 challenge with realm and nonce, but {exc.code} {exc.reason}")
            else:
                record("authentication", "pass", _auth_detail(client, credential.username, realm))
                hint = ALLOCATE_HINTS.get(exc.code, "")
                record("allocation", "fail", f"{exc.code} {exc.reason}" + (f": {hint}" if hint else ""))
            return result
        except OSError as exc:
            record("authentication", "fail", f"connection error during Allocate: {exc}")
            return result
        if not client.challenged:
            record("authentication", "fail", "the server granted an allocation without asking for credentials: "
                   "it runs without authentication (no-auth), an open relay")
            return result
        record("authentication", "pass", _auth_detail(client, credential.username, realm))
        record("allocation", "pass", f"relayed address {_address(allocation.relayed)} (server sees this client as "
               f"{_address(allocation.mapped)}; lifetime {allocation.lifetime} s)")

        # 4. relay round trip
        status, detail = await _round_trip(client, echo_host, timeout)
        record("relay", status, detail)
        return result
    finally:
        await client.close()


async def _round_trip(client: TurnClient, echo_host: str, timeout: float) -> tuple[Status, str]:
    """Send a token through the relay to a local echo peer and wait for it to come back."""
    token = b"chorus-turn-check " + os.urandom(8).hex().encode()
    loop = asyncio.get_running_loop()
    try:
        echo_transport, echo = await loop.create_datagram_endpoint(lambda: _Echo(token), local_addr=(echo_host, 0))
    except OSError as exc:
        return "fail", f"cannot open the echo peer on {echo_host}: {exc}"
    try:
        peer: Address = echo_transport.get_extra_info("sockname")[:2]
        try:
            await client.create_permission(peer[0])
        except TurnError as exc:
            if exc.code == 403:
                return "warn", (
                    f"relay works but peer address {peer[0]} denied by policy ({exc.code} {exc.reason}): the "
                    f"server refuses to relay to it (denied-peer-ip), as a hardened server should for loopback "
                    f"and private addresses. Round trip not tested: give an echo address the relay may reach "
                    f"(--echo-host), or check a coturn started with allow-loopback-peers"
                )
            if exc.code == 443:
                return "fail", f"echo peer {peer[0]} is not of the relayed address's family ({exc.code} {exc.reason})"
            return "fail", f"CreatePermission for {peer[0]} refused: {exc.code} {exc.reason}"
        channel = await client.channel_bind(peer)
        started = time.monotonic()
        client.send_channel_data(channel, token)
        deadline = started + timeout
        while True:
            try:
                source, data = await client.receive(timeout=max(deadline - time.monotonic(), 0))
            except TurnTimeout:
                if echo.received_from is None:
                    return "fail", (
                        f"the echo peer {_address(peer)} received nothing from the relay within {timeout:g}s: "
                        f"the relay cannot reach it (is the TURN server on another machine? then pass an "
                        f"address of this machine that it can reach)"
                    )
                return "fail", (
                    f"the echo peer {_address(peer)} got the data from {_address(echo.received_from)} and "
                    f"answered, but nothing came back through the relay within {timeout:g}s"
                )
            if data == token and source == peer:
                break
        return "pass", (
            f"{len(token)} bytes sent through the relay to echo peer {_address(peer)} and back in {_ms(started)} "
            f"(ChannelBind + ChannelData)"
        )
    except (TurnError, TurnTimeout, OSError) as exc:
        return "fail", f"relaying to the echo peer failed: {exc}"
    finally:
        echo_transport.close()


def _auth_detail(client: TurnClient, username: str, expected_realm: str | None) -> str:
    detail = f"401 challenge (realm {client.realm!r}), then credential {username!r} accepted"
    if expected_realm is not None and client.realm != expected_realm:
        detail += f" (note: realm differs from the configured {expected_realm!r})"
    return detail


def _address(address: Address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.1f} ms"
