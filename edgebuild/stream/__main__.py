"""`python -m edgebuild.stream DEPLOY_DIR [--source shapes|VIDEO|FOLDER|/dev/videoN] [--fps 30] [--seconds 10]`:
stream a build's deployable and print one table (also `--json OUT.json`, the same names as the build's
`stream/*`, `energy/*`, `battery/*` metrics). Exit 0; 2 for bad input (one message, no traceback); 130 on Ctrl-C
(both threads stopped; the table, and --json marked `stream/interrupted`, cover the frames processed until then).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from edgebuild.errors import EdgebuildError
from edgebuild.openmp import limit_spinning  # noqa: E402

limit_spinning()  # before torch loads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edgebuild.stream", description=(
        "Stream a deployable: a capture/decode thread and an inference thread over a bounded ring buffer. Prints "
        "offered vs processed FPS, dropped frames, end-to-end latency, time shares, CPU use, start-up time, "
        "detection quality on the generated video, and a duty-cycle energy estimate."))
    p.add_argument("deploy_dir", help="a build's deploy/ folder (model.json + model files)")
    p.add_argument("--source", default="shapes", help="shapes (generated moving shapes with exact boxes; default), "
                   "a video file (PyAV/FFmpeg), a folder of frames, or a camera /dev/videoN")
    p.add_argument("--fps", type=float, default=30.0, help="offered frame rate (the capture clock; default 30)")
    p.add_argument("--seconds", type=float, default=10.0, help="stream length: fps x seconds frames (default 10)")
    p.add_argument("--frames", type=int, default=None, help="stream length in frames (instead of --seconds)")
    p.add_argument("--depth", type=int, default=2, help="ring buffer capacity in frames (default 2)")
    p.add_argument("--policy", choices=["drop_oldest", "block"], default="drop_oldest",
                   help="a full ring: drop the oldest waiting frame (default), or block the capture")
    p.add_argument("--requests", type=int, default=1, help="inferences in flight: 1 synchronous (default); N > 1 "
                   "the runtime's asynchronous requests (OpenVINO AsyncInferQueue), compared in the table with a "
                   "synchronous stream of the same frames")
    p.add_argument("--reuse-threshold", type=float, default=0.0, help="reuse the last result for frames whose mean "
                   "absolute difference from the last inferred frame is below this fraction of 255 (0: off)")
    p.add_argument("--keep-records", type=int, default=None, help="keep the last N processed frames' results and "
                   "ground truth for quality (mAP, reuse cost; default 1800); the other metrics cover every frame "
                   "in memory that does not grow with the stream")
    p.add_argument("--size", default=None, help="WxH of the generated video (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated video")
    p.add_argument("--still", type=float, default=0.0, help="generated video: expected fraction of the time the "
                   "scene holds still (seeded segments of 15-45 frames; a fixed camera's quiet stretches; default 0)")
    p.add_argument("--slow", type=float, default=0.0, help="generated video: expected fraction of the time in slow "
                   "motion (1/4 speed; default 0)")
    p.add_argument("--cascade-threshold", type=float, default=None, help="a cascade deployable: escalate below "
                   "this small-model confidence instead of model.json's threshold")
    p.add_argument("--annotate", default=None, help="write the processed frames with results drawn (.mp4)")
    p.add_argument("--json", default=None, help="write the metrics as JSON")
    p.add_argument("--active-watts", type=float, default=None, help="device power busy (default: target spec.power)")
    p.add_argument("--idle-watts", type=float, default=None, help="device power idle (default: target spec.power)")
    p.add_argument("--energy", choices=["auto", "rapl", "model"], default="auto", help="energy figures: measured "
                   "by the Linux RAPL counters where readable, else the stated power model (auto, default); rapl "
                   "only (exit 2 where unreadable); model only (the target spec's powers)")
    p.add_argument("--battery-mah", type=float, default=2000.0, help="battery capacity for battery/hours (2000)")
    p.add_argument("--battery-volts", type=float, default=3.7, help="battery voltage (3.7)")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> tuple[int, int] | None:
    """Everything a user can get wrong, before anything is loaded."""
    from edgebuild.stream.pipeline import StreamConfig

    if not (math.isfinite(a.fps) and a.fps > 0):
        raise EdgebuildError(f"--fps {a.fps:g}: the offered frame rate must be a positive number",
                             "give --fps > 0, e.g. --fps 30")
    if a.frames is None and not (math.isfinite(a.seconds) and a.seconds > 0):
        raise EdgebuildError(f"--seconds {a.seconds:g} must be positive", "give --seconds > 0, or --frames N")
    StreamConfig(fps=a.fps, frames=frames_of(a), depth=a.depth, policy=a.policy,
                 reuse_threshold=a.reuse_threshold, requests=a.requests, keep_records=keep_of(a)).check()
    for flag in ("active_watts", "idle_watts"):
        v = getattr(a, flag)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise EdgebuildError(f"--{flag.replace('_', '-')} {v:g} must be >= 0 watts", "give a power in watts")
    if not (0 <= a.still <= 1 and 0 <= a.slow <= 1 and a.still + a.slow <= 1):
        raise EdgebuildError(f"--still {a.still:g} / --slow {a.slow:g}: fractions of the time in [0, 1], summing to "
                             "at most 1", "give e.g. --still 0.5 --slow 0.2")
    if (a.still or a.slow) and a.source != "shapes":
        raise EdgebuildError(f"--still / --slow shape the generated video; --source {a.source} is recorded",
                             "drop --still and --slow, or use --source shapes")
    if a.cascade_threshold is not None and not 0 <= a.cascade_threshold <= 1:
        raise EdgebuildError(f"--cascade-threshold {a.cascade_threshold:g} is not a confidence in [0, 1]",
                             "give e.g. --cascade-threshold 0.9")
    if a.battery_mah <= 0 or a.battery_volts <= 0:
        raise EdgebuildError("--battery-mah and --battery-volts must be positive", "e.g. --battery-mah 2000 "
                             "--battery-volts 3.7")
    if a.size is None:
        return None
    try:
        w, h = (int(v) for v in a.size.lower().split("x"))
        assert w > 0 and h > 0
    except (ValueError, AssertionError):
        raise EdgebuildError(f"--size {a.size!r} is not WxH", "give e.g. --size 320x240") from None
    return w, h


def keep_of(a: argparse.Namespace) -> int:
    from edgebuild.stream.pipeline import KEEP_RECORDS

    return KEEP_RECORDS if a.keep_records is None else a.keep_records


def frames_of(a: argparse.Namespace) -> int:
    return a.frames if a.frames is not None else max(1, round(a.fps * a.seconds))


ROWS = [  # (label, metric, format)
    ("offered FPS", "stream/offered_fps", "{:.1f}"), ("captured FPS", "stream/captured_fps", "{:.1f}"),
    ("processed FPS", "stream/fps", "{:.1f}"), ("frames captured", "stream/frames", "{}"),
    ("frames processed", "stream/processed_frames", "{}"), ("dropped frames", "stream/dropped_frames", "{}"),
    ("inference requests in flight", "stream/requests", "{}"),
    ("inferences / reused", None, None),
    ("e2e latency p50 / p90 / p99 (ms)", None, None),
    ("time shares decode / pre / infer / post", None, None),
    ("per frame decode / pre / infer / post (ms)", None, None),
    ("CPU utilisation (cores; of machine)", None, None),
    ("load + compile (ms)", "stream/load_ms", "{:.1f}"),
    ("time to first result (ms)", "stream/first_result_ms", "{:.1f}"),
    ("mAP@0.5 / mAP@[.5:.95] / recall (vs exact boxes)", None, None),
    ("quality over the last N processed frames (kept)", "stream/quality_frames", "{}"),
    ("mAP@[.5:.95] every frame inferred / reuse cost (points)", None, None),
    ("top-1 accuracy (vs the frames' labels)", None, None),
    ("cascade: threshold; escalated to the big model", None, None),
    ("cascade: per inferred frame small / per escalation big (ms)", None, None),
    ("cascade: e2e p50 / p90 small answered (ms)", None, None),
    ("cascade: e2e p50 / p90 escalated (ms)", None, None),
    ("energy source (rapl: measured here; model: estimate)", "energy/source", "{}"),
    ("energy per inference (mJ)", "energy/mj_per_inference", "{:.3f}"),
    ("busy fraction / average power (W)", None, None),
    ("battery life (h)", "battery/hours", "{:.1f}"),
    ("model estimate: mJ / inference; battery (h)", None, None),
]


def rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    def f(key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(m[key]) if key in m else "-"

    special = {
        "inferences / reused": f"{m['stream/inferences']} / {m['stream/reused_frames']} "
                               f"({m['stream/reuse_fraction']:.0%} saved)",
        "e2e latency p50 / p90 / p99 (ms)": " / ".join(f(f"stream/e2e_{p}_ms") for p in ("p50", "p90", "p99")),
        "time shares decode / pre / infer / post": " / ".join(f"{m[f'stream/share_{s}']:.0%}" for s in
                                                              ("decode", "preprocess", "inference", "postprocess")),
        "per frame decode / pre / infer / post (ms)": " / ".join(f(f"stream/{s}_ms", "{:.2f}") for s in
                                                                 ("decode", "preprocess", "inference", "postprocess")),
        "CPU utilisation (cores; of machine)": f"{m['stream/cpu_util']:.2f}; {m['stream/cpu_util_machine']:.0%}",
        "mAP@0.5 / mAP@[.5:.95] / recall (vs exact boxes)": " / ".join(f(k, "{:.3f}") for k in (
            "stream/map_50", "stream/map_50_95", "stream/recall_100")),
        "mAP@[.5:.95] every frame inferred / reuse cost (points)": f"{f('stream/map_50_95_every_frame', '{:.3f}')} / "
                                                                   f"{f('stream/reuse_map_cost', '{:+.2f}')}",
        "top-1 accuracy (vs the frames' labels)": f("stream/acc_top1", "{:.4f}"),
        "cascade: threshold; escalated to the big model": f"{m['stream/cascade_threshold']:g}; "
        f"{m['stream/cascade_escalated']:.1%} ({m['stream/cascade_escalated_frames']} frames)"
        if "stream/cascade_escalated" in m else "-",
        "cascade: per inferred frame small / per escalation big (ms)": " / ".join(
            f(f"stream/cascade_{s}_ms", "{:.2f}") for s in ("small", "big")),
        "cascade: e2e p50 / p90 small answered (ms)": " / ".join(
            f(f"stream/cascade_e2e_{p}_small_ms") for p in ("p50", "p90")),
        "cascade: e2e p50 / p90 escalated (ms)": " / ".join(
            f(f"stream/cascade_e2e_{p}_escalated_ms") for p in ("p50", "p90")),
        "busy fraction / average power (W)": f"{f('energy/busy_fraction', '{:.1%}')} / "
                                             f"{f('energy/avg_power_w', '{:.3f}')}",
        "model estimate: mJ / inference; battery (h)": (f"{f('energy/model_mj_per_inference', '{:.3f}')}; "
                                                        f"{f('battery/model_hours')}")
        if m.get("energy/source") == "rapl" else "-",
    }
    out = []
    for label, key, fmt in ROWS:
        value = special[label] if key is None else (fmt.format(m[key]) if key in m else "-")
        if value.replace(" ", "").strip("-/;") or key is not None:
            out.append((label, value))
    return out


def print_table(m: dict[str, Any], title: str, notes: list[str], compare: dict[str, dict[str, Any]] | None = None,
                main_name: str = "value") -> None:
    """One table; `compare` {column name: metrics} adds columns (e.g. the synchronous stream beside async)."""
    from rich.console import Console
    from rich.table import Table

    compare = compare or {}
    t = Table(title=title, title_justify="left")
    t.add_column("stream")
    t.add_column(main_name, justify="right")
    for name in compare:
        t.add_column(name, justify="right")
    others = [dict(rows(c)) for c in compare.values()]
    for label, value in rows(m):
        t.add_row(label, value, *(o.get(label, "-") for o in others))
    console = Console()
    console.print(t)
    for n in notes:
        console.print(f"- {n}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        size = check_args(a)
        from edgebuild.stream import energy, measure
        from edgebuild.stream.annotate import Annotator
        from edgebuild.stream.model import from_deploy_dir
        from edgebuild.stream.pipeline import Interrupted, StreamConfig
        from edgebuild.stream.sources import open_source

        if a.json and not Path(a.json).expanduser().parent.is_dir():
            raise EdgebuildError(f"--json {a.json}: its folder does not exist", "create it or give another path")
        t_start = time.perf_counter()
        model, target = from_deploy_dir(a.deploy_dir, a.cascade_threshold)
        frames = frames_of(a)
        w, h = size or (model.width, model.height)
        source = open_source(a.source, w, h, frames, seed=a.seed, num_classes=len(model.class_names or []) or 3,
                             still=a.still, slow=a.slow)
        spec = json.loads((Path(a.deploy_dir).expanduser() / "model.json").read_text())
        precision = energy.precision_key(spec.get("precision"))
        from omegaconf import OmegaConf

        active, idle, where = energy.device_powers(OmegaConf.to_container(target.cfg.spec.power), precision)
        if a.active_watts is not None:
            active, where = a.active_watts, "--active-watts"
        if a.idle_watts is not None:
            idle = a.idle_watts
        annotate = Annotator(Path(a.annotate).expanduser(), a.fps, model.class_names) if a.annotate else None
        cfg = StreamConfig(fps=a.fps, frames=frames, depth=a.depth, policy=a.policy, reuse_threshold=a.reuse_threshold,
                           requests=a.requests, keep_records=keep_of(a))
        if a.requests > 1 and not model.async_capable:  # before anything streams
            raise EdgebuildError(f"--requests {a.requests} asks for asynchronous inference, which {model.describe} "
                                 "does not offer", "give --requests 1, or a deployable on a runtime with "
                                 "asynchronous requests (OpenVINO)")
        compare: dict[str, dict[str, Any]] = {}
        interrupted = False
        try:
            try:
                metrics, result = measure(model, source, cfg, (active, idle), (a.battery_mah, a.battery_volts),
                                          t_start, annotate, a.energy, first_result_line(t_start))
            except Interrupted as e:
                if e.result is None:
                    raise
                metrics, result, interrupted = e.metrics, e.result, True
            if a.requests > 1 and not interrupted:  # the same frames synchronously: the comparison column
                sync_source = open_source(a.source, w, h, frames, seed=a.seed,
                                          num_classes=len(model.class_names or []) or 3, still=a.still, slow=a.slow)
                try:
                    compare["synchronous (1 request)"], _ = measure(
                        model, sync_source, StreamConfig(**{**vars(cfg), "requests": 1}), (active, idle),
                        (a.battery_mah, a.battery_volts), energy_source=a.energy)
                except Interrupted as e:
                    if e.metrics:
                        compare["synchronous (1 request), interrupted"] = e.metrics
                    interrupted = True
                finally:
                    sync_source.close()
        finally:
            source.close()
    except EdgebuildError as e:
        print(f"edgebuild.stream: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nedgebuild.stream: interrupted before any frame was processed; both threads stopped",
              file=sys.stderr)
        return 130
    notes = list(result.notes)
    if metrics.get("energy/source") == "rapl":
        notes.append(f"energy: MEASURED by RAPL on this machine's CPU packages ({metrics['energy/rapl_j']:.2f} J over "
                     f"{metrics['stream/wall_s']:.1f} s, everything running on them included); the model estimate "
                     "from the stated powers is the energy/model_* row")
    elif "energy/mj_per_inference" in metrics:
        notes.append(f"energy: ESTIMATES from stated powers ({active:g} W active, {idle or 0:g} W idle, {precision}; "
                     f"{where or 'no source given'}) x the busy time measured here; formulas in "
                     "edgebuild/stream/energy.py")
    else:
        notes.append("energy: no power figures (target spec.power or --active-watts): no estimate")
    if "stream/cascade_escalated" in metrics:
        from edgebuild.stream import cascade_note

        notes.append(cascade_note(metrics))
    if a.annotate:
        notes.append(f"annotated video: {a.annotate} ({metrics['stream/annotated_frames']} processed frames)")
    title = (f"{model.describe} | {source.describe()} | {a.fps:g} FPS offered, ring {a.depth}, {a.policy}"
             + (f", reuse < {a.reuse_threshold:g}" if a.reuse_threshold else "")
             + (" | INTERRUPTED (Ctrl-C): partial" if interrupted else ""))
    print_table(metrics, title, notes, compare, f"{a.requests} requests (async)" if a.requests > 1 else "value")
    if a.json:
        out = {**metrics, "stream/source": source.describe(), "stream/policy": a.policy, "notes": notes,
               **({"compare": compare} if compare else {})}
        write_atomic(Path(a.json).expanduser(), json.dumps(out, indent=2))
    if interrupted:
        print("edgebuild.stream: interrupted; both threads stopped (the table covers the frames processed)",
              file=sys.stderr)
        return 130
    return 0


def first_result_line(t_start: float) -> Any:
    """An on_result hook: one stderr line when the first result is ready (the stream runs; Ctrl-C stops it)."""
    said = []

    def hook(record: Any) -> None:
        if not said:
            said.append(1)
            print(f"edgebuild.stream: first result {(record.t_done - t_start) * 1000:.0f} ms after start; streaming "
                  "(Ctrl-C stops it with a partial table)", file=sys.stderr, flush=True)

    return hook


def write_atomic(path: Path, text: str) -> None:
    """Written beside `path` and renamed over it: a reader (or a Ctrl-C) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
