"""
Render a hardened coturn ``turnserver.conf`` from Chorus settings (anything with the :class:`TurnSettings` fields).

A TURN server relays UDP to any address a client names, so an open one lets anyone on the internet reach
what only the server can reach: its loopback services, the private network behind it, the cloud metadata
service at 169.254.169.254. The rendered config authenticates every allocation with short-lived
credentials minted by Chorus (:mod:`turn.credentials`) and refuses relaying to every non-public address
range, IPv4 and IPv6, including the IPv6 spellings of IPv4 addresses (``::ffff:10.0.0.1``, NAT64, 6to4)
that a plain IPv4 deny list misses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from .credentials import check_secret


class TurnSettings(Protocol):
    """The TURN settings Chorus has (``chorus.signaling.config.Settings`` provides them)."""

    @property
    def turn_secret(self) -> str | None: ...
    @property
    def turn_urls(self) -> list[str]: ...
    @property
    def turn_ttl(self) -> int: ...
    @property
    def turn_realm(self) -> str: ...
    @property
    def turn_listening_ip(self) -> str: ...
    @property
    def turn_relay_ip(self) -> str | None: ...
    @property
    def turn_external_ip(self) -> str | None: ...
    @property
    def turn_port(self) -> int: ...
    @property
    def turn_tls_port(self) -> int: ...
    @property
    def turn_min_port(self) -> int: ...
    @property
    def turn_max_port(self) -> int: ...
    @property
    def turn_tls_cert(self) -> Path | None: ...
    @property
    def turn_tls_key(self) -> Path | None: ...
    @property
    def turn_user_quota(self) -> int: ...
    @property
    def turn_total_quota(self) -> int: ...
    @property
    def turn_max_bps(self) -> int: ...

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Loopback: denied unless a test asks for ``allow_loopback_peers``.
LOOPBACK_NETWORKS: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "IPv4 loopback"),
    ("::1/128", "IPv6 loopback"),
)

#: Every other range a relay must never send to: (network, why).
#: Not listed: the unspecified addresses (0.0.0.0, ::), which coturn refuses by itself. Listing them would
#: be harmful: coturn 4.6.1 takes a ``denied-peer-ip`` of ``0.0.0.0``, ``::`` or a range starting at ``::``
#: as a wildcard and then refuses *every* peer.
DENIED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network' (0.0.0.0 reaches local services on Linux)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("169.254.0.0/16", "link-local, incl. cloud metadata 169.254.169.254"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation TEST-NET-1"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation TEST-NET-2"),
    ("203.0.113.0/24", "documentation TEST-NET-3"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and broadcast 255.255.255.255"),
    ("::ffff:0:0/96", "IPv4-mapped IPv6: ::ffff:127.0.0.1 is 127.0.0.1"),
    ("64:ff9b::/96", "NAT64 well-known prefix (embeds IPv4 addresses)"),
    ("64:ff9b:1::/48", "NAT64 local-use prefix"),
    ("100::/64", "IPv6 discard-only"),
    ("2001::/23", "IETF protocol assignments, incl. Teredo 2001::/32"),
    ("2001:db8::/32", "IPv6 documentation"),
    ("2002::/16", "6to4 (embeds IPv4 addresses)"),
    ("fc00::/7", "unique local addresses (ULA, private IPv6)"),
    ("fe80::/10", "IPv6 link-local"),
    ("fec0::/10", "IPv6 site-local (deprecated)"),
    ("ff00::/8", "IPv6 multicast"),
)

HEADER = """\
# coturn configuration rendered by `chorus turn config` -- do not edit by hand, re-render instead.
# It contains the TURN shared secret: keep it readable by coturn only (mode 0600).
# Start coturn with `turnserver -c THIS_FILE --log-file=stdout` (without the option, coturn 4.6.1 logs what
# it says while still reading this file to a new file in /var/log).
#
# Hardening, line by line:
#   use-auth-secret, static-auth-secret  only short-lived credentials minted by Chorus (TURN REST API:
#                                 username "<expiry>:<id>", password HMAC-SHA1(secret, username))
#   realm                         the realm in 401 challenges; part of the long-term credential key
#   relay-ip, external-ip         which local address relays, and its public address behind NAT
#   min-port, max-port            relay ports: open exactly this UDP range in the firewall
#   fingerprint                   FINGERPRINT on every message (tells STUN from media on shared ports)
#   no-cli                        no telnet admin console (it listens on 127.0.0.1:5766 by default)
#   no-multicast-peers            never relay to multicast/broadcast
#   no-tcp-relay                  WebRTC relays UDP only; TCP relays (RFC 6062) would connect anywhere
#   no-tlsv1, no-tlsv1_1          TLS 1.2 or newer only
#   no-dtls                       TURN over DTLS is not used by browsers: one listener less
#   no-tls (without a cert)       no TLS listener unless turn_tls_cert and turn_tls_key are set
#   stale-nonce                   nonces expire (600 s): a captured request cannot be replayed for long
#   user-quota, total-quota       caps on concurrent allocations per user and in total
#   max-bps                       bandwidth cap per session (0: none)
#   no-rfc5780, no-stun-backward-compatibility, response-origin-only-with-rfc5780
#                                 smaller STUN responses: less use as a DDoS amplifier
#   no-software-attribute         do not advertise the coturn version
#   denied-peer-ip                refuse relaying to loopback, private, link-local (cloud metadata),
#                                 CGNAT, multicast and reserved ranges, IPv4 and IPv6, incl. the
#                                 IPv4-mapped (::ffff:a.b.c.d), NAT64 and 6to4 spellings of IPv4
#   allow-loopback-peers          absent: loopback peers are refused (coturn's default)
#   prometheus                    metrics on port 9641, all interfaces: firewall it (needs a coturn built with
#                                 Prometheus; Debian 12's 4.6.1 is not, and logs "Bad configuration format")
#   log-file=stdout, simple-log   log to stdout (journald or the container runtime keeps it)
"""


def coturn_range(network: str) -> str:
    """A CIDR network in coturn's ``denied-peer-ip`` syntax: ``first-last`` (or one address)."""
    net: IPNetwork = ipaddress.ip_network(network)
    first, last = net.network_address, net.broadcast_address
    return str(first) if first == last else f"{first}-{last}"


