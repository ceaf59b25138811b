"""Turning runs into the summary: added latency, Chorus/Janus ratios, the targets, a text table."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import aiortc

from . import janus


def machine() -> dict[str, Any]:
    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     None)
    except (OSError, subprocess.SubprocessError):
        pass
    janus_version = None
    binary = janus.janus_binary()
    if binary:
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout
            janus_version = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                                  if line.startswith("Janus version")), None)
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiortc": aiortc.__version__,
        "janus": janus_version,
    }


def add_derived(runs: list[dict[str, Any]]) -> None:
    """Added latency against each server's 1-subscriber run (video against video, audio against audio)."""
    reference = {r["server"]: r for r in runs if r["scenario"] == "fanout-1" and r.get("latency_p50_ms") is not None}
    for run in runs:
        ref = reference.get(run["server"])
        if ref is None or run.get("latency_p50_ms") is None:
            continue
        if run["latency_kind"] == "video":
            base50, base95 = ref["latency_p50_ms"], ref["latency_p95_ms"]
        else:
            base50, base95 = ref.get("audio_latency_p50_ms"), ref.get("audio_latency_p95_ms")
        if base50 is None or base95 is None:
            continue
        run["added_latency_p50_ms"] = round(run["latency_p50_ms"] - base50, 3)
        run["added_latency_p95_ms"] = round(run["latency_p95_ms"] - base95, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def ratios(runs: list[dict[str, Any]], server: str = "chorus", other: str = "janus") -> list[dict[str, Any]]:
    by_key = {(r["scenario"], r["server"]): r for r in runs}
    out = []
    for run in runs:
        if run["server"] != server:
            continue
        peer = by_key.get((run["scenario"], other))
        if peer is None or "server_cpu" not in run or "server_cpu" not in peer:
            continue
        out.append({
            "scenario": run["scenario"], "title": run["title"], "versus": other,
            "cpu_per_stream": _ratio(run["cpu_pct_per_stream"], peer["cpu_pct_per_stream"]),
            "us_per_packet": _ratio(run.get("us_per_packet"), peer.get("us_per_packet")),
            "rss": _ratio(run.get("rss_mb"), peer.get("rss_mb")),
            "latency_p50": _ratio(run.get("latency_p50_ms"), peer.get("latency_p50_ms")),
            "first_frame_p50": _ratio(run.get("first_frame_p50_ms"), peer.get("first_frame_p50_ms")),
            "valid": bool(run.get("valid") and peer.get("valid")),
        })
    return out


#: Simulcast may cost this much more CPU per forwarded stream than forwarding a single layer (issue 11).
SIMULCAST_CPU_LIMIT = 1.2


def simulcast_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each simulcast run against the single-layer run of the same fan-out on the same server, and where its
    subscribers ended."""
    by_key = {(r["scenario"], r["server"]): r for r in runs}
    out = []
    for run in runs:
        summary = run.get("simulcast")
        if summary is None or "server_cpu" not in run:
            continue
        ref = by_key.get((run.get("reference"), run["server"]))
        if ref is not None and "server_cpu" not in ref:
            ref = None
        out.append({
            "scenario": run["scenario"], "title": run["title"], "server": run["server"],
            "reference": run.get("reference"),
            "cpu_pct_per_stream": run["cpu_pct_per_stream"],
            "reference_cpu_pct_per_stream": ref["cpu_pct_per_stream"] if ref else None,
            "cpu_per_stream_ratio": _ratio(run["cpu_pct_per_stream"], ref["cpu_pct_per_stream"]) if ref else None,
            "us_per_packet_ratio": _ratio(run.get("us_per_packet"), ref.get("us_per_packet")) if ref else None,
            "layers": summary["layers"],
            "mismatched": summary["mismatched"],
            "server_reasons": summary.get("server_reasons"),
            "valid": bool(run.get("valid") and ref is not None and ref.get("valid")),
        })
    return out


def targets(runs: list[dict[str, Any]], ratio_rows: list[dict[str, Any]],
            simulcast: list[dict[str, Any]] | None = None, ramp: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issues' targets, as measured in this run (reported, never asserted)."""
    chorus = {r["scenario"]: r for r in runs if r["server"] == "chorus" and "server_cpu" in r}
    ratio = {r["scenario"]: r for r in ratio_rows}
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any, ok: bool | None, detail: str = "") -> None:
        rows.append({"target": name, "value": value, "met": ok, "detail": detail})

    r50 = ratio.get("fanout-50")
    value = r50["cpu_per_stream"] if r50 else None
    add("CPU per forwarded video stream ≤ 2× Janus at 1×50", value, None if value is None else value <= 2.0,
        "Chorus/Janus ratio of CPU per forwarded stream")
    c100 = chorus.get("fanout-100")
    if c100 is not None and c100.get("fps") is not None:
        ok = c100["loss_pct"] < 1.0 and c100["fps"] >= 29 and not c100.get("saturated", False)
        add("1×100 on one core: < 1 % loss, ≥ 29 fps", f"{c100['loss_pct']} % loss, {c100['fps']} fps", ok,
            f"server core {((c100.get('server_core_busy') or c100['server_cpu']) * 100):.0f}% busy")
    else:
        add("1×100 on one core: < 1 % loss, ≥ 29 fps", None, None)
    c50 = chorus.get("fanout-50")
    if c50 is not None and c50.get("added_latency_p50_ms") is not None:
        a50, a95 = c50["added_latency_p50_ms"], c50["added_latency_p95_ms"]
        add("added latency at 1×50 vs 1×1: p50 ≤ 5 ms, p95 ≤ 15 ms", f"p50 {a50} ms, p95 {a95} ms",
            a50 <= 5 and a95 <= 15)
    else:
        add("added latency at 1×50 vs 1×1: p50 ≤ 5 ms, p95 ≤ 15 ms", None, None)
    firsts = [(r["title"], r["first_frame_p50_ms"]) for r in chorus.values()
              if r["scenario"].startswith("fanout-") and r.get("first_frame_p50_ms") is not None]
    if firsts:
        worst = max(v for _, v in firsts)
        add("join → first frame ≤ 500 ms p50", f"{worst:.0f} ms (worst fan-out p50)", worst <= 500,
            ", ".join(f"{t}: {v:.0f} ms" for t, v in firsts))
    else:
        add("join → first frame ≤ 500 ms p50", None, None)
    name = f"CPU per forwarded stream with simulcast ≤ {SIMULCAST_CPU_LIMIT}× single-layer (Chorus)"
    measured = [r for r in simulcast or [] if r["server"] == "chorus" and r["cpu_per_stream_ratio"] is not None]
    if measured:
        worst = max(measured, key=lambda r: r["cpu_per_stream_ratio"])
        add(name, worst["cpu_per_stream_ratio"], worst["cpu_per_stream_ratio"] <= SIMULCAST_CPU_LIMIT,
            "; ".join(f"{r['title']} vs {r['reference']}: {r['cpu_per_stream_ratio']} (µs/pkt "
                      f"{r['us_per_packet_ratio']}){'' if r['valid'] else ', a run invalid'}" for r in measured))
    else:
        add(name, None, None)
    summary = (ramp or {}).get("summary") or {}
    c, j = summary.get("chorus", {}).get("ramp_s"), summary.get("janus", {}).get("ramp_s")
    detail = "median time from ICE connected to 90 % of the final targetBitrate, Chromium 640x480"
    if c is not None and j is not None:
        add("publisher ramp: Chorus ≤ Janus", f"{c} s vs {j} s", c <= j, detail)
    else:
        add("publisher ramp: Chorus ≤ Janus", None if c is None else f"{c} s (Chorus)", None, detail)
    return rows


