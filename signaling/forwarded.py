"""
Who the client is: the peer address of the connection, or — when that peer is a trusted reverse proxy
(``trusted_proxies``) — the address it forwarded in ``X-Forwarded-For``.

The header is a comma-separated list that every proxy appends its own peer to, so only its tail can be
believed: walking it from the right, addresses of trusted proxies are skipped and the first other one is the
client. Anything a client wrote further left is ignored. From an untrusted peer the header is ignored
altogether (a client cannot choose its address to dodge per-address limits).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Where the middleware leaves the client's address on each request.
CLIENT_ADDRESS = "chorus.client_address"


class TrustedProxies:
    """The ``trusted_proxies`` setting, parsed."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(e, strict=False) for e in entries]

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address, from the connection's ``peer`` and its ``X-Forwarded-For`` header."""
        address = peer or "?"
        if not self.networks or not forwarded_for or address not in self:
            return address
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return address  # a malformed hop: believe nothing further left
            address = hop
            if hop not in self:
                return hop
        return address


def middleware(proxies: TrustedProxies) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Sets ``request[CLIENT_ADDRESS]`` on every request."""

    @web.middleware
    async def client_address(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        request[CLIENT_ADDRESS] = proxies.client_address(request.remote, request.headers.get("X-Forwarded-For"))
        return await handler(request)

    return client_address


def client_address(request: web.BaseRequest) -> str:
    """The client's address as the middleware found it (the peer address when it did not run)."""
    found = request.get(CLIENT_ADDRESS)
    return found if isinstance(found, str) else (request.remote or "?")
