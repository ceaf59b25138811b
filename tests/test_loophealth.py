"""Event-loop lag: a blocked loop shows in /readyz and /metrics and is logged once, without /readyz flapping."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import ServerProcess

from chorus.signaling.loophealth import LoopMonitor


def test_blocked_loop_is_visible(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"CHORUS_DEBUG_HOOKS": "1", "CHORUS_LOOP_LAG_WARNING": "0.2"})
    try:
        status, body = server.get("/readyz")
        assert status == 200 and json.loads(body)["loop"]["lag_max_ms"] < 200
        readiness = []
        for _ in range(3):  # three slow callbacks in a row
            request = urllib.request.Request(f"{server.http_url}/api/debug/block?seconds=0.6", method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
            status, body = server.get("/readyz")
            readiness.append(status)
        report = json.loads(body)
        metrics = server.get("/metrics")[1].decode()
        lag = float(re.search(r"^chorus_event_loop_lag_seconds (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
        over = re.search(r'^chorus_event_loop_lag_samples_seconds_bucket\{le="0.5"\} (\S+)$', metrics, re.M)
        total = re.search(r"^chorus_event_loop_lag_samples_seconds_count (\S+)$", metrics, re.M)
        print(f"/readyz after blocking: {report}; chorus_event_loop_lag_seconds {lag}")
        assert readiness == [200, 200, 200]  # lag is reported, never a reason to leave the pool
        assert report["status"] == "ready" and report["loop"]["lag_max_ms"] >= 450
        assert lag >= 0.45
        assert over and total and float(total.group(1)) - float(over.group(1)) >= 3  # three samples above 0.5 s
        time.sleep(0.5)
        log = server.log()
        assert log.count("event loop lagging") == 1, log  # one warning for the burst, not one per sample
    finally:
        server.stop()


def test_debug_hook_is_off_by_default(server: ServerProcess) -> None:
    request = urllib.request.Request(f"{server.http_url}/api/debug/block?seconds=0.1", method="POST")
    try:
        urllib.request.urlopen(request, timeout=5)
        raise AssertionError("the blocking hook must not exist unless debug_hooks is set")
    except urllib.error.HTTPError as exc:
        assert exc.code in (404, 405)


def test_warning_hysteresis() -> None:
    monitor = LoopMonitor(threshold=0.1, window=10.0, warn_every=10.0)
    now = 1000.0
    for i in range(200):  # 20 s of samples alternating around the threshold
        monitor.record(0.15 if i % 2 else 0.05, now=now + i * 0.1)
    assert monitor.warnings == 2  # once per 10 s at most