def denied_networks(*, allow_loopback_peers: bool = False) -> list[tuple[str, str]]:
    """The ``(network, why)`` ranges the rendered config denies."""
    loopback = [] if allow_loopback_peers else list(LOOPBACK_NETWORKS)
    return loopback + list(DENIED_NETWORKS)


def render(
    settings: TurnSettings,
    *,
    allow_loopback_peers: bool = False,
    allowed_peer_ips: Sequence[str] = (),
    prometheus: bool = True,
) -> str:
    """
    The text of a hardened ``turnserver.conf`` for ``settings``.

    :param allow_loopback_peers: for tests on one machine only: let the relay reach 127.0.0.1 and ::1
        (``allow-loopback-peers``, and the loopback ranges left out of the deny list). Anyone holding a
        credential could then reach every service listening on the TURN host's loopback.
    :param allowed_peer_ips: addresses or ``first-last`` ranges exempted from the deny list
        (``allowed-peer-ip``), e.g. the private address of an SFU behind the TURN server.
    :param prometheus: emit ``prometheus``.
    :raises ValueError: no ``turn_secret`` (or one with surrounding whitespace, which coturn strips); a TLS
        certificate without key (or the reverse); a port range upside down; a value with a line break; an
        allowed peer that is not an address, or is 0.0.0.0 or ``::`` (coturn reads those as "any").
    """
    if settings.turn_secret is None:
        raise ValueError("turn_secret is not set: coturn needs it as static-auth-secret")
    check_secret(settings.turn_secret)
    if (settings.turn_tls_cert is None) != (settings.turn_tls_key is None):
        raise ValueError("turn_tls_cert and turn_tls_key must be set together")
    if settings.turn_min_port > settings.turn_max_port:
        raise ValueError(f"turn_min_port {settings.turn_min_port} is above turn_max_port {settings.turn_max_port}")
    for address in allowed_peer_ips:
        for part in address.split("-", 1):
            if ipaddress.ip_address(part.strip()).is_unspecified:  # not an address: ValueError too
                raise ValueError(f"allowed peer {address!r}: coturn would take {part.strip()} as every address")

    lines: list[str] = [HEADER]
    add = lines.append

    add("# --- listening and relaying")
    add(f"listening-ip={settings.turn_listening_ip}")
    add(f"listening-port={settings.turn_port}")
    if settings.turn_relay_ip:
        add(f"relay-ip={settings.turn_relay_ip}")
    if settings.turn_external_ip:
        add(f"external-ip={settings.turn_external_ip}")
    add(f"min-port={settings.turn_min_port}")
    add(f"max-port={settings.turn_max_port}")
    add("no-tcp-relay")

    add("\n# --- authentication: Chorus-minted TURN REST credentials only")
    add("use-auth-secret")
    add(f"static-auth-secret={settings.turn_secret}")
    add(f"realm={settings.turn_realm}")
    add("stale-nonce=600")

    add("\n# --- transport security")
    if settings.turn_tls_cert is not None and settings.turn_tls_key is not None:
        add(f"tls-listening-port={settings.turn_tls_port}")
        add(f"cert={settings.turn_tls_cert}")
        add(f"pkey={settings.turn_tls_key}")
    else:
        add("no-tls")
    add("no-dtls")
    add("no-tlsv1")
    add("no-tlsv1_1")

    add("\n# --- limits")
    add(f"user-quota={settings.turn_user_quota}")
    add(f"total-quota={settings.turn_total_quota}")
    add(f"max-bps={settings.turn_max_bps}")

    add("\n# --- less surface")
    add("fingerprint")
    add("no-cli")
    add("no-multicast-peers")
    add("no-rfc5780")
    add("no-stun-backward-compatibility")
    add("response-origin-only-with-rfc5780")
    add("no-software-attribute")

    add("\n# --- peers the relay must never reach")
    if allow_loopback_peers:
        add("# TEST ONLY: loopback peers allowed")
        add("allow-loopback-peers")
    for network, why in denied_networks(allow_loopback_peers=allow_loopback_peers):
        add(f"# {network}: {why}")
        add(f"denied-peer-ip={coturn_range(network)}")
    if allowed_peer_ips:
        add("# exempted from the deny list on purpose (e.g. the SFU's private address)")
    for address in allowed_peer_ips:
        add(f"allowed-peer-ip={address.strip()}")

    add("\n# --- observability")
    if prometheus:
        add("prometheus")
    add("log-file=stdout")
    add("simple-log")

    text = "\n".join(lines) + "\n"
    for value in (settings.turn_secret, settings.turn_realm, settings.turn_listening_ip, settings.turn_relay_ip,
                  settings.turn_external_ip, str(settings.turn_tls_cert), str(settings.turn_tls_key)):
        if value and ("\n" in value or "\r" in value):
            raise ValueError("TURN settings must not contain line breaks")
    return text
