"""The stream: a capture/decode thread and an inference thread over a bounded ring buffer.

capture thread   every 1/fps s (a camera's clock): t_capture, read + decode one frame, put it in the ring
ring (depth D)   full when the consumer falls behind: `drop_oldest` evicts the oldest waiting frame (counted as
                 dropped: a live view wants the newest frame), `block` makes the capture wait (nothing is dropped;
                 the camera's clock slips, so fewer frames are captured per second: `stream/captured_fps`)
inference thread take the oldest waiting frame: preprocess (model.json), infer (the runtime's session),
                 postprocess (the task's); the result is ready at t_done; e2e latency = t_done - t_capture
                 (decode, waiting in the ring and all the model's work included)

Asynchronous requests (`requests` N > 1, runtimes with the ASYNC capability, e.g. OpenVINO's AsyncInferQueue):
the inference thread preprocesses and starts a frame's inference without waiting for it, up to N in flight;
results are postprocessed in capture order as each completes (the oldest first). A frame's inference time is
then start -> outputs ready, so the stage times of overlapped frames overlap (their shares still sum to 1).

Frame reuse (`reuse_threshold` T > 0): before preprocessing, the frame is compared with the last frame that was
inferred (mean absolute difference of 8x8 block means, as a fraction of 255); below T the last result is reused
and the model is not run. Block means, not every 8th pixel: averaging 64 pixels divides a sensor's per-pixel
noise by 8, so a still scene reads as still (on the generated video, sigma 12 noise: a difference of about 0.053
between two frames of the same scene when sampled, 0.007 with block means) while a moved object still changes
whole blocks.

Busy time (what energy per inference multiplies): the union of the inferred frames' [preprocess start,
postprocess end] intervals, so overlapped asynchronous requests count once (`union_seconds`).

Bounded memory, however long the stream runs: the summary is kept as the frames arrive (stats.StreamStats: counts,
stage sums, the busy-time union, e2e percentiles exact up to stats.EXACT_LATENCIES frames, then within 0.5 %), and
only the last `keep_records` processed frames' records (timings, result, ground truth) are kept, for quality (mAP,
reuse's mAP cost), the exactness test and a cascade's per-frame answers; dropped frame indices likewise.

Both threads are real OS threads; the runtimes release the GIL while they compute, and decode / numpy do for
their bulk work, so the two overlap as they would on a device. The stream ends after `frames` frames, at the
end of a finite source, or on stop (Ctrl-C): both threads stop, the ring is drained or abandoned, never hangs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError
from edgebuild.stream.stats import STAGES, StreamStats  # noqa: F401 - STAGES: pipeline.STAGES for callers

POLICIES = ("drop_oldest", "block")
KEEP_RECORDS = 1800  # processed frames' records kept for quality: one minute at 30 FPS, about 5 MB
REUSE_BLOCK = 8  # the reuse check compares 8x8 block means: 1/64 of the values, a fraction of a millisecond


@dataclass
class StreamConfig:
    fps: float = 30.0  # offered frame rate (the capture clock)
    frames: int = 300  # frames captured (fewer when a finite source ends first)
    depth: int = 2  # ring buffer capacity, frames
    policy: str = "drop_oldest"
    reuse_threshold: float = 0.0  # 0: infer every frame
    requests: int = 1  # inferences in flight at once: 1 synchronous; N > 1 the runtime's async requests (ASYNC)
    keep_records: int = KEEP_RECORDS  # the last N processed frames' records (quality is computed over them)

    def check(self) -> None:
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise EdgebuildError(f"stream fps {self.fps} must be a positive number of frames per second",
                                 "give --fps > 0, e.g. --fps 30 (a camera's rate)")
        if self.frames < 1:
            raise EdgebuildError(f"stream length {self.frames} frames: at least one frame is needed",
                                 "give --seconds > 0 or --frames >= 1")
        if self.depth < 1:
            raise EdgebuildError(f"ring depth {self.depth}: the ring must hold at least one frame",
                                 "give --depth >= 1 (2-4 is typical: small keeps latency low)")
        if self.policy not in POLICIES:
            raise EdgebuildError(f"unknown drop policy {self.policy!r}", f"use one of: {', '.join(POLICIES)}")
        if not (isinstance(self.requests, int) and self.requests >= 1):
            raise EdgebuildError(f"stream requests {self.requests}: at least one inference request is needed",
                                 "give --requests 1 (synchronous) or N > 1 (asynchronous, where the runtime has it)")
        if not (isinstance(self.keep_records, int) and self.keep_records >= 0):
            raise EdgebuildError(f"keep_records {self.keep_records}: the number of frames kept for quality must be "
                                 ">= 0", f"give --keep-records N >= 0 (default {KEEP_RECORDS}; 0 keeps none: no mAP)")
        if not 0 <= self.reuse_threshold <= 1:
            raise EdgebuildError(f"reuse threshold {self.reuse_threshold} is outside 0..1 (a fraction of full scale)",
                                 "give a small fraction, e.g. 0.02, or 0 to infer every frame")


@dataclass
class Item:
    frame: Any  # sources.Frame
    t_capture: float
    decode_s: float


class Ring:
    """A bounded FIFO between two threads with an explicit full policy (collections.deque + one condition)."""

    def __init__(self, depth: int, policy: str, keep_dropped: int | None = None):
        self.depth, self.policy = depth, policy
        self.items: deque[Item] = deque()
        self.cond = threading.Condition()
        self.closed = self.aborted = False
        self.dropped_count = 0  # frames evicted unprocessed
        self.dropped: deque[int] = deque(maxlen=keep_dropped)  # the last `keep_dropped` of their indices
        self.high_water = 0

    def put(self, item: Item) -> None:
        with self.cond:
            if self.policy == "block":
                while len(self.items) >= self.depth and not self.aborted:
                    self.cond.wait()
            elif len(self.items) >= self.depth:
                self.dropped.append(self.items.popleft().frame.index)
                self.dropped_count += 1
            if self.aborted:
                return
            self.items.append(item)
            self.high_water = max(self.high_water, len(self.items))
            self.cond.notify_all()

    def get(self) -> Item | None:
        """The oldest waiting item; None once the ring is closed and empty, or aborted."""
        with self.cond:
            while not self.items and not (self.closed or self.aborted):
                self.cond.wait()
            if self.aborted or not self.items:
                return None
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def close(self) -> None:  # no more puts; the consumer drains what waits
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def abort(self) -> None:  # stop now: waiting frames are abandoned, blocked threads return
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


@dataclass
class Record:
    """One processed frame."""

    index: int
    t_capture: float
    t_done: float
    times: dict[str, float]  # seconds per stage (0 for a reused frame's model stages)
    reused: bool
    result: dict[str, Any]
    truth: dict[str, np.ndarray] | None
    size: tuple[int, int]  # frame (w, h)
    span: tuple[float, float] | None = None  # (preprocess start, postprocess end) of an inferred frame; None: reused


@dataclass
class StreamResult:
    metrics: dict[str, Any]  # over the whole stream
    records: list[Record]  # the last `keep_records` processed frames
    dropped: list[int]  # the last `keep_records` dropped frames' indices
    notes: list[str] = field(default_factory=list)
    model_metrics: dict[str, Any] = field(default_factory=dict)  # a model's own tally (a cascade's escalations)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stream: both threads stopped; `result` summarizes the frames processed until then (None
    when there were none), `metrics` is filled in by `edgebuild.stream.measure`."""

    def __init__(self, result: StreamResult | None, metrics: dict[str, Any] | None = None):
        super().__init__()
        self.result, self.metrics = result, metrics


