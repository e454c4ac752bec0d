"""The stream's summary kept as the frames arrive, in memory that does not grow with the stream's length: counts,
per-stage time sums, first/last result times, the busy-time union of the work intervals, and the end-to-end latency
percentiles (exact for the first EXACT_LATENCIES frames, then a fixed log-bucket histogram within 0.5 %:
`Quantiles`, defined in the runner that ships with the deployable so both use one implementation).

The per-frame results and ground truth (quality: mAP, reuse's mAP cost, the exactness test) are a separate, bounded
window: `StreamConfig.keep_records` (pipeline.py)."""

from __future__ import annotations

import heapq
import math
import os
from typing import Any

from edgebuild.stream.runner import Quantiles

STAGES = ("decode", "preprocess", "inference", "postprocess")
EXACT_LATENCIES = 10_000  # e2e values kept for exact percentiles (80 KB; 5.5 min at 30 FPS), a histogram beyond

__all__ = ["EXACT_LATENCIES", "BusyUnion", "Quantiles", "StreamStats"]


class BusyUnion:
    """The total length of a union of [start, end] intervals, kept incrementally. New intervals wait in a min-heap
    of at most `window` (ordered by start) and are merged into a running (total, end) in start order as it
    overflows: exact while no interval arrives `window` or more places after one that starts later. The stream's
    intervals arrive in start order (both inference loops start frames in capture order); async requests overlap
    their neighbours only."""

    def __init__(self, window: int = 64):
        self.window, self.heap = window, []
        self.total, self.end = 0.0, -math.inf

    def add(self, start: float, end: float) -> None:
        heapq.heappush(self.heap, (start, end))
        if len(self.heap) > self.window:
            self.total, self.end = self._merge(self.total, self.end, *heapq.heappop(self.heap))

    @staticmethod
    def _merge(total: float, end: float, a: float, b: float) -> tuple[float, float]:
        if b <= end:
            return total, end
        return total + b - max(a, end), b

    def seconds(self) -> float:
        total, end = self.total, self.end
        for a, b in sorted(self.heap):
            total, end = self._merge(total, end, a, b)
        return total


class StreamStats:
    """What `summarize` reports, updated per captured frame (`capture`, capture thread) and per processed frame
    (`add`, inference thread); `metrics` reads it (the main thread, once both threads stopped)."""

    def __init__(self, exact: int = EXACT_LATENCIES):
        self.captured, self.first_capture, self.last_capture = 0, math.nan, math.nan
        self.processed = self.inferred = 0
        self.first_done, self.last_done, self.min_done = math.nan, math.nan, math.inf
        self.stage_s = dict.fromkeys(STAGES, 0.0)
        self.work_s = 0.0  # model stages of the inferred frames, overlaps counted each time
        self.busy = BusyUnion()
        self.e2e = Quantiles(exact)

    def capture(self, t_capture: float) -> None:
        if not self.captured:
            self.first_capture = t_capture
        self.captured += 1
        self.last_capture = t_capture

    def add(self, r: Any) -> None:
        """One processed frame (a pipeline.Record)."""
        if not self.processed:
            self.first_done = r.t_done
        self.processed += 1
        self.last_done, self.min_done = r.t_done, min(self.min_done, r.t_done)
        self.e2e.add((r.t_done - r.t_capture) * 1000.0)
        for s in STAGES:
            self.stage_s[s] += r.times[s]
        if not r.reused:
            self.inferred += 1
            self.work_s += sum(r.times[s] for s in STAGES[1:])
            if r.span:
                self.busy.add(*r.span)

    def metrics(self, dropped: int, high_water: int, cfg: Any, cpu: float, wall: float, t_start: float | None,
                model: Any) -> dict[str, Any]:
        n, inferred, e2e = self.processed, self.inferred, self.e2e
        # results per second between the first and the last result, counted like captured_fps (n - 1 intervals): a
        # stream that keeps up processes at the offered rate, not above it
        span = self.last_done - self.first_done
        busy = sum(self.stage_s.values())
        m: dict[str, Any] = {
            "stream/offered_fps": float(cfg.fps),
            "stream/captured_fps": float((self.captured - 1) / (self.last_capture - self.first_capture))
            if self.captured > 1 else float(cfg.fps),
            "stream/fps": float((n - 1) / span) if n > 1 and span > 0 else float(cfg.fps),
            "stream/frames": self.captured,
            "stream/processed_frames": n,
            "stream/dropped_frames": dropped,
            "stream/dropped_fraction": dropped / self.captured,
            "stream/inferences": inferred,
            "stream/reused_frames": n - inferred,
            "stream/reuse_fraction": (n - inferred) / n,
            "stream/e2e_p50_ms": e2e.percentile(50),
            "stream/e2e_p90_ms": e2e.percentile(90),
            "stream/e2e_p99_ms": e2e.percentile(99),
            "stream/e2e_mean_ms": e2e.mean(),
            "stream/e2e_max_ms": float(e2e.max),
            # 0: the percentiles are exact; else their bound, relative (a histogram beyond EXACT_LATENCIES frames)
            "stream/e2e_rel_error": 0.0 if e2e.exact else e2e.rel_error,
            "stream/cpu_util": cpu / wall,  # process CPU seconds per wall second, all threads: 1.0 = one core busy
            "stream/cpu_util_machine": cpu / wall / (os.cpu_count() or 1),
            "stream/wall_s": wall,
            "stream/ring_depth": cfg.depth,
            "stream/requests": cfg.requests,
            "stream/ring_high_water": high_water,
            "stream/load_ms": float(model.load_ms),
        }
        for s in STAGES:
            m[f"stream/{s}_ms"] = self.stage_s[s] * 1000.0 / (n if s == "decode" else (inferred or n))
            m[f"stream/share_{s}"] = self.stage_s[s] / busy if busy else 0.0
        # the model's work per inferred frame (decode aside): what energy per inference multiplies. Busy time is the
        # union of the frames' work intervals: two overlapped async requests keep the device busy once, not twice
        m["stream/busy_ms_per_inference"] = self.busy.seconds() * 1000.0 / max(1, inferred)
        m["stream/work_ms_per_inference"] = self.work_s * 1000.0 / max(1, inferred)
        m["stream/busy_ms_per_frame"] = busy * 1000.0 / n
        if t_start is not None:  # load + compile + the first frame's capture, decode and model work
            m["stream/first_result_ms"] = (self.min_done - t_start) * 1000.0
        return m

    def latency_note(self) -> str | None:
        """Said in the summary when the percentiles come from the histogram."""
        e2e = self.e2e
        if e2e.exact:
            return None
        return (f"e2e latency percentiles over {e2e.n} frames from a log-bucket histogram: within "
                f"{e2e.rel_error:.1%} of the exact values (exact up to {e2e.exact_limit} frames; count, mean and max "
                "are exact)")
