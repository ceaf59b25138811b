"""Fixtures: a real Chorus server process on loopback, and aiortc clients connected to it."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from netns import NetworkNamespace, available, sweep

from chorus.sfu import aiortc_adapter
from chorus.signaling.client import ChorusClient

ROOT = Path(__file__).resolve().parent.parent

#: For HTTPS test servers with self-signed certificates.
UNVERIFIED = ssl.create_default_context()
UNVERIFIED.check_hostname = False
UNVERIFIED.verify_mode = ssl.CERT_NONE

# Test clients gather ICE candidates on loopback only: no traffic leaves this machine.
aiortc_adapter.set_host_addresses(["127.0.0.1"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A ``chorus serve`` subprocess; its log is kept for assertions."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, args: list[str] | None = None, tls: bool = False,
                 prefix: list[str] | None = None) -> None:
        """``args``: more ``chorus serve`` arguments; ``tls``: it serves HTTPS/WSS (certificates are not
        verified by the helpers here); ``prefix``: run it under this (e.g. ``ip netns exec NAME``)."""
        self.host = host
        self.port = port or free_port()
        self.scheme = "https" if tls else "http"
        self.log_path = tmp / f"chorus-{self.port}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "chorus.signaling", "serve", "--host", host,
             "--port", str(self.port), *(args or [])],
            cwd=tmp,  # the installed package runs, not whatever the repository root holds
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Stopping (SIGTERM) drains: at most 3 s here, so a test's leftovers never slow the suite down.
            env={**os.environ, "CHORUS_LOG_LEVEL": "info", "CHORUS_DEV_MODE": "1", "CHORUS_JOIN_RATE_PER_IP": "1000",
                 "CHORUS_JOIN_BURST_PER_IP": "1000", "CHORUS_DRAIN_TIMEOUT": "3", **(env or {})},
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self.get("/healthz", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log()
                    self.kill()  # never leave a half-started server behind
                    raise RuntimeError(f"chorus did not start:\n{log}") from None
                time.sleep(0.1)

    @property
    def http_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.scheme == 'https' else 'ws'}://{self.host}:{self.port}/ws"

    def get(self, path: str, *, timeout: float = 5, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """GET ``path``: (status, body); HTTP errors are returned, not raised. Certificates are not verified."""
        request = urllib.request.Request(self.http_url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=UNVERIFIED) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """Crash it: SIGKILL, no goodbye to anyone."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()
    log = proc.log()
    # No test may leave an unhandled exception behind in the server.
    assert "Traceback" not in log and "Task exception was never retrieved" not in log, log[-5000:]


@pytest.fixture
def room_name(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name[:40]}-{os.getpid()}-{time.monotonic_ns() % 100000}".replace("[", "_").replace("]", "_")


@pytest.fixture
async def clients(server: ServerProcess) -> AsyncIterator[list[ChorusClient]]:
    """A list to put connected clients in; all are closed at the end of the test."""
    made: list[ChorusClient] = []
    yield made
    for client in made:
        await client.close()


async def connect(server: ServerProcess, clients: list[ChorusClient], **kwargs: object) -> ChorusClient:
    client = ChorusClient(server.ws_url, **kwargs)  # type: ignore[arg-type]
    await client.connect()
    clients.append(client)
    return client


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], NetworkNamespace]]:
    """Make test hosts (network namespaces on veth pairs, see netns.py); all are removed afterwards."""
    if not available():
        pytest.skip("network namespaces need root, iproute2 and tc")
    made: list[NetworkNamespace] = []

    def make() -> NetworkNamespace:
        made.append(NetworkNamespace())
        return made[-1]

    try:
        yield make
    finally:
        for ns in made:
            ns.delete()
        sweep()


@pytest.fixture
def netns(netns_factory: Callable[[], NetworkNamespace]) -> NetworkNamespace:
    """One test host (a network namespace on a veth pair), removed afterwards."""
    return netns_factory()
