"""The benchmark runs end to end on a tiny scenario and produces figures (their values are not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chorus.bench import janus


@pytest.mark.timeout(90)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    servers = ["--server", "chorus"] + (["--server", "janus"] if janus.janus_binary() else [])
    proc = subprocess.run(
        [sys.executable, "-m", "chorus.bench", "--scenario", "fanout-2", *servers, "--duration", "3", "--settle", "0.5",
         "--workers", "1", "--no-baseline", "--retry-budget", "0", "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=80,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "1×2" in proc.stdout and "chorus" in proc.stdout  # the table was printed
    result = json.loads(out.read_text())
    assert result["machine"]["nproc"] >= 1
    runs = result["runs"]
    assert [r["server"] for r in runs] == [s for s in servers if s != "--server"]
    for run in runs:
        assert "error" not in run, run
        assert run["tracks"] == 4  # 2 subscribers × (audio + video)
        assert run["packets_per_s"] > 0
        assert run["server_cpu"] >= 0 and run["us_per_packet"] is not None
        for key in ("fps", "video_kbps", "audio_kbps", "loss_pct", "latency_p50_ms", "latency_p95_ms",
                    "first_frame_p50_ms", "rss_mb", "cpu_pct_per_stream", "generator_cpu"):
            assert isinstance(run[key], int | float), (key, run[key])
        assert run["fps"] > 0 and run["latency_samples"] > 0
    if len(runs) == 2:
        assert result["ratios_chorus_janus"] and result["ratios_chorus_janus"][0]["cpu_per_stream"] is not None
