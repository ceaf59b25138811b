"""
``python -m chorus.bench`` (or ``chorus-bench``): Chorus against Janus under identical load, plus the MediaRelay
baseline. Prints one progress line per step on stderr, then the table, the Chorus/Janus ratios and the
targets on stdout, and writes everything as JSON to ``bench/results/<timestamp>.json``.

Examples::

    python -m chorus.bench                                   # everything (what `make bench` runs)
    python -m chorus.bench --scenario fanout-50 --server chorus --profile   # where Chorus spends its time
    python -m chorus.bench --scenario fanout-2 --server chorus --duration 3 --no-baseline   # a quick look
    python -m chorus.bench --scenario simulcast-12 --duration 4           # three layers (and 1×12 to compare with)
    python -m chorus.bench --scenario ramp                                # Chromium's ramp-up, Chorus vs Janus
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import janus, profile, ramp, report, scenarios
from .media import load_clip, load_simulcast_clip
from .run import Options, Pool, run_one
from .servers import ROOT

SERVERS = ("chorus", "janus")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="fanout-N, simulcast-N, meeting-4, audio-10x40 or ramp (the Chromium ramp figure); "
                        "repeatable (default: all of " + ", ".join(s.name for s in scenarios.DEFAULT)
                        + f", then {scenarios.RAMP})")
    parser.add_argument("--server", action="append", choices=[*SERVERS, "relay"],
                        help="server(s) to measure; repeatable (default: chorus and janus)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the MediaRelay (decode + re-encode) baseline runs")
    parser.add_argument("--duration", type=float, default=8.0, help="measurement window, s (default 8)")
    parser.add_argument("--settle", type=float, default=2.0, help="wait after ramp-up, s (default 2)")
    parser.add_argument("--ramp-timeout", type=float, default=40.0, help="max ramp-up time, s (default 40)")
    parser.add_argument("--workers", type=int, default=4, help="receiving generator processes (default 4)")
    parser.add_argument("--server-cpu", type=int, default=0, help="core the server is pinned to (default 0)")
    parser.add_argument("--gen-cpu", type=int, default=1, help="core the generator is pinned to (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin (machines with one core)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the Chorus server with py-spy during each window and print its hot spots")
    parser.add_argument("--retry-budget", type=float, default=420.0,
                        help="re-run (once) the scenarios with an invalid run while the bench has taken less "
                        "than this many seconds (default 420; 0: never); a run is also retried when other processes "
                        "loaded the server's core")
    parser.add_argument("--no-ramp", action="store_true", help="skip the Chromium ramp figure of a full run")
    parser.add_argument("--ramp-rounds", type=int, default=ramp.ROUNDS,
                        help=f"ramp figure: rounds, each publishing into every server (default {ramp.ROUNDS})")
    parser.add_argument("--ramp-duration", type=float, default=ramp.DURATION,
                        help=f"ramp figure: seconds observed after ICE connected (default {ramp.DURATION:g})")
    parser.add_argument("--egress", choices=["hls", "hls-composite"],
                        help="Chorus: also run an HLS egress (of the first publisher, or the room composite) during "
                        "each measurement, to see what a ladder costs the calls")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="do not run: print the tables of an earlier result file")
    parser.add_argument("--output", type=Path, help="JSON result path (default bench/results/<timestamp>.json)")
    return parser


def progress(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    pin = not args.no_pin and cpus >= 2
    options = Options(duration=args.duration, settle=args.settle, ramp_timeout=args.ramp_timeout,
                      server_cpu=args.server_cpu if pin else None, gen_cpu=args.gen_cpu if pin else None,
                      workers=max(1, args.workers), profile=args.profile, egress=args.egress)
    if args.output is not None:
        options.results_dir = args.output.parent
    if pin:
        os.sched_setaffinity(0, {args.gen_cpu})  # this process and its workers: the generator core
    else:
        progress("not pinning (one core, or --no-pin): generator and server share the CPU")

    names = [n for n in args.scenario or [] if n != scenarios.RAMP]
    chosen = [scenarios.by_name(n) for n in names] if args.scenario else list(scenarios.DEFAULT)
    do_ramp = scenarios.RAMP in args.scenario if args.scenario else not args.no_ramp
    for scenario in list(chosen):
        # A simulcast figure is read against the single-layer one of the same fan-out, measured in the same run.
        reference = scenario.reference
        if reference is not None and all(s.name != reference for s in chosen):
            chosen.insert(chosen.index(scenario), scenarios.by_name(reference))
            progress(f"adding {reference}: the single-layer reference of {scenario.name}")
    servers = list(dict.fromkeys(args.server or SERVERS))
    if "janus" in servers and janus.janus_binary() is None:
        progress("janus is not installed (apt-get install -y janus): skipping its runs")
        servers.remove("janus")
    plan = [(kind, s) for s in chosen for kind in servers]
    if not args.no_baseline and "relay" not in servers:
        baseline = [s for s in chosen if not s.meeting and s.video and s.publishers == 1 and not s.simulcast
                    and s.subscribers <= scenarios.BASELINE_MAX_SUBSCRIBERS]
        skipped = [s.title for s in chosen if s.video and not s.meeting and not s.simulcast and s not in baseline]
        plan += [("relay", s) for s in baseline]
        if skipped and baseline:
            progress(f"baseline (MediaRelay) capped at 1×{scenarios.BASELINE_MAX_SUBSCRIBERS}: "
                     f"not run for {', '.join(skipped)} (it saturates a core well before)")
    if any(s.name == "fanout-1" for s in chosen) is False and len(chosen) > 1:
        progress("no fanout-1 run: added latency cannot be computed")

    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    logdir = Path(tempfile.mkdtemp(prefix="chorus-bench-logs-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config: dict[str, Any] = {"duration_s": options.duration, "settle_s": options.settle, "pinned": pin,
                              "server_cpu": options.server_cpu, "gen_cpu": options.gen_cpu,
                              "server_logs": str(logdir)}
    if plan:
        await _load_runs(args, options, plan, chosen, runs, config, logdir, stamp, t0)
    ramp_result = None
    ramp_servers = [kind for kind in servers if kind in SERVERS]
    if do_ramp and ramp_servers:
        progress(f"ramp figure: a Chromium publisher (640x480 fake camera, 30 fps) into {' and '.join(ramp_servers)}, "
                 f"{args.ramp_rounds} round(s) of {args.ramp_duration:g} s")
        ramp_result = await ramp.run(ramp_servers, options, progress, logdir, rounds=max(1, args.ramp_rounds),
                                     duration=args.ramp_duration)
        if "skipped" in ramp_result:
            progress(f"ramp figure skipped: {ramp_result['skipped']}")
    report.add_derived(runs)
    ratio_rows = report.ratios(runs)
    baseline_rows = report.ratios(runs, "chorus", "relay")
    simulcast_rows = report.simulcast_rows(runs)
    result = {
        "started": stamp,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "machine": report.machine(),
        "config": config,
        "runs": runs,
        "ratios_chorus_janus": ratio_rows,
        "ratios_chorus_relay": baseline_rows,
        "simulcast": simulcast_rows,
        "ramp": ramp_result,
        "targets": report.targets(runs, ratio_rows, simulcast_rows, ramp_result),
    }
    return result


async def _load_runs(args: argparse.Namespace, options: Options, plan: list[tuple[str, scenarios.Scenario]],
                     chosen: list[scenarios.Scenario], runs: list[dict[str, Any]], config: dict[str, Any],
                     logdir: Path, stamp: str, t0: float) -> None:
    """The load scenarios of ``plan``, with retries (appends to ``runs``, describes the load in ``config``)."""
    progress("preparing the clip (encoded once, then cached)")
    clip = await asyncio.to_thread(load_clip)
    progress(f"clip: {len(clip.video)} VP8 frames 640x480@30 ({clip.video_kbps:.0f} kbps, keyframe every 1 s), "
             f"Opus {clip.audio_kbps:.0f} kbps")
    simulcast_clip = None
    if any(s.simulcast for s in chosen):
        progress("preparing the simulcast clip (three layers with L1T3 temporal layers, encoded once, then cached)")
        simulcast_clip = await asyncio.to_thread(load_simulcast_clip)
        progress("simulcast clip: " + ", ".join(f"{layer.rid} {layer.width}x{layer.height} {layer.kbps:.0f} kbps"
                                                for layer in simulcast_clip.layers))
    config.update({"clip_video_kbps": round(clip.video_kbps, 1), "clip_audio_kbps": round(clip.audio_kbps, 1),
                   "simulcast_clip": None if simulcast_clip is None else [
                       {"rid": layer.rid, "width": layer.width, "height": layer.height, "kbps": round(layer.kbps, 1)}
                       for layer in simulcast_clip.layers]})
    pool = await Pool.start(options.workers, options.gen_cpu)
    config["generator_processes"] = len(pool.all)
    progress(f"generator: {len(pool.all)} processes on core {options.gen_cpu}; server on core {options.server_cpu}")
    try:
        for i, (kind, scenario) in enumerate(plan, 1):
            progress(f"[{i}/{len(plan)}] {scenario.title} against {kind}")
            runs.append(await run_one(kind, scenario, options, pool, progress, logdir, run_tag=f"{stamp}-"))
        # The machine may be shared: a run whose generator core was too busy is retried once, together
        # with its counterpart on the other server, so that ratios still come from back-to-back runs.
        invalid = list(dict.fromkeys(r["scenario"] for r in runs
                                     if (not r["valid"] or r.get("noisy")) and "error" not in r))
        for name in invalid:
            if time.monotonic() - t0 > args.retry_budget:
                progress(f"no time left to retry {', '.join(invalid[invalid.index(name):])}")
                break
            redo = [(i, kind, s) for i, (kind, s) in enumerate(plan) if s.name == name]
            progress(f"retrying {redo[0][2].title} (a run was invalid, or its server core shared)")
            fresh = [await run_one(kind, s, options, pool, progress, logdir, run_tag=f"{stamp}-retry-")
                     for _, kind, s in redo]

            def score(rs: list[dict[str, Any]]) -> tuple[int, int]:
                return sum(bool(r["valid"]) for r in rs), -sum(bool(r.get("noisy")) for r in rs)

            if score(fresh) >= score([runs[i] for i, _, _ in redo]):
                for (i, _, _), r in zip(redo, fresh, strict=True):
                    r["notes"].append("retried")
                    runs[i] = r
    finally:
        await pool.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile and profile.py_spy() is None:
        print("chorus-bench: --profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    try:
        for name in args.scenario or []:
            if name != scenarios.RAMP:
                scenarios.by_name(name)
    except ValueError as exc:
        print(f"chorus-bench: {exc}", file=sys.stderr)
        return 2
    # Paths from the command line are the caller's; the bench then works from the source tree.
    args.output = args.output.resolve() if args.output is not None else None
    args.render = args.render.resolve() if args.render is not None else None
    os.chdir(ROOT)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        out = args.render
    else:
        result = asyncio.run(_main(args))
        out = args.output or ROOT / "bench" / "results" / f"{result['started']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    print_result(result, out, markdown=args.markdown)
    ramp_result = result.get("ramp")
    runs_ok = all("server_cpu" in r for r in result["runs"])
    ramp_ok = ramp_result is None or "skipped" in ramp_result or any(
        v["rounds"] for v in ramp_result.get("summary", {}).values())
    return 0 if (result["runs"] or ramp_result) and runs_ok and ramp_ok else 1


def print_result(result: dict[str, Any], out: Path, *, markdown: bool = False) -> None:
    runs = result["runs"]
    m = result["machine"]
    result.setdefault("simulcast", [])  # results written before these existed
    result.setdefault("ramp", None)
    print(f"\nChorus benchmark — {m['nproc']} × {m['cpu_model']}, server pinned to core "
          f"{result['config']['server_cpu']}, generator to core {result['config']['gen_cpu']}; "
          f"{result['config']['duration_s']:g} s windows; {result['elapsed_s']:.0f} s in all\n")
    if runs:
        print(report.table(runs, markdown))
    if result["ratios_chorus_janus"]:
        print("\nChorus / Janus (same run; < 1 means Chorus uses less):\n")
        print(report.ratio_table(result["ratios_chorus_janus"], markdown))
    if result["ratios_chorus_relay"]:
        print("\nChorus / MediaRelay baseline:\n")
        print(report.ratio_table(result["ratios_chorus_relay"], markdown))
    if result.get("simulcast"):
        print("\nSimulcast (one publisher sending three layers; subscribers want q, h, f in turn) against the "
              "single-layer run of the same fan-out:\n")
        print(report.simulcast_table(result["simulcast"], markdown))
    if result.get("ramp"):
        print("\nRamp: a Chromium publisher's targetBitrate from ICE connected (640x480 fake camera, 30 fps):\n")
        print(report.ramp_text(result["ramp"], markdown))
    print("\nTargets (measured in this run):\n")
    print(report.targets_text(result["targets"]))
    for run in runs:
        if "profile" in run:
            print(f"\nProfile of {run['server']} at {run['title']} ({run['profile']['folded']}):\n")
            print(profile.format_summary(run["profile"]))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    sys.exit(main())