# --- text ---------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


COLUMNS = [
    ("scenario", "title", ""), ("server", "server", ""), ("streams", "streams", ""),
    ("CPU s/s", "server_cpu", ".3f"), ("%core/stream", "cpu_pct_per_stream", ".3f"),
    ("µs/pkt", "us_per_packet", ".1f"), ("fps", "fps", ".1f"), ("kbps", "video_kbps", ".0f"),
    ("loss %", "loss_pct", ".2f"), ("lat p50", "latency_p50_ms", ".2f"), ("lat p95", "latency_p95_ms", ".2f"),
    ("+p50", "added_latency_p50_ms", ".2f"), ("+p95", "added_latency_p95_ms", ".2f"),
    ("1st frame p50", "first_frame_p50_ms", ".0f"), ("RSS MB", "rss_mb", ".0f"),
    ("gen core %", "generator_core_busy", ""), ("notes", "notes", ""),
]


def _cell(run: dict[str, Any], key: str, spec: str) -> str:
    value = run.get(key)
    if key == "generator_core_busy":
        return "–" if value is None else f"{value * 100:.0f}"
    if key == "notes":
        notes = list(value or [])
        if run.get("error"):
            notes.append(run["error"][:60])
        return "; ".join(notes)
    if key == "video_kbps" and value is None:
        value = run.get("audio_kbps")
    return _fmt(value, spec)


