"""Issue 17: a long stream of one deployable, for growth in memory (RSS) and in end-to-end latency.

    python benchmarks/stream_soak.py DEPLOY_DIR [--minutes 10] [--fps 30] [--window 30] [--keep-records 1800]

Streams the generated shapes video through edgebuild.stream (`measure`: capture and inference threads, ring depth
2, drop-oldest, the summary kept incrementally, the last `keep_records` frames kept for mAP) and prints one row per
window: elapsed s, the process's resident memory (VmRSS), frames processed and dropped in the window, that window's
end-to-end p50/p90 and the load average. Warm-up ends with the first window by which the stream has processed
`keep_records` frames (the bounded record window is full; the first window at the earliest); growth is the last
window's RSS minus that window's, in MB and per processed frame. FLAT: growth within FLAT_MB.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAT_MB = 1.0  # "no growth": under 1 MB over the post-warm-up soak (about 0.07 KB per frame over 8 min at 30 FPS)


def rss_mb() -> tuple[float, float]:
    """(VmRSS, RssAnon) in MB. RssAnon is the heap (what a growing summary grows); VmRSS adds file-backed pages
    (the runtimes' libraries), which the kernel may reclaim or fault back in under other processes' pressure."""
    f = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in
                                                   Path("/proc/self/status").read_text().splitlines() if ":" in line)
         if k in ("VmRSS", "RssAnon")}
    return f.get("VmRSS", float("nan")), f.get("RssAnon", float("nan"))


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("deploy_dir")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per row")
    ap.add_argument("--keep-records", type=int, default=None, help="records kept for mAP (default: the stream's)")
    a = ap.parse_args()

    import numpy as np

    from edgebuild.stream import measure
    from edgebuild.stream.model import from_deploy_dir
    from edgebuild.stream.pipeline import KEEP_RECORDS, StreamConfig
    from edgebuild.stream.sources import open_source

    keep = KEEP_RECORDS if a.keep_records is None else a.keep_records
    model, _ = from_deploy_dir(a.deploy_dir)
    frames = int(a.minutes * 60 * a.fps)
    source = open_source("shapes", model.width, model.height, frames, num_classes=len(model.class_names or []) or 3)
    rows, window, lock = [], [], threading.Lock()
    t0 = time.perf_counter()
    last = [t0, 0]  # window start, frames captured before it
    total = [0]

    def on_result(record) -> None:
        with lock:
            window.append((record.t_done - record.t_capture) * 1000)
            total[0] += 1
            now = time.perf_counter()
            if now - last[0] >= a.window:
                e2e = np.asarray(window)
                rss, anon = rss_mb()
                rows.append((now - t0, rss, len(e2e), record.index + 1 - last[1] - len(e2e),
                             float(np.percentile(e2e, 50)), float(np.percentile(e2e, 90)), os.getloadavg()[0],
                             total[0], anon))
                print(f"{rows[-1][0]:7.0f} s  RSS {rss:8.2f} MB (anon {anon:.2f})  {len(e2e)} frames  {rows[-1][3]} "
                      "dropped  "
                      f"p50 {rows[-1][4]:.2f} ms  p90 {rows[-1][5]:.2f} ms  load {rows[-1][6]:.2f}", flush=True)
                window.clear()
                last[0], last[1] = now, record.index + 1

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start_rss, load0 = rss_mb()[0], os.getloadavg()
    m, result = measure(model, source, StreamConfig(fps=a.fps, frames=frames, keep_records=keep), (None, None),
                        (2000.0, 3.7), energy_source="model", on_result=on_result)
    source.close()
    load1 = os.getloadavg()
    print(f"\n{a.deploy_dir}: {a.minutes:g} min at {a.fps:g} fps offered, keep_records {keep}; {date}; {cpu_model()}, "
          f"{os.cpu_count()} CPUs; load average (1/5/15 min) {'/'.join(f'{v:.2f}' for v in load0)} at start, "
          f"{'/'.join(f'{v:.2f}' for v in load1)} at end; RSS {start_rss:.1f} MB after loading the model\n")
    print("| window ending at s | " + " | ".join(f"{r[0]:.0f}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label, i, fmt in (("RSS MB", 1, "{:.2f}"), ("RssAnon MB", 8, "{:.2f}"), ("frames", 2, "{}"),
                          ("dropped", 3, "{}"), ("e2e p50 ms", 4, "{:.2f}"), ("e2e p90 ms", 5, "{:.2f}"),
                          ("load (1 min)", 6, "{:.2f}")):
        print(f"| {label} | " + " | ".join(fmt.format(r[i]) for r in rows) + " |")
    warm = next((k for k, r in enumerate(rows) if k >= 1 and r[7] >= keep), None)
    if warm is not None and warm < len(rows) - 1:
        first, final = rows[warm], rows[-1]
        n = final[7] - first[7]
        print(f"\nafter warm-up (window ending {first[0]:.0f} s, {first[7]} frames processed: the {keep}-record window "
              f"full) to {final[0]:.0f} s, {n} frames:")
        for name, i in (("RSS", 1), ("RssAnon", 8)):
            growth, post = final[i] - first[i], [r[i] for r in rows[warm:]]
            print(f"- {name} {growth:+.2f} MB ({growth * 1024 / max(1, n):+.4f} KB per processed frame); range of the "
                  f"post-warm-up windows {max(post) - min(post):.2f} MB; "
                  f"{'FLAT' if abs(growth) <= FLAT_MB else 'GROWING'} (|growth| <= {FLAT_MB} MB is flat)")
        p50s = [r[4] for r in rows[warm:]]
        t = np.asarray([r[0] for r in rows[warm:]]) / 60
        slope = lambda y: float(np.polyfit(t, y, 1)[0])  # noqa: E731 - least squares per minute
        print(f"e2e p50 per window after warm-up: median {statistics.median(p50s):.2f} ms, range "
              f"{min(p50s):.2f}-{max(p50s):.2f} ms, last minus first {final[4] - first[4]:+.2f} ms; trend (least "
              f"squares over those windows): RSS {slope([r[1] for r in rows[warm:]]):+.3f} MB/min, RssAnon "
              f"{slope([r[8] for r in rows[warm:]]):+.3f} MB/min, e2e p50 {slope(p50s):+.3f} ms/min, "
              f"p90 {slope([r[5] for r in rows[warm:]]):+.3f} ms/min")
    print(f"stream: {m['stream/processed_frames']} frames processed, {m['stream/fps']:.2f} fps, "
          f"{m['stream/dropped_frames']} dropped ({m['stream/dropped_fraction']:.1%}), e2e p50 "
          f"{m['stream/e2e_p50_ms']:.2f} / p90 {m['stream/e2e_p90_ms']:.2f} / p99 {m['stream/e2e_p99_ms']:.2f} ms "
          f"(rel. error bound {m['stream/e2e_rel_error']:g}), CPU {m['stream/cpu_util']:.2f} cores; mAP@[.5:.95] "
          f"{m.get('stream/map_50_95', float('nan')):.3f} over the last {m.get('stream/quality_frames', 0)} frames; "
          f"{len(result.records)} records kept")
    for note in result.notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
