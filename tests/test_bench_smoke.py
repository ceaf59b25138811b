"""The benchmark runs end to end on tiny scenarios and produces figures (their values are not tested): a 1×2 fan-out,
and the same with the publisher sending three simulcast layers (subscribers wanting the lowest and the middle one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chorus.bench import janus, ramp


@pytest.mark.timeout(90)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    servers = ["--server", "chorus"] + (["--server", "janus"] if janus.janus_binary() else [])
    proc = subprocess.run(
        [sys.executable, "-m", "chorus.bench", "--scenario", "fanout-2", "--scenario", "simulcast-2", *servers,
         "--duration", "2", "--settle", "0.5", "--workers", "1", "--no-baseline", "--retry-budget", "0",
         "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=85,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "1×2" in proc.stdout and "chorus" in proc.stdout  # the table was printed
    result = json.loads(out.read_text())
    assert result["machine"]["nproc"] >= 1
    runs = result["runs"]
    kinds = [s for s in servers if s != "--server"]
    assert [(r["scenario"], r["server"]) for r in runs] == [(n, k) for n in ("fanout-2", "simulcast-2") for k in kinds]
    for run in runs:
        assert "error" not in run, run
        assert run["tracks"] == 4  # 2 subscribers × (audio + video)
        assert run["packets_per_s"] > 0
        assert run["server_cpu"] >= 0 and run["us_per_packet"] is not None
        for key in ("fps", "video_kbps", "audio_kbps", "loss_pct", "latency_p50_ms", "latency_p95_ms",
                    "first_frame_p50_ms", "rss_mb", "cpu_pct_per_stream", "generator_cpu"):
            assert isinstance(run[key], int | float), (key, run[key])
        assert run["fps"] > 0 and run["latency_samples"] > 0
    # Simulcast: each subscriber's layer is known (from the picture size it received), and compared with 1×2.
    for row in result["simulcast"]:
        assert row["reference"] == "fanout-2" and row["cpu_per_stream_ratio"] is not None, row
        assert [layer["wanted"] for layer in row["layers"]] == [1, 1, 0], row
        assert sum(layer["ended_on"] for layer in row["layers"]) == 2, row
    assert [row["server"] for row in result["simulcast"]] == kinds
    if len(kinds) == 2:
        assert result["ratios_chorus_janus"] and result["ratios_chorus_janus"][0]["cpu_per_stream"] is not None


def test_ramp_figures_from_a_browser_series() -> None:
    """The ramp figure's arithmetic on a synthetic targetBitrate series (100 ms samples, ICE connected at 1 s)."""
    series = [[1000 + 100 * i, min(1_700_000, 300_000 + 150_000 * i), "bandwidth" if i < 5 else "none", 480, 30.0, 0]
              for i in range(121)]
    figures = ramp.analyse(1000, series, duration=12)
    assert figures["final_kbps"] == 1700
    assert figures["ramp_s"] == 0.9  # 300 + 150 × 9 = 1650 kbps ≥ 90 % of 1700
    assert figures["to_1mbps_s"] == 0.5
    assert figures["cpu_limited_at_s"] is None
    assert figures["limitation_s"]["bandwidth"] == 0.5
    # A window in which the encoder was limited by CPU is marked (the bench then voids and repeats it).
    series[30][2] = "cpu"
    assert ramp.analyse(1000, series, duration=12)["cpu_limited_at_s"] == 3.0
