"""Secrets never reach the log: a page joined with ?token=..., admin calls with a bearer token (and one that
wrongly puts a token in its query), at debug level, in both log formats. The page takes the token out of its
address bar at once."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser import CHROMIUM, FLAGS, wait_until
from conftest import ServerProcess

from chorus.signaling import auth
from chorus.signaling.accesslog import redact_url

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")

SECRET = "s" * 40


def test_redaction() -> None:
    assert redact_url("/?room=demo&name=ann&token=abc.def") == "/?room=demo&name=ann&token=***"
    assert redact_url("https://user:pw@hooks.example/x?key=k1&v=1") == "https://hooks.example/x?key=***&v=1"
    assert redact_url("/whip/room?streamkey=abc") == "/whip/room?streamkey=***"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_token_in_the_log(tmp_path: Path, log_format: str) -> None:
    server = ServerProcess(tmp_path, env={"CHORUS_AUTH_SECRET": SECRET, "CHORUS_DEV_MODE": "0",
                                          "CHORUS_LOG_LEVEL": "debug", "CHORUS_LOG_FORMAT": log_format})
    try:
        room_tokens = [auth.create_token(SECRET, identity="user0", room="vault", name="user0")]
        admin_token = auth.create_token(SECRET, identity="ops", admin=True)
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = await (await browser.new_context()).new_page()
            await page.goto(f"{server.http_url}/?room=vault&name=x&token={room_tokens[0]}")
            await wait_until(page, "window.chorusReady === true && window.chorus.state === 'connected'", 20)
            # The token left the address bar (and history) at once; the page still joined (and published) with it.
            assert "token" not in page.url and page.url.endswith("/?room=vault&name=x")
            pages = [page]
            # Admin calls: the right way (Authorization header), and a token in a query string.
            for path in ("/api/rooms", "/api/rooms/vault", f"/api/rooms?token={admin_token}"):
                request = urllib.request.Request(server.http_url + path,
                                                 headers={"Authorization": f"Bearer {admin_token}"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 200
            # A refused token is not logged either.
            bad = auth.create_token("x" * 40, identity="mallory", admin=True)
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(urllib.request.Request(server.http_url + "/api/rooms",
                                                              headers={"Authorization": f"Bearer {bad}"}), timeout=5)
            # The page reloads: it joins again from the tab's own storage, still without a token in its URL.
            await pages[0].reload()
            await wait_until(pages[0], "window.chorusReady === true", 15)
            assert "token" not in pages[0].url
            await browser.close()
    finally:
        server.stop()
    log = server.log()
    assert "token=***" in log  # the access log saw the token-bearing requests, redacted
    for secret in [*room_tokens, admin_token, bad, SECRET]:
        for piece in (secret, secret.split(".")[-1]):  # the whole token, or its signature alone
            assert piece not in log, f"a secret is in the {log_format} log"
    assert "Traceback" not in log
