"""HTTPS and WSS on Chorus's own port: a browser on another machine gets camera and microphone (a secure
context), the certificate is reloaded on SIGHUP, and the container health check speaks TLS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from browser import CHROMIUM, FLAGS, INBOUND_STATS, wait_until
from conftest import ServerProcess, free_port
from netns import NetworkNamespace

from chorus.signaling import tls

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


def served_fingerprint(port: int) -> str:
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
    from cryptography import x509

    return tls.fingerprint(x509.load_pem_x509_certificate(pem.encode()))


@pytest.mark.timeout(90)
async def test_browser_on_another_machine_publishes_over_https(
        tmp_path: Path, netns_factory: Callable[[], NetworkNamespace]) -> None:
    ns = netns_factory()
    server = ServerProcess(tmp_path, host=ns.host_ip, tls=True,
                           args=["--self-signed", ns.host_ip, "--cert-dir", str(tmp_path / "certs")],
                           env={"CHORUS_ICE_HOST_ADDRESSES": json.dumps([ns.host_ip])})
    try:
        log = server.log()
        assert "SHA-256 fingerprint" in log
        pin = log.split("SPKI pin (sha256/base64) ", 1)[1].split()[0]
        cert = tls.certificate(tmp_path / "certs" / "self-signed.crt")
        assert pin == tls.spki_pin(cert) and tls.fingerprint(cert) in log
        # The browsers trust exactly this certificate (as a user accepting it would), nothing else: no
        # --ignore-certificate-errors, no --unsafely-treat-insecure-origin-as-secure.
        flags = [*FLAGS, f"--ignore-certificate-errors-spki-list={pin}"]
        url = f"https://{ns.host_ip}:{server.port}/?room=secure&name="
        async with playwright_api.async_playwright() as p:
            remote_browser = await p.chromium.launch(executable_path=ns.wrap(CHROMIUM, tmp_path), args=flags)
            local_browser = await p.chromium.launch(executable_path=CHROMIUM, args=flags)
            remote = await (await remote_browser.new_context()).new_page()
            await remote.goto(url + "remote")
            assert await remote.evaluate("window.isSecureContext && !!navigator.mediaDevices")
            await wait_until(remote, "window.chorusReady && window.chorus.localTracks.length === 2", 20)
            local = await (await local_browser.new_context()).new_page()
            await local.goto(url + "local")
            stats = await wait_until(local, f"({INBOUND_STATS})().then(s => s.video_frames > 30 "
                                     "&& s.audio_packets > 50 && s)", 25)
            error = await remote.evaluate("document.getElementById('error').textContent")
            await remote_browser.close()
            await local_browser.close()
        print(f"page in namespace {ns.name} published over https://{ns.host_ip}; the host page decoded {stats}")
        assert "camera" not in error
    finally:
        server.stop()
    assert "Traceback" not in server.log()


async def test_certificate_reloaded_on_sighup(tmp_path: Path) -> None:
    first = tls.self_signed(["127.0.0.1", "first.test"], tmp_path / "first")
    second = tls.self_signed(["127.0.0.1", "second.test"], tmp_path / "second")
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(first[0].read_bytes())
    key.write_bytes(first[1].read_bytes())
    server = ServerProcess(tmp_path, tls=True, env={"CHORUS_TLS_CERT": str(cert), "CHORUS_TLS_KEY": str(key)})
    try:
        assert served_fingerprint(server.port) == tls.fingerprint(tls.certificate(first[0]))
        assert server.get("/healthz")[0] == 200  # HTTPS
        # Renewed files, then SIGHUP: new handshakes get the new certificate, without a restart.
        cert.write_bytes(second[0].read_bytes())
        key.write_bytes(second[1].read_bytes())
        server.proc.send_signal(signal.SIGHUP)
        wanted = tls.fingerprint(tls.certificate(second[0]))
        deadline = time.monotonic() + 5
        while served_fingerprint(server.port) != wanted:
            assert time.monotonic() < deadline, "certificate not reloaded"
            await asyncio.sleep(0.1)
        # A broken file is refused and the working certificate stays.
        cert.write_text("not a certificate")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "certificate not reloaded" not in server.log():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert served_fingerprint(server.port) == wanted
        assert server.proc.poll() is None
        # The container health check (Dockerfile HEALTHCHECK) follows the TLS settings.
        env = {**os.environ, "CHORUS_TLS_CERT": str(second[0]), "CHORUS_TLS_KEY": str(second[1]),
               "CHORUS_PORT": str(server.port), "CHORUS_DEV_MODE": "1"}
        health = subprocess.run([sys.executable, "-m", "chorus.signaling", "health"], env=env, capture_output=True,
                                text=True, timeout=30)
        assert health.returncode == 0, health.stderr
        env["CHORUS_PORT"] = str(free_port())
        health = subprocess.run([sys.executable, "-m", "chorus.signaling", "health"], env=env, capture_output=True,
                                text=True, timeout=30)
        assert health.returncode == 1
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_dockerfile_health_check_uses_chorus_health() -> None:
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert 'HEALTHCHECK --interval=10s --timeout=3s CMD ["chorus", "health"]' in dockerfile
