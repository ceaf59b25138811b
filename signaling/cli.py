"""The ``chorus`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from aiohttp import web
from pydantic import ValidationError

from sfu import logs

from .app import create_app
from .config import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="Chorus WebRTC media server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the signaling service and SFU")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--config", help="a TOML or JSON settings file (CHORUS_* env variables override it)")
    serve.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings.load(args.config, **overrides)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"chorus: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
        return 0
    logs.configure(settings.log_level, settings.log_format)
    print(f"chorus: serving on http://{settings.host}:{settings.port}", file=sys.stderr, flush=True)
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
