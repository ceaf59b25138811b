"""The ``chorus`` command."""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from chorus.sfu import logs
from chorus.turn import cli as turn_cli

from . import auth, serve, tls
from .app import ConfigError, create_app
from .config import Settings
from .ingress import public_http_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="Chorus WebRTC media server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the signaling service and SFU")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--config", help="a TOML or JSON settings file (CHORUS_* env variables override it)")
    serve.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    serve.add_argument("--dev", action="store_true", help="dev mode: no auth secret needed (never in production)")
    serve.add_argument("--self-signed", nargs="+", metavar="NAME",
                       help="serve HTTPS with a self-signed certificate for these host names/addresses (made once, "
                       "kept in --cert-dir; prints its fingerprint). For trials: browsers ask to accept it")
    serve.add_argument("--cert-dir", help="where --self-signed keeps its certificate (default "
                       "$XDG_STATE_HOME/chorus, i.e. ~/.local/state/chorus)")

    health = commands.add_parser("health", help="exit 0 if the local server answers /healthz (container health "
                                 "checks; follows tls/host/port settings)")
    health.add_argument("--config", help="a TOML or JSON settings file")
    health.add_argument("--ready", action="store_true", help="check /readyz instead (503 while starting or draining)")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep trying for this long before failing (e.g. after starting it)")
    serve.add_argument("--rtmp-port", type=int, help="RTMP ingest port (default: setting rtmp_port, 0 = off)")
    serve.add_argument("--srt-port", type=int, help="SRT ingest port (default: setting srt_port, 0 = off)")

    token = commands.add_parser("token", help="room tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="print a signed room token")
    create.add_argument("--config", help="settings file (for auth_secret; or set CHORUS_AUTH_SECRET)")
    create.add_argument("--room", help="the room it grants ('*' for any; omit for an admin-only token)")
    create.add_argument("--identity", required=True, help="who the token is for")
    create.add_argument("--name", help="display name")
    create.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default 3600)")
    create.add_argument("--no-publish", action="store_true", help="may not publish")
    create.add_argument("--no-subscribe", action="store_true", help="receives no one")
    create.add_argument("--admin", action="store_true", help="may use the admin API")
    create.add_argument("--metadata", help="the participant's metadata, a JSON object (shown to the room)")
    turn_cli.add_commands(commands)

    ingress = commands.add_parser("ingress", help="streams into rooms: RTMP, SRT, WHIP, URL pull").add_subparsers(
        dest="ingress_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="settings file (for auth_secret, host, port)")
    common.add_argument("--server", help="the server's HTTP URL (default: public_url, else http://host:port)")
    common.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    create_ingress = ingress.add_parser("create", parents=[common], help="define an ingress; prints its URL and key")
    create_ingress.add_argument("--room", required=True, help="the room the stream goes into")
    create_ingress.add_argument("--name", required=True, help="the participant's name in the room")
    create_ingress.add_argument("--kind", required=True, choices=["rtmp", "srt", "whip", "url"],
                                help="how the stream arrives")
    create_ingress.add_argument("--url", help="--kind url: what to pull (rtsp://, rtmp://, https://….m3u8, a file "
                                "in ingest_media_root)")
    ingress.add_parser("list", parents=[common], help="every ingress and its state")
    revoke = ingress.add_parser("revoke", parents=[common], help="delete an ingress (a running stream ends)")
    revoke.add_argument("id", help="the ingress id (in_…)")
    _add_egress_commands(commands)
    return parser


def ingress_command(args: argparse.Namespace, settings: Settings) -> int:
    """``chorus ingress``: the admin API of a running server, with an admin token minted from the settings."""
    base = (args.server or public_http_url(settings)).rstrip("/")
    context = ssl.create_default_context()
    if not args.server:  # this machine's own server: its certificate names the public host (as for `health`)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    headers = {"Content-Type": "application/json"}
    if settings.auth_secret is not None:
        token = auth.create_token(settings.auth_secret, identity="chorus-cli", admin=True, ttl=300)
        headers["Authorization"] = f"Bearer {token}"
    if args.ingress_command == "create":
        body: dict[str, object] = {"kind": args.kind, "room": args.room, "name": args.name}
        if args.url:
            body["url"] = args.url
        status, data = _admin_call("POST", f"{base}/api/ingress", headers, context, body)
    elif args.ingress_command == "list":
        status, data = _admin_call("GET", f"{base}/api/ingress", headers, context)
    else:
        status, data = _admin_call("DELETE", f"{base}/api/ingress/{args.id}", headers, context)
    if status >= 400 or status == 0:
        reason = data.get("error", {}).get("reason") if isinstance(data.get("error"), dict) else data.get("error")
        print(f"chorus: {reason or f'HTTP {status}'}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data if args.ingress_command != "revoke" else {"revoked": args.id}, indent=2))
    elif args.ingress_command == "create":
        print(describe_created(data))
    elif args.ingress_command == "list":
        for item in data.get("ingresses", []):
            error = item.get("last_error") or {}
            print(f"{item['id']}  {item['kind']:<4}  room={item['room']}  name={item['name']}  {item['state']}"
                  + (f"  last error: {error.get('code')}: {error.get('reason')}" if error else ""))
    else:
        print(f"revoked {args.id}")
    return 0


def _admin_call(method: str, url: str, headers: dict[str, str], context: ssl.SSLContext,
                body: dict[str, object] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {}
    except OSError as e:
        return 0, {"error": f"cannot reach {url}: {e}"}


def describe_created(data: dict[str, Any]) -> str:
    """What to type into OBS and ffmpeg for a new ingress (the key is shown only now)."""
    kind, key = data["kind"], data.get("stream_key", "")
    lines = [f"Ingress {data['id']} ({kind}) → room {data['room']} as {data['name']!r}"]
    if kind == "rtmp":
        lines += [f"  Server:     {data['url']}", f"  Stream key: {key}", "",
                  "OBS: Settings → Stream → Service: Custom…, Server and Stream Key as above;",
                  "     Settings → Output → Keyframe Interval 1 s (Advanced mode) for a quick start.",
                  f"ffmpeg: ffmpeg -re -i INPUT -c:v libx264 -preset veryfast -tune zerolatency -bf 0 -g 30 "
                  f"-c:a aac -ar 48000 -f flv {data['publish_url']}"]
    elif kind == "srt":
        lines += [f"  URL:        {data['url']}", f"  Stream key: {key}", "",
                  f"OBS: Settings → Stream → Service: Custom…, Server {data['url']} (no stream key).",
                  f"ffmpeg: ffmpeg -re -i INPUT -c:v libx264 -preset veryfast -tune zerolatency -bf 0 -g 30 "
                  f"-c:a aac -ar 48000 -f mpegts '{data['url']}'"]
    elif kind == "whip":
        lines += [f"  URL:          {data['url']}", f"  Bearer token: {key}", "",
                  "OBS (30+): Settings → Stream → Service: WHIP, Server and Bearer Token as above."]
    else:
        lines += [f"  Pulling {data['url']} (reconnects with backoff when it drops)."]
    if key:
        lines += ["", f"The key is shown only now. `chorus ingress revoke {data['id']}` disables it."]
    return "\n".join(lines)


def _add_egress_commands(commands: Any) -> None:
    egress = commands.add_parser("egress", help="HLS/DASH and recording egresses of a running server")
    actions = egress.add_subparsers(dest="egress_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", help="the server's HTTP URL (default: public_url, else http://host:port)")
    common.add_argument("--token", default=os.environ.get("CHORUS_ADMIN_TOKEN"),
                        help="an admin token (default $CHORUS_ADMIN_TOKEN; minted from auth_secret when set)")
    common.add_argument("--config", help="settings file (for auth_secret, host, port)")
    start = actions.add_parser("start", parents=[common], help="start an egress; prints it as JSON")
    start.add_argument("--room", required=True)
    start.add_argument("--kind", choices=["hls", "record"], default="hls")
    start.add_argument("--participant", help="one participant (identity or peer id); default: the whole room")
    start.add_argument("--composite", action="store_true", help="the room composite (HLS default without "
                       "--participant; for record: one MP4 instead of a file per track)")
    start.add_argument("--low-latency", action="store_true", help="LL-HLS (partial segments)")
    start.add_argument("--segment", type=float, help="segment length, seconds")
    start.add_argument("--ladder", help="lower rungs, e.g. 360:800,180:250 (height:kbps)")
    start.add_argument("--container", choices=["auto", "webm", "mp4", "mkv"], help="recording container")
    start.add_argument("--audio", choices=["aac", "opus"], help="HLS audio: AAC (default) or Opus passed through")
    start.add_argument("--public", action=argparse.BooleanOptionalAction, default=None,
                       help="HLS readable without a token")
    stop = actions.add_parser("stop", parents=[common], help="stop an egress (files are final when it returns)")
    stop.add_argument("egress_id")
    listing = actions.add_parser("list", parents=[common], help="list egresses")
    listing.add_argument("--room")


def _admin_request(args: argparse.Namespace, settings: Settings, method: str, path: str,
                   body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One admin API call, as ``chorus ingress`` makes them (an admin token minted from ``auth_secret`` unless
    ``--token``; this machine's own server's certificate is not checked against its public name)."""
    base = (args.server or public_http_url(settings)).rstrip("/")
    context = ssl.create_default_context()
    if not args.server:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    token = args.token
    if token is None and settings.auth_secret is not None:
        token = auth.create_token(settings.auth_secret, identity="chorus-cli", admin=True, ttl=300)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        # Long enough for a stop, which answers once the egress's files are final.
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": {"code": "http_error", "reason": str(exc)}}


def egress_command(args: argparse.Namespace, settings: Settings) -> int:
    """``chorus egress start|stop|list``: talk to a running server's admin API; print its JSON answer."""
    try:
        if args.egress_command == "start":
            body: dict[str, Any] = {"room": args.room, "kind": args.kind}
            if args.participant:
                body["participant"] = args.participant
            if args.composite:
                body["composite"] = True
            if args.low_latency:
                body["low_latency"] = True
            if args.segment is not None:
                body["segment"] = args.segment
            if args.ladder:
                body["ladder"] = [r for r in args.ladder.split(",") if r]
            if args.container:
                body["container"] = args.container
            if args.audio:
                body["audio"] = args.audio
            if args.public is not None:
                body["public"] = args.public
            status, answer = _admin_request(args, settings, "POST", "/api/egress", body)
        elif args.egress_command == "stop":
            status, answer = _admin_request(args, settings, "DELETE", f"/api/egress/{args.egress_id}")
        else:
            query = f"?room={args.room}" if args.room else ""
            status, answer = _admin_request(args, settings, "GET", f"/api/egress{query}")
    except OSError as exc:
        print(f"chorus: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0 if status < 300 else 1


def token_create(args: argparse.Namespace, settings: Settings) -> int:
    if settings.auth_secret is None:
        print("chorus: no auth_secret configured (set CHORUS_AUTH_SECRET)", file=sys.stderr)
        return 2
    if args.room is None and not args.admin:
        print("chorus: --room is required (or --admin for an admin-only token)", file=sys.stderr)
        return 2
    metadata = None
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            print("chorus: --metadata must be a JSON object", file=sys.stderr)
            return 2
    print(auth.create_token(
        settings.auth_secret, identity=args.identity, room=args.room, name=args.name, ttl=args.ttl,
        can_publish=not args.no_publish, can_subscribe=not args.no_subscribe, admin=args.admin, metadata=metadata,
    ))
    return 0


def health(args: argparse.Namespace, settings: Settings) -> int:
    """GET /healthz (or /readyz) of the server these settings describe, on loopback when it listens on all
    addresses. The certificate is not verified (it names the public host, not 127.0.0.1)."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    url = f"{settings.scheme}://{host}:{settings.port}/{'readyz' if args.ready else 'healthz'}"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + args.wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3, context=context) as response:
                print(response.read().decode(errors="replace").strip())
                return 0
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                print(f"chorus: {url}: {exc}", file=sys.stderr)
                return 1
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, object] = {}
    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("rtmp_port", args.rtmp_port),
                                       ("srt_port", args.srt_port)) if v is not None}
        if args.dev:
            overrides["dev_mode"] = True
    try:
        settings = Settings.load(getattr(args, "config", None), **overrides)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"chorus: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        return token_create(args, settings)
    if args.command == "turn":
        return turn_cli.run(args, settings)
    if args.command == "egress":
        return egress_command(args, settings)
    if args.command == "health":
        return health(args, settings)
    if args.command == "ingress":
        return ingress_command(args, settings)
    if args.self_signed:
        try:
            cert_path, key_path = tls.self_signed(args.self_signed, Path(args.cert_dir) if args.cert_dir else None)
        except (OSError, ValueError) as exc:
            print(f"chorus: cannot make a self-signed certificate: {exc}", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"tls_cert": cert_path, "tls_key": key_path})
        cert = tls.certificate(cert_path)
        print(f"chorus: self-signed certificate for {', '.join(args.self_signed)} ({cert_path})\n"
              f"chorus:   SHA-256 fingerprint {tls.fingerprint(cert)}\n"
              f"chorus:   SPKI pin (sha256/base64) {tls.spki_pin(cert)}", file=sys.stderr, flush=True)
    if args.print_config:
        shown = settings.model_dump(mode="json")
        for key in ("auth_secret", "turn_secret", "webhook_secret"):
            if shown.get(key):
                shown[key] = "***"  # never print secrets
        print(json.dumps(shown, indent=2))
        return 0
    logs.configure(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"chorus: {exc}", file=sys.stderr)
        return 2
    ssl_context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            ssl_context = tls.server_context(settings.tls_cert, settings.tls_key)
        except tls.TlsError as exc:
            print(f"chorus: {exc}", file=sys.stderr)
            return 2
    return serve.run(app, settings, ssl_context)


if __name__ == "__main__":
    sys.exit(main())