def table(runs: list[dict[str, Any]], markdown: bool = False) -> str:
    header = [c[0] for c in COLUMNS]
    rows = [[_cell(r, key, spec) for _, key, spec in COLUMNS] for r in runs]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 1, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def ratio_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    header = ["scenario", "CPU/stream", "µs/pkt", "RSS", "latency p50", "1st frame p50", "valid"]
    body = [[r["title"], _fmt(r["cpu_per_stream"]), _fmt(r["us_per_packet"]), _fmt(r["rss"]),
             _fmt(r["latency_p50"]), _fmt(r["first_frame_p50"]), "yes" if r["valid"] else "no"] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                          *("| " + " | ".join(b) + " |" for b in body)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
                     for cells in [header, ["-" * w for w in widths], *body])


def targets_text(rows: list[dict[str, Any]]) -> str:
    mark = {True: "met", False: "NOT met", None: "not measured"}
    return "\n".join(f"- {r['target']}: {_fmt(r['value'])} → {mark[r['met']]}" + (f" ({r['detail']})" if r["detail"]
                                                                                 else "") for r in rows)


def simulcast_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    header = ["scenario", "server", "%core/stream", "single-layer", "ratio", "µs/pkt ratio", "ended on (wanted)",
              "fps q/h/f", "kbps q/h/f", "server's reasons", "valid"]
    body = []
    for r in rows:
        layers = r["layers"]
        body.append([
            r["title"], r["server"], _fmt(r["cpu_pct_per_stream"], ".3f"),
            _fmt(r["reference_cpu_pct_per_stream"], ".3f"),
            _fmt(r["cpu_per_stream_ratio"]), _fmt(r["us_per_packet_ratio"]),
            " ".join(f"{x['rid']} {x['ended_on']} ({x['wanted']})" for x in layers)
            + (f", {r['mismatched']} off" if r["mismatched"] else ""),
            "/".join(_fmt(x["fps"]) for x in layers), "/".join(_fmt(x["kbps"]) for x in layers),
            ", ".join(f"{k} {v}" for k, v in (r.get("server_reasons") or {}).items()) or "–",
            "yes" if r["valid"] else "no",
        ])
    return _grid(header, body, markdown)


def ramp_text(ramp: dict[str, Any], markdown: bool = False) -> str:
    if "skipped" in ramp:
        return f"skipped: {ramp['skipped']}"
    header = ["server", "rounds", "90 % of final (s)", "1 Mbps (s)", "final kbps", "void (cpu)", "failed",
              "other load on server core"]

    def mbps(s: dict[str, Any]) -> str:
        if s["to_1mbps_s"] is not None:
            return _fmt(s["to_1mbps_s"])
        return f"> {ramp['duration_s']:g}" if s["rounds"] else "–"

    body = [[kind, str(s["rounds"]), _fmt(s["ramp_s"]), mbps(s), _fmt(s["final_kbps"]), str(s["void"]),
             str(s["failed"]), "–" if s.get("server_core_other_load") is None
             else f"≤ {s['server_core_other_load'] * 100:.0f}%"] for kind, s in ramp["summary"].items()]
    lines = [_grid(header, body, markdown), "",
             "Medians over the rounds; a round that never reached 1 Mbps counts as the slowest. Rounds:", ""]
    for a in ramp["attempts"]:
        head = f"round {a['round']} {a['server']}" + (f" (attempt {a['attempt']})" if a["attempt"] > 1 else "")
        if "error" in a:
            lines.append(f"- {head}: failed: {a['error'][:200]}")
            continue
        series = " ".join(f"{t:g}:{kbps}" for t, kbps, *_ in a["series"])
        state = f" VOID (qualityLimitationReason cpu at {a['cpu_limited_at_s']} s)" if a["void"] else ""
        if a.get("server_core_other_load") is not None:
            state += f", other load on the server's core {a['server_core_other_load'] * 100:.0f}%"
        lines.append(f"- {head}: 90 % of {a['final_kbps']} kbps at {a['ramp_s']} s, 1 Mbps at {a['to_1mbps_s']} s, "
                     f"{a['final_height']}p {a['final_fps']} fps at the end{state}; targetBitrate (s:kbps) {series}")
    return "\n".join(lines)


def _grid(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                          *("| " + " | ".join(b) + " |" for b in body)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
                     for cells in [header, ["-" * w for w in widths], *body])
