"""
``chorus turn …``: render coturn's config, check a running TURN server, mint credentials by hand.

``add_commands`` adds the ``turn`` command to the ``chorus`` parser; ``run`` executes it with the loaded
settings and returns the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from pathlib import Path

from . import check as turn_check
from . import config, credentials
from .config import TurnSettings

LABELS = {"pass": "PASS", "fail": "FAIL", "warn": "WARN"}


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``turn config``, ``turn check`` and ``turn credentials`` to the ``chorus`` command."""
    turn = subparsers.add_parser("turn", help="coturn: render its config, check it, mint credentials")
    commands = turn.add_subparsers(dest="turn_command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        parser.add_argument("--config", help="a TOML or JSON settings file (CHORUS_* env variables override it)")
        return parser

    render = add("config", "print a hardened turnserver.conf for coturn, from the Chorus settings")
    render.add_argument("--output", "-o", type=Path, help="write it to FILE (mode 0600: it holds the secret)")
    render.add_argument("--allow-loopback-peers", action="store_true",
                        help="TESTS ONLY: let the relay reach 127.0.0.1 and ::1")
    render.add_argument("--allow-peer-ip", action="append", default=[], metavar="IP[-IP]",
                        help="exempt an address or range from the deny list (e.g. an SFU's private address); "
                        "repeatable")
    render.add_argument("--no-prometheus", action="store_true", help="leave out the prometheus line")

    probe = add("check", "check a TURN server step by step: reachable, authentication, allocation, relay")
    probe.add_argument("--host", dest="turn_host", metavar="HOST", help="server address (default: turn_listening_ip)")
    probe.add_argument("--port", dest="turn_port", metavar="PORT", type=int, help="server port (default: turn_port)")
    probe.add_argument("--transport", choices=["udp", "tcp"], default="udp", help="client-server transport")
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each answer (default 3)")
    probe.add_argument("--echo-host", default="127.0.0.1",
                       help="local address of the echo peer the relay sends to (default 127.0.0.1)")

    mint = add("credentials", "mint a TURN credential and print it with a ready ice_servers entry")
    mint.add_argument("--identity", default="chorus-cli", help="the participant part of the username")
    mint.add_argument("--ttl", type=int, help="lifetime in seconds (default: turn_ttl)")


def run(args: argparse.Namespace, settings: TurnSettings) -> int:
    """Execute ``chorus turn <command>``; returns the exit status (0 ok, 1 check failed, 2 usage error)."""
    try:
        if args.turn_command == "config":
            return _config(args, settings)
        if not settings.turn_secret:
            raise ValueError("turn_secret is not set (CHORUS_TURN_SECRET or turn_secret in the config file)")
        if args.turn_command == "check":
            return _check(args, settings, settings.turn_secret)
        if args.turn_command == "credentials":
            return _credentials(args, settings, settings.turn_secret)
    except ValueError as exc:
        print(f"chorus turn {args.turn_command}: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unknown turn command {args.turn_command!r}")


def _config(args: argparse.Namespace, settings: TurnSettings) -> int:
    text = config.render(
        settings,
        allow_loopback_peers=args.allow_loopback_peers,
        allowed_peer_ips=args.allow_peer_ip,
        prometheus=not args.no_prometheus,
    )
    if args.output is None:
        sys.stdout.write(text)
        return 0
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(args.output, 0o600)  # also when the file already existed with wider permissions
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace, settings: TurnSettings, secret: str) -> int:
    host = args.turn_host or _reachable(settings.turn_listening_ip)
    port = args.turn_port or settings.turn_port
    print(f"checking TURN server {host}:{port} over {args.transport} (realm {settings.turn_realm!r})", flush=True)

    def show(step: turn_check.Step) -> None:
        print(f"[{LABELS[step.status]}] {step.name:<15} {step.detail}", flush=True)

    result = asyncio.run(
        turn_check.check(
            host, port, secret, realm=settings.turn_realm, transport=args.transport, timeout=args.timeout,
            echo_host=args.echo_host, progress=show,
        )
    )
    warned = any(step.status == "warn" for step in result.steps)
    print("TURN check " + ("passed" + (" with warnings" if warned else "") if result.ok else "FAILED"))
    return 0 if result.ok else 1


def _credentials(args: argparse.Namespace, settings: TurnSettings, secret: str) -> int:
    ttl = args.ttl if args.ttl is not None else settings.turn_ttl
    if ttl <= 0:
        raise ValueError("--ttl must be positive")
    credential = credentials.mint(secret, args.identity, ttl)
    expiry = datetime.datetime.fromtimestamp(credential.expires_at, datetime.UTC)
    entry = {"urls": list(settings.turn_urls), "username": credential.username, "credential": credential.password}
    print(f"username: {credential.username}")
    print(f"password: {credential.password}")
    print(f"expires:  {expiry:%Y-%m-%d %H:%M:%S} UTC (in {ttl} s)")
    print("ice_servers entry:")
    print(json.dumps(entry))
    return 0


def _reachable(listening_ip: str) -> str:
    """Where to reach a server listening on ``listening_ip`` from this machine (wildcards → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listening_ip, listening_ip)
