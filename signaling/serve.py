"""
``chorus serve``: runs the app on its port (HTTPS/WSS with a certificate) and handles the process signals.

* SIGTERM — graceful drain (drain.py), then exit status 0. A second SIGTERM during the drain: stop at once,
  exit status :data:`~chorus.signaling.drain.EXIT_FORCED` (143).
* SIGINT (Ctrl-C) — stop at once (participants are disconnected), exit status 0: for a terminal.
* SIGHUP — re-read ``tls_cert``/``tls_key``; new connections get the new certificate, open ones keep
  theirs; a certificate that cannot be loaded is logged and the old one stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import ssl
import sys

from aiohttp import web

from chorus.sfu.tasks import Tasks

from . import tls
from .accesslog import AccessLogger
from .app import DRAIN, start_drain
from .config import Settings
from .drain import EXIT_FORCED

logger = logging.getLogger("chorus.serve")

#: After the process was told to stop, how long closing may take before it exits regardless.
STOP_GRACE = 5.0


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit (each participant holds several sockets);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


async def serve(app: web.Application, settings: Settings, *, ssl_context: ssl.SSLContext | None = None) -> int:
    """Serve ``app`` until it has drained or was stopped; returns the exit status."""
    loop = asyncio.get_running_loop()
    exit_code: asyncio.Future[int] = loop.create_future()
    drain = app[DRAIN]

    def finish(code: int) -> None:
        if not exit_code.done():
            exit_code.set_result(code)

    def on_sigterm() -> None:
        if drain.draining:
            logger.warning("second SIGTERM: stopping at once", extra={"chorus": {"exit_status": EXIT_FORCED}})
            finish(EXIT_FORCED)
            return
        logger.info("SIGTERM: draining", extra={"chorus": {"timeout_s": settings.drain_timeout}})
        start_drain(app)

    def on_sigint() -> None:
        logger.info("SIGINT: stopping")
        finish(0)

    def on_sighup() -> None:
        if ssl_context is None or settings.tls_cert is None or settings.tls_key is None:
            logger.info("SIGHUP: no certificate configured, nothing to reload")
            return
        try:
            tls.load(ssl_context, settings.tls_cert, settings.tls_key)
            cert = tls.certificate(settings.tls_cert)
            logger.info("SIGHUP: certificate reloaded", extra={"chorus": {
                "fingerprint": tls.fingerprint(cert), "expires": cert.not_valid_after_utc.isoformat()}})
        except (tls.TlsError, ValueError, OSError) as exc:
            logger.error("SIGHUP: certificate not reloaded, the previous one stays", extra={"chorus": {
                "error": str(exc)}})

    async def drained() -> None:
        await drain.finished.wait()
        finish(0)

    runner = web.AppRunner(app, handle_signals=False, access_log_class=AccessLogger, shutdown_timeout=STOP_GRACE)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context, backlog=1024)
    await site.start()
    for signum, handler in ((signal.SIGTERM, on_sigterm), (signal.SIGINT, on_sigint), (signal.SIGHUP, on_sighup)):
        loop.add_signal_handler(signum, handler)
    tasks = Tasks("serve")
    tasks.spawn(drained(), name="wait for the drain")
    print(f"chorus: serving on {settings.scheme}://{settings.host}:{settings.port}", file=sys.stderr, flush=True)
    try:
        code = await exit_code
    finally:
        await tasks.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    # Closing (websockets, rooms, the cluster, webhooks) must not hang the exit.
    loop.call_later(STOP_GRACE * 2, os._exit, code)
    try:
        await asyncio.wait_for(runner.cleanup(), STOP_GRACE * 2)
    except TimeoutError:
        logger.warning("closing took too long; exiting anyway")
    return code


def run(app: web.Application, settings: Settings, ssl_context: ssl.SSLContext | None = None) -> int:
    raise_file_limit()
    return asyncio.run(serve(app, settings, ssl_context=ssl_context))
