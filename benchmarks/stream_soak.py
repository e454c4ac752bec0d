"""Issue 17: a long stream of one deployable, for growth in memory (RSS) and in end-to-end latency.

    python benchmarks/stream_soak.py DEPLOY_DIR [--minutes 10] [--fps 30] [--window 30]

Streams the generated shapes video through edgebuild.stream's pipeline (capture and inference threads, ring
depth 2, drop-oldest) and prints one row per window: elapsed s, the process's resident memory (VmRSS), frames
processed and dropped in the window, and that window's end-to-end p50/p90. Growth is the last window against
the first one after warm-up. The stream keeps every processed frame's record for its summary (timings and the
result), so RSS grows with the stream's length by design; the table prints that per-frame share beside the total.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("deploy_dir")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per row")
    a = ap.parse_args()

    import numpy as np

    from edgebuild.stream.model import from_deploy_dir
    from edgebuild.stream.pipeline import StreamConfig, run
    from edgebuild.stream.sources import open_source

    model, _ = from_deploy_dir(a.deploy_dir)
    frames = int(a.minutes * 60 * a.fps)
    source = open_source("shapes", model.width, model.height, frames, num_classes=len(model.class_names or []) or 3)
    rows, window, lock = [], [], threading.Lock()
    t0 = time.perf_counter()
    last = [t0, 0]

    def on_result(record) -> None:
        with lock:
            window.append((record.t_done - record.t_capture) * 1000)
            now = time.perf_counter()
            if now - last[0] >= a.window:
                e2e = np.asarray(window)
                rows.append((now - t0, rss_mb(), len(e2e), record.index + 1 - last[1] - len(e2e),
                             float(np.percentile(e2e, 50)), float(np.percentile(e2e, 90))))
                print(f"{rows[-1][0]:7.0f} s  RSS {rows[-1][1]:7.1f} MB  {len(e2e)} frames  "
                      f"p50 {rows[-1][4]:.2f} ms  p90 {rows[-1][5]:.2f} ms  load {os.getloadavg()[0]:.2f}", flush=True)
                window.clear()
                last[0], last[1] = now, record.index + 1

    start_rss, load0 = rss_mb(), os.getloadavg()[0]
    result = run(model, source, StreamConfig(fps=a.fps, frames=frames), on_result=on_result)
    source.close()
    m = result.metrics
    print(f"\n{a.deploy_dir}: {a.minutes:g} min at {a.fps:g} fps offered, {cpu_model()}, load {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; RSS {start_rss:.1f} MB after loading the model\n")
    print("| elapsed s | RSS MB | frames | dropped | e2e p50 ms | e2e p90 ms |\n|---|---|---|---|---|---|")
    for t, rss, n, dropped, p50, p90 in rows:
        print(f"| {t:.0f} | {rss:.1f} | {n} | {dropped} | {p50:.2f} | {p90:.2f} |")
    if len(rows) >= 3:
        first, final = rows[1], rows[-1]  # rows[0] holds the warm-up
        per_frame_kb = (final[1] - first[1]) * 1024 / max(1, sum(r[2] for r in rows[2:]))
        print(f"\nfrom {first[0]:.0f} s to {final[0]:.0f} s: RSS {final[1] - first[1]:+.1f} MB "
              f"(≈ {per_frame_kb:.2f} KB per processed frame, the records kept for the summary), e2e p50 "
              f"{final[4] - first[4]:+.2f} ms, median of the windows' p50 {statistics.median(r[4] for r in rows):.2f} ms")
    print(f"stream: {m['stream/fps']:.2f} fps processed, {m['stream/dropped_frames']} dropped, "
          f"e2e p50 {m['stream/e2e_p50_ms']:.2f} ms, p99 {m['stream/e2e_p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