def _small(pixels: np.ndarray) -> np.ndarray:
    """The frame as REUSE_BLOCK x REUSE_BLOCK block means (edge rows and columns that fill no block left out)."""
    b = REUSE_BLOCK
    h, w = pixels.shape[0] // b * b, pixels.shape[1] // b * b
    if h == 0 or w == 0:  # a frame smaller than a block: compare its pixels
        return pixels.astype(np.float32)
    blocks = pixels[:h, :w].reshape(h // b, b, w // b, b, -1)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals, overlaps counted once: [(0, 2), (1, 3), (5, 6)] -> 4."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def run(model: Any, source: Any, cfg: StreamConfig, t_start: float | None = None, sink: Any = None,
        on_result: Any = None) -> StreamResult:
    """Stream `source` through `model` (a StreamModel) with `cfg`; `t_start` (perf_counter, before the model was
    loaded) dates the time to first result; `sink.put(pixels, result)` receives every processed frame (annotation);
    `on_result(record)` is called (inference thread) after each processed frame (the CLI's progress line)."""
    cfg.check()
    ring = Ring(cfg.depth, cfg.policy, cfg.keep_records)
    stop = threading.Event()
    errors: list[BaseException] = []
    records: deque[Record] = deque(maxlen=cfg.keep_records)
    stats = StreamStats()
    tally = model.stream_tally() if hasattr(model, "stream_tally") else None  # a cascade counts its escalations

    def capture() -> None:
        period, next_t = 1.0 / cfg.fps, time.perf_counter()
        try:
            for _ in range(cfg.frames):
                wait = next_t - time.perf_counter()
                if wait > 0 and stop.wait(wait):
                    break
                if stop.is_set():
                    break
                t_capture = time.perf_counter()
                frame = source.read()
                if frame is None:
                    break
                dt = time.perf_counter() - t_capture
                stats.capture(t_capture)
                ring.put(Item(frame, t_capture, dt))
                # the camera's clock: the next frame one period later; a capture that fell behind (slow decode, a
                # blocked ring) continues from now instead of bursting the missed frames
                next_t = max(next_t + period, time.perf_counter() - period)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            stop.set()
            ring.abort()
        finally:
            ring.close()

    def infer() -> None:
        last_small, last_result = None, None
        try:
            while True:
                item = ring.get()
                if item is None:
                    break
                pixels = item.frame.pixels
                size = (pixels.shape[1], pixels.shape[0])
                t0 = time.perf_counter()
                reused = False
                if cfg.reuse_threshold > 0:
                    small = _small(pixels)
                    reused = last_small is not None and small.shape == last_small.shape and \
                        float(np.abs(small - last_small).mean()) / 255.0 < cfg.reuse_threshold
                if reused:
                    result = last_result
                    t1 = t2 = t3 = time.perf_counter()
                else:
                    x = model.preprocess(pixels)
                    t1 = time.perf_counter()
                    outputs = model.infer(x)
                    t2 = time.perf_counter()
                    result = model.postprocess(outputs, size)
                    t3 = time.perf_counter()
                    last_result = result
                    if cfg.reuse_threshold > 0:
                        last_small = small
                times = {"decode": item.decode_s, "preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2}
                emit(item, t3, times, reused, result, pixels, size, None if reused else (t0, t3))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            stop.set()
            ring.abort()

    def emit(item: Item, t_done: float, times: dict[str, float], reused: bool, result: Any, pixels: Any,
             size: tuple[int, int], span: tuple[float, float] | None) -> None:
        """One frame's result, from either inference loop: counted, kept (the last keep_records), annotated (as it
        goes), handed to the caller."""
        record = Record(item.frame.index, item.t_capture, t_done, times, reused, result, item.frame.truth, size, span)
        stats.add(record)
        if tally is not None:
            tally.add(record)
        records.append(record)
        if sink is not None:
            sink.put(pixels, result)
        if on_result is not None:
            on_result(record)

    def infer_async() -> None:
        """N requests in flight: start each frame's inference, postprocess the oldest when N are busy."""
        queue = model.session.async_requests(cfg.requests)
        pending: deque[tuple[Item, float, float, Any, bool]] = deque()  # item, t0, t_pre, job | None (reused)
        last_small, last_result = None, None

        def finish() -> None:
            nonlocal last_result
            item, t0, t1, job, reused = pending.popleft()
            pixels = item.frame.pixels
            size = (pixels.shape[1], pixels.shape[0])
            if reused:  # the result of the last inferred frame before it: finished already (in order)
                result = last_result
                t0 = t1 = t2 = time.perf_counter()
            else:
                outputs = job.wait()
                t2 = time.perf_counter()
                result = model.postprocess(outputs, size)
                last_result = result
            t3 = time.perf_counter()
            times = {"decode": item.decode_s, "preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2}
            emit(item, t3, times, reused, result, pixels, size, None if reused else (t0, t3))

        try:
            while True:
                item = ring.get()
                if item is None:
                    break
                pixels = item.frame.pixels
                t0 = time.perf_counter()
                reused = False
                if cfg.reuse_threshold > 0:
                    small = _small(pixels)
                    reused = last_small is not None and small.shape == last_small.shape and \
                        float(np.abs(small - last_small).mean()) / 255.0 < cfg.reuse_threshold
                if reused:
                    pending.append((item, t0, t0, None, True))
                else:
                    x = model.preprocess(pixels)
                    t1 = time.perf_counter()
                    pending.append((item, t0, t1, queue.start(x), False))
                    if cfg.reuse_threshold > 0:
                        last_small = small
                while sum(not p[4] for p in pending) >= cfg.requests or (pending and pending[0][4]):
                    finish()
                if stop.is_set():
                    break
            while pending and not stop.is_set():
                finish()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            stop.set()
            ring.abort()
        finally:
            queue.close()

    if cfg.requests > 1 and not getattr(model, "async_capable", False):
        raise EdgebuildError(f"requests: {cfg.requests} asks for asynchronous inference, which {model.describe} "
                             "does not offer", "give --requests 1 (synchronous), or a runtime with asynchronous "
                             "requests (OpenVINO)")
    threads = [threading.Thread(target=capture, name="stream-capture", daemon=True),
               threading.Thread(target=infer if cfg.requests == 1 else infer_async, name="stream-inference",
                                daemon=True)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)  # in slices: Ctrl-C reaches the main thread
    except KeyboardInterrupt:
        stop.set()
        ring.abort()
        for t in threads:
            t.join(5)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if not stats.processed or not stats.captured:
            raise Interrupted(None) from None
        partial = stats.metrics(ring.dropped_count, ring.high_water, cfg, cpu, wall, t_start, model)
        partial["stream/interrupted"] = 1
        raise Interrupted(StreamResult(partial, list(records), list(ring.dropped), ["interrupted (Ctrl-C): the "
                          "numbers cover the frames processed until then", *filter(None, [stats.latency_note()])],
                          tally.metrics() if tally else {})) from None
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if errors:
        raise errors[0]
    if not stats.processed:
        raise EdgebuildError("the stream processed no frame: the source gave none", "check the source")
    metrics = stats.metrics(ring.dropped_count, ring.high_water, cfg, cpu, wall, t_start, model)
    notes = [n for n in [stats.latency_note()] if n]
    if model.resized:
        notes.append(f"frames of {model.resized[0]}x{model.resized[1]} were resized to the model's input "
                     f"{model.width}x{model.height} (PIL bilinear), as model.json's preprocessing says")
    return StreamResult(metrics, list(records), list(ring.dropped), notes, tally.metrics() if tally else {})


def summarize(records: list[Record], ring: Ring, captures: list[float], cfg: StreamConfig, cpu: float, wall: float,
              t_start: float | None, model: Any) -> dict[str, Any]:
    """The metrics of given records and capture times (what `run` keeps incrementally, from lists)."""
    stats = StreamStats()
    for t in captures:
        stats.capture(t)
    for r in records:
        stats.add(r)
    return stats.metrics(ring.dropped_count, ring.high_water, cfg, cpu, wall, t_start, model)
